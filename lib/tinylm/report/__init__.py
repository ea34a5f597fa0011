"""The summary across runs (rule summarize): tables, figures and HTML pages for the Snakemake report.

summarize_runs(...)   the whole step: read every run, write every output at the path given
read_run(...)         one run's config.json, metrics.jsonl and metrics.json, and its status

Modules, each importing only those before it in this list: records (a run's files and status) ->
tables (per run, per setting over seeds, against a reference) -> plots (loss curves, MoE) -> sweeps
(one figure per sweep) -> pages (HTML) -> summarize.
"""

from .plots import loss_axis
from .records import read_metrics_log, read_run, read_run_metrics
from .summarize import Summary, summarize_runs
from .tables import AGGREGATED, BY_SETTING_COLUMNS, COMPARISON_COLUMNS, RUN_COLUMNS

__all__ = [
    "AGGREGATED",
    "BY_SETTING_COLUMNS",
    "COMPARISON_COLUMNS",
    "RUN_COLUMNS",
    "Summary",
    "loss_axis",
    "read_metrics_log",
    "read_run",
    "read_run_metrics",
    "summarize_runs",
]
