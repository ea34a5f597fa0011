"""The summary's two tables: one row per run, and one row per setting aggregated over its seeds.

Runs of one setting differ only in their seed. A setting's row counts its "ok" runs (n) and leaves
out the others (n_excluded; their status is in the per-run rows), and gives for each of AGGREGATED
the mean, the sample standard deviation (n - 1 in the denominator) and the half-width of the 95%
confidence interval of the mean, t(0.975, n - 1) x sd / sqrt(n) (Student's t: seeds are few). sd
and the interval need two runs; with fewer they are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from .records import RunRecord, precision_as_run

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
]
SWEPT = "swept."


def t_critical(df: int, level: float = 0.95) -> float:
    """t with P(|T| <= t) = level for Student's t with `df` degrees of freedom, by bisection."""
    if df < 1:
        raise ValueError(f"Student's t needs at least 1 degree of freedom, got {df}")
    lo, hi = 0.0, 1.0
    while _t_within(hi, df) < level:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_within(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def _t_within(t: float, df: int) -> float:
    """P(|T| <= t) for integer df, in closed form (Abramowitz and Stegun 26.7.3 and 26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    c = math.cos(theta) ** 2
    total, term = 1.0, 1.0
    if df % 2 == 0:
        for k in range(1, (df - 2) // 2 + 1):
            term *= (2 * k - 1) / (2 * k) * c
            total += term
        return math.sin(theta) * total
    if df == 1:
        return 2 * theta / math.pi
    for k in range(1, (df - 3) // 2 + 1):
        term *= 2 * k / (2 * k + 1) * c
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)


def mean_interval(values: Iterable[float]) -> tuple[float, float, float, int]:
    """(mean, sample sd, half-width of the 95% t-interval of the mean, n); NaN where undefined."""
    x = np.asarray(list(values), dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        return mean, math.nan, math.nan, n
    sd = float(x.std(ddof=1))
    return mean, sd, t_critical(n - 1) * sd / math.sqrt(n), n


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
            **{SWEPT + key: r.values.get(key, math.nan) for key in keys},
            "status": r.status,
            "status_note": r.note,
            "device": r.config.get("device"),
            "precision": precision_as_run(r.config),
            "n_params": r.config["n_params"],
            "final_step": metrics.get("final_step") or r.log.last_step,
        }
        row.update({key: metrics.get(key) for key in RUN_COLUMNS if key not in row})
        rows.append(row)
    columns = RUN_COLUMNS[:5] + [SWEPT + key for key in keys] + RUN_COLUMNS[5:]
    table = pd.DataFrame(rows, columns=columns)
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
        rows.append(row)
    return pd.DataFrame(rows, columns=BY_SETTING_COLUMNS[:3] + swept + BY_SETTING_COLUMNS[3:])


def time_unit(max_sec: float) -> tuple[float, str]:
    """Seconds, minutes or hours, whichever keeps the axis numbers short."""
    if max_sec >= 3 * 3600:
        return 3600.0, "h"
    if max_sec >= 300:
        return 60.0, "min"
    return 1.0, "s"
