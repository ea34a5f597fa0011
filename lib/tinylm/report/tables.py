"""The summary's three tables: one row per run, one row per setting aggregated over its seeds, and
each setting against a reference.

Runs of one setting share their settings but the seed; how they ran (device, precision, compile,
processes, CPU threads, torch, the evaluation's device and precision) may differ, as when a run was
resumed on another machine under train.device auto: such rows are kept and flagged, in
ran_differently (RAN_WITH; empty where they all ran alike). A setting's row counts its "ok" runs (n) and leaves
out the others (n_excluded; their status is in the per-run rows), and gives for each of AGGREGATED
the mean, the sample standard deviation (n - 1 in the denominator) and the half-width of the 95%
confidence interval of the mean, t(0.975, n - 1) x sd / sqrt(n) (Student's t: seeds are few). sd
and the interval need two runs; with fewer they are NaN.

A third table compares every other setting with one reference setting (the config's `compare_to`,
by default baseline): for each of AGGREGATED, the difference of the means (setting - reference) with
its 95% interval and two-sided p-value by Welch's t-test, which does not assume equal spreads (its
degrees of freedom by Welch-Satterthwaite, seldom a whole number). The verdict: "better" where the
interval lies below zero (lower loss), "worse" above it, else "no clear difference"; "too few runs"
where either setting has fewer than two ok runs (a spread cannot be told from one). Each row also
counts the runs of either side left out (n_excluded, n_reference_excluded): the test speaks for the
ok runs only; and says how the ok runs of either side, or the two sides, ran differently, if they did.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from ..errors import DataError
from .records import THEN, RunRecord, hardware, ran_with, said_once

# One row per run; one "swept.<key>" column per swept key follows "sweep".
RUN_COLUMNS = [
    "run",
    "model",
    "setting",
    "seed",
    "sweep",
    "status",
    "status_note",
    "device",
    "precision",
    "compile",
    "processes",
    "cpu_threads",
    "torch",
    "eval_device",
    "eval_precision",
    "n_params",
    "best_step",
    "final_step",
    "val_loss",
    "val_ppl",
    "val_bpb",
    "test_loss",
    "test_ppl",
    "test_bpb",
    "train_tokens_per_sec",
    "train_wall_sec",
]
AGGREGATED = ("val_loss", "val_bpb", "test_loss", "test_bpb")
# One row per setting; one "swept.<key>" column per swept key follows "sweep".
BY_SETTING_COLUMNS = [
    "setting",
    "model",
    "sweep",
    "n",
    "n_excluded",
    "n_params",
    *(f"{key}_{stat}" for key in AGGREGATED for stat in ("mean", "sd", "ci95")),
    "train_tokens_per_sec_mean",
    "ran_differently",
]
SWEPT = "swept."
# One row per (setting, metric of AGGREGATED) against the reference setting.
COMPARISON_COLUMNS = [
    "setting",
    "reference",
    "metric",
    "n",
    "n_reference",
    "n_excluded",
    "n_reference_excluded",
    "mean",
    "reference_mean",
    "difference",
    "ci95_low",
    "ci95_high",
    "df",
    "p_value",
    "verdict",
    "ran_differently",
]


def t_critical(df: float, level: float = 0.95) -> float:
    """t with P(|T| <= t) = level for Student's t with `df` degrees of freedom, by bisection."""
    if not df >= 1:
        raise ValueError(f"Student's t needs at least 1 degree of freedom, got {df}")
    lo, hi = 0.0, 1.0
    while _t_within(hi, df) < level:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_within(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


_SIMPSON_INTERVALS = 4096
_SIMPSON_WEIGHTS = np.array([1.0, *([4.0, 2.0] * (_SIMPSON_INTERVALS // 2))])
_SIMPSON_WEIGHTS[-1] = 1.0


def _t_within(t: float, df: float) -> float:
    """P(|T| <= t) for Student's t with df >= 1 degrees of freedom, whole or not (Welch's are not).

    Substituting u = sqrt(df) tan(phi) in the density's integral from -t to t leaves
    2 / B(1/2, df/2) times the integral of cos(phi) ** (df - 1) from 0 to atan(t / sqrt(df)): a
    bounded, smooth integrand on a bounded interval, taken by Simpson's rule (error below 1e-9 for
    df up to 10^4)."""
    theta = math.atan(t / math.sqrt(df))
    phi = np.linspace(0.0, theta, _SIMPSON_INTERVALS + 1)
    integral = theta / (3 * _SIMPSON_INTERVALS) * float(_SIMPSON_WEIGHTS @ np.cos(phi) ** (df - 1))
    log_beta = math.lgamma(0.5) + math.lgamma(df / 2) - math.lgamma((df + 1) / 2)
    return min(1.0, 2 * integral / math.exp(log_beta))


def mean_interval(values: Iterable[float]) -> tuple[float, float, float, int]:
    """(mean, sample sd, half-width of the 95% t-interval of the mean, n); NaN where undefined."""
    x = np.asarray(list(values), dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        return mean, math.nan, math.nan, n
    sd = float(x.std(ddof=1))
    return mean, sd, t_critical(n - 1) * sd / math.sqrt(n), n


def welch(a: Iterable[float], b: Iterable[float]) -> dict:
    """mean(a) - mean(b) with Welch's 95% interval, degrees of freedom and two-sided p-value (module
    docstring); interval, df and p are NaN unless both samples have two values or more."""
    x, y = np.asarray(list(a), dtype=float), np.asarray(list(b), dtype=float)
    diff = float(x.mean() - y.mean()) if len(x) and len(y) else math.nan
    out = {"difference": diff, "ci95_low": math.nan, "ci95_high": math.nan, "df": math.nan, "p_value": math.nan}
    if len(x) < 2 or len(y) < 2:
        return out
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(vx + vy)
    if se == 0:  # both samples constant: the difference is exact
        return {**out, "ci95_low": diff, "ci95_high": diff, "df": len(x) + len(y) - 2,
                "p_value": 1.0 if diff == 0 else 0.0}
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))  # >= the smaller n - 1
    half = t_critical(df) * se
    return {**out, "ci95_low": diff - half, "ci95_high": diff + half, "df": df,
            "p_value": 1.0 - _t_within(abs(diff) / se, df)}


def verdict(row: dict) -> str:
    """A comparison row's verdict for a loss, where lower is better (module docstring)."""
    if math.isnan(row["ci95_low"]):
        return "too few runs"
    if row["ci95_high"] < 0:
        return "better"
    if row["ci95_low"] > 0:
        return "worse"
    return "no clear difference"


def comparison_table(runs: pd.DataFrame, reference: str | None) -> pd.DataFrame:
    """COMPARISON_COLUMNS: every setting of `runs` (a runs_table) but `reference` against it, over
    their ok runs, one row per metric of AGGREGATED; no rows without a reference."""
    settings = list(dict.fromkeys(runs["setting"]))
    if reference is not None and reference not in settings:
        raise DataError(f"the reference setting {reference!r} has no runs; settings: {settings}")
    ok = runs[runs["status"] == "ok"]
    ref = ok[ok["setting"] == reference]
    # Runs left out (diverged, failed): the test speaks for the ok runs only, and a setting that
    # diverged at most seeds can look better over the few that did not.
    left_out = runs[runs["status"] != "ok"]["setting"].value_counts()
    rows = []
    for setting in settings:
        if reference is None or setting == reference:
            continue
        mine = ok[ok["setting"] == setting]
        differently = ran_differently([(setting, mine), (reference, ref)])
        for key in AGGREGATED:
            row = {"setting": setting, "reference": reference, "metric": key, "n": len(mine),
                   "n_reference": len(ref), "n_excluded": int(left_out.get(setting, 0)),
                   "n_reference_excluded": int(left_out.get(reference, 0)),
                   "mean": mine[key].mean(), "reference_mean": ref[key].mean(),
                   **welch(mine[key], ref[key])}
            row["verdict"] = verdict(row)
            row["ran_differently"] = differently
            rows.append(row)
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


# How a run's numbers were computed beyond its settings: label -> its text from a runs_table row
# (None where the row does not record it). The CPU thread count changes the arithmetic on the CPU only.
RAN_WITH = {
    "device": lambda r: _each(r.get("device"), hardware),
    "precision": lambda r: _each(r.get("precision"), str),
    "compile": lambda r: _each(r.get("compile"), lambda v: "on" if v in (True, "True") else "off"),
    "processes": lambda r: _each(r.get("processes"), lambda v: f"{int(float(v))}"),
    "CPU threads": lambda r: (None if "cpu" not in str(_each(r.get("device"), hardware)).split(THEN)
                              else _text(_given(r.get("cpu_threads")))),
    "torch": lambda r: _given(r.get("torch")),
    "evaluation": lambda r: (None if _given(r.get("eval_device")) is None else
                             " ".join(str(x) for x in (hardware(r["eval_device"]), _given(r.get("eval_precision")))
                                      if x is not None)),
}


def _each(value, text) -> str | None:
    """text() of a recorded value, or of each attempt's where a resumed run joined them by THEN (a
    value the next attempt repeats said once); None for an empty cell."""
    value = _given(value)
    if value is None:
        return None
    return THEN.join(said_once([text(v) for v in (value.split(THEN) if isinstance(value, str) else [value])]))


def _given(value):
    """A recorded value, or None for an empty cell (None or NaN)."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _text(value) -> str | None:
    if value is None:
        return None
    return f"{int(value)}" if isinstance(value, (float, np.floating)) and float(value).is_integer() else str(value)


def _by_value(rows: list[dict], label: str) -> dict[str, list]:
    """The text of aspect `label` -> the seeds of the rows that have it, in order of appearance."""
    out: dict[str, list] = {}
    for row in rows:
        text = RAN_WITH[label](row)
        if text is not None:
            out.setdefault(text, []).append(row["seed"])
    return out


def _seeds(values: dict[str, list]) -> str:
    """'cpu (seed 1) / NVIDIA H200 (seeds 2, 3)'; the value alone where it is the only one."""
    if len(values) == 1:
        return next(iter(values))
    return " / ".join(f"{text} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"
                      for text, seeds in values.items())


def ran_differently(sides: Sequence[tuple[str | None, pd.DataFrame]]) -> str:
    """Each aspect of RAN_WITH in which the runs of `sides` (name, runs_table rows; the name None for
    one side alone) did not all run alike, with each value and its seeds; "" where they all did.

    One side: "device: cpu (seed 1) / NVIDIA H200 (seeds 2, 3)". Two: "device: condor cpu, baseline
    NVIDIA H200", a side's values by seed where they differ within it. A side that does not record an
    aspect (an older record; CPU threads off the CPU) is not compared in it."""
    rows = [[dict(r) for r in frame.to_dict("records")] for _, frame in sides]
    parts = []
    for label in RAN_WITH:
        values = [_by_value(side, label) for side in rows]
        if len({text for v in values for text in v}) < 2:
            continue
        if len(sides) == 1:
            parts.append(f"{label}: {_seeds(values[0])}")
        else:
            parts.append(f"{label}: " + ", ".join(f"{name} {_seeds(v)}" for (name, _), v in
                                                  zip(sides, values, strict=True) if v))
    return "; ".join(parts)


def swept_cell(values: dict, key: str):
    """A run's value of a swept key for the tables: None (an empty cell) where the run does not sweep
    it, "null" where it sweeps it to null (a value of its own, as in the run's name)."""
    if key not in values:
        return None
    return "null" if values[key] is None else values[key]


def runs_table(records: Sequence[RunRecord]) -> pd.DataFrame:
    """RUN_COLUMNS, one row per run in the given order; numbers a run lacks are NaN."""
    keys = list(dict.fromkeys(key for r in records for key in r.values))
    rows = []
    for r in records:
        metrics = r.metrics or {}
        row = {
            "run": r.name,
            "model": r.model,
            "setting": r.setting,
            "seed": r.seed,
            "sweep": r.sweep,
            **{SWEPT + key: swept_cell(r.values, key) for key in keys},
            "status": r.status,
            "status_note": r.note,
            **ran_with(r),
            "n_params": r.config["n_params"],
            "final_step": metrics.get("final_step") or r.log.last_step,
        }
        row.update({key: metrics.get(key) for key in RUN_COLUMNS if key not in row})
        rows.append(row)
    columns = RUN_COLUMNS[:5] + [SWEPT + key for key in keys] + RUN_COLUMNS[5:]
    table = pd.DataFrame(rows, columns=columns)
    for key in keys:
        table[SWEPT + key] = _as_written(rows, SWEPT + key, table.index)
    numeric = RUN_COLUMNS[RUN_COLUMNS.index("n_params") :]
    table[numeric] = table[numeric].apply(pd.to_numeric, errors="coerce")
    return table


def by_setting_table(runs: pd.DataFrame) -> pd.DataFrame:
    """BY_SETTING_COLUMNS, one row per setting of `runs` (a runs_table), in order of appearance."""
    ok = runs["status"] == "ok"
    for key in AGGREGATED:
        bad = runs[ok & ~np.isfinite(runs[key].astype(float))]
        if len(bad):
            row = bad.iloc[0]
            raise ValueError(f"run {row['run']} has status ok but {key} = {row[key]}")
    swept = [c for c in runs.columns if c.startswith(SWEPT)]
    rows = []
    for setting, group in runs.groupby("setting", sort=False):
        first, good = group.iloc[0], group[group["status"] == "ok"]
        row = {
            "setting": setting,
            "model": first["model"],
            "sweep": first["sweep"],
            **{c: first[c] for c in swept},
            "n": len(good),
            "n_excluded": len(group) - len(good),
            "n_params": first["n_params"],
        }
        for key in AGGREGATED:
            mean, sd, half, _ = mean_interval(good[key])
            row.update({f"{key}_mean": mean, f"{key}_sd": sd, f"{key}_ci95": half})
        row["train_tokens_per_sec_mean"] = good["train_tokens_per_sec"].mean()
        row["ran_differently"] = ran_differently([(None, good)])
        rows.append(row)
    table = pd.DataFrame(rows, columns=BY_SETTING_COLUMNS[:3] + swept + BY_SETTING_COLUMNS[3:])
    for column in swept:
        table[column] = _as_written(rows, column, table.index)
    return table


def _as_written(rows: list[dict], column: str, index: pd.Index) -> pd.Series:
    """A swept key's column as written in the config: pandas would make 64 beside an empty cell 64.0."""
    return pd.Series([row[column] for row in rows], index=index, dtype=object)


def time_unit(max_sec: float) -> tuple[float, str]:
    """Seconds, minutes or hours, whichever keeps the axis numbers short."""
    if max_sec >= 3 * 3600:
        return 3600.0, "h"
    if max_sec >= 300:
        return 60.0, "min"
    return 1.0, "s"
