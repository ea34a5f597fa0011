"""Aggregation over seeds: the Student-t interval, per-setting rows, runs left out by status, and
each setting against a reference by Welch's t-test."""

import math

import numpy as np
import pandas as pd
import pytest

from tinylm.errors import DataError
from tinylm.report.tables import (
    AGGREGATED,
    BY_SETTING_COLUMNS,
    COMPARISON_COLUMNS,
    by_setting_table,
    comparison_table,
    mean_interval,
    t_critical,
    welch,
)


@pytest.mark.parametrize(
    ("df", "expected"),  # two-sided 95% points of Student's t, from statistical tables
    [
        (1, 12.7062),
        (2, 4.3027),
        (3, 3.1824),
        (4, 2.7764),
        (9, 2.2622),
        (30, 2.0423),
        (1000, 1.9623),
    ],
)
def test_t_critical_matches_tables(df, expected):
    assert t_critical(df) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(("df", "expected"), [(1.5, 6.0167), (2.62, 3.4602), (10.44, 2.2155)])
def test_t_critical_at_degrees_of_freedom_between_whole_numbers(df, expected):
    """Welch's degrees of freedom are seldom whole; expected from scipy.stats.t.ppf(0.975, df)."""
    assert t_critical(df) == pytest.approx(expected, abs=1e-4)
    assert t_critical(math.floor(df)) > t_critical(df) > t_critical(math.ceil(df))


def test_t_critical_rejects_no_degrees_of_freedom():
    with pytest.raises(ValueError, match="at least 1 degree of freedom"):
        t_critical(0)


def test_interval_of_two_and_three_values():
    mean, sd, half, n = mean_interval([1.0, 2.0])
    assert (mean, n) == (1.5, 2)
    assert sd == pytest.approx(math.sqrt(0.5))  # sample sd, n - 1 in the denominator
    assert half == pytest.approx(12.7062 * math.sqrt(0.5) / math.sqrt(2), abs=1e-4)  # 6.3531
    mean, sd, half, n = mean_interval([1.0, 2.0, 3.0])
    assert (mean, sd, n) == (2.0, 1.0, 3)
    assert half == pytest.approx(4.3027 / math.sqrt(3), abs=1e-4)  # 2.4842


def test_interval_of_one_and_no_values():
    mean, sd, half, n = mean_interval([1.25])
    assert (mean, n) == (1.25, 1) and math.isnan(sd) and math.isnan(half)
    mean, sd, half, n = mean_interval([])
    assert n == 0 and all(math.isnan(x) for x in (mean, sd, half))


def runs_frame(rows: list[tuple]) -> pd.DataFrame:
    """Per-run rows (run, setting, status, val_loss) as tables.runs_table makes them."""
    out = []
    for run, setting, status, loss in rows:
        row = {
            "run": run,
            "model": "condor",
            "setting": setting,
            "seed": int(run[-1]),
            "sweep": "lr" if "lr" in setting else None,
            "status": status,
            "n_params": 1e6,
        }
        row.update({key: loss for key in AGGREGATED})
        row["train_tokens_per_sec"] = 1000.0
        out.append(row)
    frame = pd.DataFrame(out)
    frame["swept.lr"] = [0.001 if "lr0.001" in s else np.nan for s in frame["setting"]]
    return frame


def test_by_setting_aggregates_known_numbers_and_leaves_out_bad_runs():
    runs = runs_frame(
        [
            ("condor-seed1", "condor", "ok", 1.0),
            ("condor-seed2", "condor", "ok", 2.0),
            ("condor-seed3", "condor", "ok", 3.0),
            ("condor-lr0.001-seed1", "condor-lr0.001", "ok", 2.0),
            ("condor-lr0.001-seed2", "condor-lr0.001", "diverged", np.nan),
            ("condor-lr0.001-seed3", "condor-lr0.001", "ok", 4.0),
            ("condor-lr0.003-seed1", "condor-lr0.003", "failed", np.nan),
        ]
    )
    table = by_setting_table(runs)
    assert list(table.columns) == [*BY_SETTING_COLUMNS[:3], "swept.lr", *BY_SETTING_COLUMNS[3:]]
    assert list(table["setting"]) == ["condor", "condor-lr0.001", "condor-lr0.003"]
    assert list(table["n"]) == [3, 2, 0]
    assert list(table["n_excluded"]) == [0, 1, 1]
    plain, swept, failed = table.to_dict("records")
    for key in AGGREGATED:
        assert plain[f"{key}_mean"] == 2.0 and plain[f"{key}_sd"] == 1.0
        assert plain[f"{key}_ci95"] == pytest.approx(2.4842, abs=1e-4)
        assert swept[f"{key}_mean"] == 3.0  # the diverged run's NaN is not in it
        assert swept[f"{key}_sd"] == pytest.approx(math.sqrt(2))
        assert swept[f"{key}_ci95"] == pytest.approx(12.7062, abs=1e-3)  # t(1) * sqrt(2) / sqrt(2)
        assert math.isnan(failed[f"{key}_mean"]) and math.isnan(failed[f"{key}_ci95"])
    assert swept["sweep"] == "lr" and swept["swept.lr"] == 0.001
    assert pd.isna(plain["sweep"]) and math.isnan(plain["swept.lr"])  # empty in the CSV


@pytest.mark.parametrize("loss", [np.inf, np.nan])
def test_an_ok_run_with_a_non_finite_number_is_an_error(loss):
    runs = runs_frame([("condor-seed1", "condor", "ok", loss)])
    with pytest.raises(ValueError, match=f"condor-seed1.*status ok.*val_loss = {loss}"):
        by_setting_table(runs)


