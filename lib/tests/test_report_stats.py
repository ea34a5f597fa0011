"""Aggregation over seeds: the Student-t interval, per-setting rows, and runs left out by status."""

import math

import numpy as np
import pandas as pd
import pytest

from tinylm.report.tables import (
    AGGREGATED,
    BY_SETTING_COLUMNS,
    by_setting_table,
    mean_interval,
    t_critical,
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


def test_an_ok_run_with_a_non_finite_number_is_an_error():
    runs = runs_frame([("condor-seed1", "condor", "ok", np.inf)])
    with pytest.raises(ValueError, match="condor-seed1.*status ok.*val_loss = inf"):
        by_setting_table(runs)
