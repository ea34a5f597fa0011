"""The summary table."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from .records import SUMMARY_COLUMNS


def summary_table(metrics: Mapping[str, dict]) -> pd.DataFrame:
    """One row per model, in the given order; missing numbers (e.g. no timing) become NaN."""
    table = pd.DataFrame([{key: m[key] for key in SUMMARY_COLUMNS} for m in metrics.values()])
    numeric = SUMMARY_COLUMNS[1:]
    table[numeric] = table[numeric].apply(pd.to_numeric, errors="coerce")
    return table
