"""The cross-model summary (rule summarize): table, loss curves, MoE routing plots, sample pages.

Outputs, each at the path the caller gives (rule summarize lists them), all written atomically:

    csv              one row per model (SUMMARY_COLUMNS)
    table, samples   self-contained HTML pages for the Snakemake report: the table, the samples
    loss_vs_step     training and validation loss against step, every model
    loss_vs_time     the same against training wall-clock time
    moe_plots        per MoE run: expert_load (load per layer and expert), dropped (drops, router losses)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from ..errors import DataError
from ..io import atomic_open, atomic_path
from .pages import samples_html, summary_html
from .plots import plot_expert_load, plot_losses, plot_router_stats
from .records import read_metrics_log, read_run_metrics
from .tables import summary_table

log = logging.getLogger(__name__)


def _write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    log.info("wrote %s", path)


def summarize_runs(
    runs: Mapping[str, Mapping[str, str | Path]],
    *,
    csv: str | Path,
    table: str | Path,
    loss_vs_step: str | Path,
    loss_vs_time: str | Path,
    samples: str | Path,
    moe_plots: Mapping[str, Mapping[str, str | Path]] | None = None,
) -> pd.DataFrame:
    """Read every run and write the table, the pages and the plots at the paths given; return the table.

    `runs`: model -> {"history": metrics.jsonl, "metrics": metrics.json}. `moe_plots`: model ->
    {"expert_load": png, "dropped": png}, for exactly the runs whose log holds MoE statistics.
    """
    if not runs:
        raise DataError("no runs to summarize: the model -> run files mapping is empty")
    logs = {model: read_metrics_log(files["history"]) for model, files in runs.items()}
    metrics = {model: read_run_metrics(files["metrics"], model) for model, files in runs.items()}
    moe_plots = dict(moe_plots or {})
    moe_runs = sorted(model for model, run in logs.items() if run.is_moe)
    if sorted(moe_plots) != moe_runs:
        raise DataError(
            f"MoE plot paths were given for {sorted(moe_plots)}, but the runs with MoE statistics "
            f"are {moe_runs}; declare the plots for exactly the models with ffn: moe"
        )
    summary = summary_table(metrics)

    plot_losses(logs, "step", Path(loss_vs_step))
    plot_losses(logs, "elapsed_sec", Path(loss_vs_time))
    for model, paths in moe_plots.items():
        plot_expert_load(model, logs[model].train, Path(paths["expert_load"]))
        plot_router_stats(model, logs[model].train, Path(paths["dropped"]))
    _write_text(Path(table), summary_html(summary))
    _write_text(Path(samples), samples_html(metrics))
    with atomic_path(csv) as tmp:
        summary.to_csv(tmp, index=False)
    log.info("wrote %s", csv)
    return summary
