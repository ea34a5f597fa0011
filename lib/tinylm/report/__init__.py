"""The summary across runs (rule summarize): tables, figures and HTML pages for the Snakemake report.

Modules, each importing only those before it in this list: records (reading a run's metrics.jsonl
and metrics.json) -> tables -> plots -> pages -> summarize (summarize_runs: the whole step).
"""

from .pages import samples_html, summary_html
from .plots import loss_axis
from .records import SUMMARY_COLUMNS, read_metrics_log, read_run_metrics
from .summarize import summarize_runs
from .tables import summary_table

__all__ = [
    "SUMMARY_COLUMNS",
    "loss_axis",
    "read_metrics_log",
    "read_run_metrics",
    "samples_html",
    "summarize_runs",
    "summary_html",
    "summary_table",
]