# Welch's t-test; expected numbers from scipy 1.17.1, stats.ttest_ind(a, b, equal_var=False) and its
# confidence_interval(0.95), an implementation independent of tinylm's.
WELCH_CASES = [
    # a, b, difference, ci95_low, ci95_high, df, p_value
    ([1.0, 1.1, 1.3], [1.5, 1.4, 1.6, 1.45], -0.354167, -0.669642, -0.038691, 2.939708, 0.037616),
    ([2.0, 2.2], [2.1, 2.6, 2.3], -0.233333, -0.794867, 0.328200, 2.998088, 0.277726),
    ([3.0, 3.1], [2.0, 2.05], 1.025, 0.679074, 1.370926, 1.470588, 0.010300),
]


@pytest.mark.parametrize(("a", "b", "difference", "low", "high", "df", "p"), WELCH_CASES)
def test_welch_matches_an_independent_implementation(a, b, difference, low, high, df, p):
    out = welch(a, b)
    for key, expected in (("difference", difference), ("ci95_low", low), ("ci95_high", high), ("df", df),
                          ("p_value", p)):
        assert out[key] == pytest.approx(expected, abs=2e-6), key


def test_welch_needs_two_values_on_each_side():
    out = welch([1.0, 2.0], [1.5])
    assert out["difference"] == 0.0 and all(math.isnan(out[k]) for k in ("ci95_low", "ci95_high", "df", "p_value"))
    assert math.isnan(welch([], [1.0, 2.0])["difference"])


def test_welch_of_two_constant_samples_is_exact():
    assert welch([1.0, 1.0], [1.5, 1.5, 1.5]) == {"difference": -0.5, "ci95_low": -0.5, "ci95_high": -0.5,
                                                   "df": 3, "p_value": 0.0}
    assert welch([1.0, 1.0], [1.0, 1.0])["p_value"] == 1.0


def comparison_runs(losses: dict[str, list]) -> pd.DataFrame:
    """runs_frame rows from setting -> per-seed losses (None: a diverged run)."""
    rows = []
    for setting, values in losses.items():
        for seed, loss in enumerate(values, start=1):
            rows.append((f"{setting}-seed{seed}", setting, "ok" if loss is not None else "diverged",
                         np.nan if loss is None else loss))
    return runs_frame(rows)


def test_every_setting_against_the_reference_over_its_ok_runs():
    runs = comparison_runs({
        "baseline": [1.5, 1.4, 1.6, 1.45],
        "better": [1.0, 1.1, 1.3, None],  # the diverged run is left out: WELCH_CASES[0]
        "same": [1.45, 1.55, 1.5],
        "worse": [3.0, 3.1],
        "single": [0.1],
    })
    table = comparison_table(runs, "baseline")
    assert list(table.columns) == COMPARISON_COLUMNS
    assert list(table["setting"]) == [s for s in ("better", "same", "worse", "single") for _ in AGGREGATED]
    assert list(table["metric"]) == list(AGGREGATED) * 4
    assert set(table["reference"]) == {"baseline"} and set(table["n_reference"]) == {4}
    by = {s: rows.iloc[0] for s, rows in table.groupby("setting")}
    assert by["better"]["n"] == 3 and by["better"]["verdict"] == "better"
    assert by["better"]["ci95_high"] == pytest.approx(-0.038691, abs=2e-6)
    assert by["better"]["mean"] == pytest.approx(3.4 / 3)
    assert by["better"]["reference_mean"] == pytest.approx(1.4875)
    assert by["same"]["verdict"] == "no clear difference"
    assert by["worse"]["verdict"] == "worse" and by["worse"]["difference"] == pytest.approx(3.05 - 1.4875)
    single = by["single"]
    assert single["verdict"] == "too few runs" and single["difference"] == pytest.approx(0.1 - 1.4875)
    assert math.isnan(single["p_value"])


def test_settings_with_the_same_constant_losses_show_no_clear_difference():
    """Their interval is exactly [0, 0]: it lies neither below zero nor above it."""
    runs = comparison_runs({"baseline": [1.5, 1.5], "same": [1.5, 1.5, 1.5]})
    [row] = comparison_table(runs, "baseline").query("metric == 'val_loss'").to_dict("records")
    assert (row["ci95_low"], row["ci95_high"]) == (0.0, 0.0) and row["verdict"] == "no clear difference"


def test_no_reference_no_comparison_and_an_unknown_one_is_an_error():
    runs = comparison_runs({"baseline": [1.0, 1.1], "other": [1.2, 1.3]})
    table = comparison_table(runs, None)
    assert list(table.columns) == COMPARISON_COLUMNS and table.empty
    with pytest.raises(DataError, match="'basline' has no runs; settings: \\['baseline', 'other'\\]"):
        comparison_table(runs, "basline")


def test_a_reference_without_ok_runs_compares_nothing():
    runs = comparison_runs({"baseline": [None, None], "other": [1.2, 1.3]})
    [row] = comparison_table(runs, "baseline").query("metric == 'val_loss'").to_dict("records")
    assert row["n_reference"] == 0 and row["verdict"] == "too few runs" and math.isnan(row["difference"])


def test_the_comparison_counts_the_runs_it_left_out():
    """A setting that diverged at three seeds of five and beat the reference at the other two is
    "better" over its ok runs only: each row says how many runs of either side the test left out."""
    runs = comparison_runs({"baseline": [1.5, 1.4, None, 1.6], "unstable": [1.0, None, None, None, 1.1]})
    [row] = comparison_table(runs, "baseline").query("metric == 'val_loss'").to_dict("records")
    assert row["verdict"] == "better"
    assert (row["n"], row["n_excluded"], row["n_reference"], row["n_reference_excluded"]) == (2, 3, 3, 1)
