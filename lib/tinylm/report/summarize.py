"""Rule summarize as one call: read every run, write the tables, pages and figures at the given paths.

Outputs, each at the path the caller gives (rule summarize lists them), all written atomically:

    runs_csv          one row per run (tables.RUN_COLUMNS)
    by_setting_csv    one row per setting, aggregated over its seeds (tables.BY_SETTING_COLUMNS)
    comparison_csv    every other setting against the reference setting (tables.COMPARISON_COLUMNS)
    table             HTML page of the three tables, rounded
    run_settings      HTML page of each run's settings as its config.json and metrics.json record them
    samples           HTML page of each setting's completions
    loss_vs_step      training and validation loss per setting against step (mean, min-max band)
    loss_vs_time      the same against training wall-clock time
    sweeps            per sweep: plot (validation loss and bpb against the swept value)
    moe_plots         per MoE run: expert_load (load per layer and expert), dropped (drops, router losses)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from ..errors import DataError
from ..io import atomic_open, atomic_path
from .pages import run_settings_html, samples_html, setting_samples, summary_html
from .plots import plot_expert_load, plot_losses, plot_nothing_logged, plot_router_stats
from .records import RunRecord, read_run
from .sweeps import plot_sweep
from .tables import by_setting_table, comparison_table, runs_table

log = logging.getLogger(__name__)


class Summary(NamedTuple):
    runs: pd.DataFrame  # one row per run
    by_setting: pd.DataFrame  # one row per setting
    comparison: pd.DataFrame  # one row per (setting, metric) against the reference; empty without one


def summarize_runs(
    runs: Mapping[str, Mapping],
    *,
    runs_csv: str | Path,
    by_setting_csv: str | Path,
    comparison_csv: str | Path,
    table: str | Path,
    run_settings: str | Path,
    loss_vs_step: str | Path,
    loss_vs_time: str | Path,
    samples: str | Path,
    sweeps: Mapping[str, Mapping] | None = None,
    moe_plots: Mapping[str, Mapping[str, str | Path]] | None = None,
    reference: str | None = None,
) -> Summary:
    """Read every run and write the outputs at the paths given; return the three tables.

    `runs`: run -> {"history": metrics.jsonl, "config": config.json, "metrics": metrics.json, and
    from the workflow's run table "model", "setting", "seed", "sweep", "values"} (see
    records.read_run). `sweeps`: name -> {"plot": png, "keys": the swept keys, the first along x},
    for exactly the sweeps the runs name. `moe_plots`: run -> {"expert_load": png, "dropped": png},
    for exactly the runs whose log holds MoE statistics. `reference`: the setting the others are
    compared with (None: no comparison, an empty comparison_csv). Last, the sweep and MoE figures the
    previous summary wrote in loss_vs_step's folder and this one did not are deleted (remove_stale_figures).
    """
    if not runs:
        raise DataError("no runs to summarize: the run -> run files mapping is empty")
    records = [read_run(name, entry) for name, entry in runs.items()]
    sweeps = dict(sweeps or {})
    check_sweeps(records, sweeps)
    moe_plots = dict(moe_plots or {})
    moe_runs = sorted(r.name for r in records if is_moe_run(r))
    if sorted(moe_plots) != moe_runs:
        raise DataError(
            f"MoE plot paths were given for {sorted(moe_plots)}, but the runs with MoE statistics "
            f"are {moe_runs}; declare the plots for exactly the runs of models with ffn: moe"
        )
    by_run = runs_table(records)
    by_setting = by_setting_table(by_run)
    comparison = comparison_table(by_run, reference)

    plot_losses(records, "step", Path(loss_vs_step))
    plot_losses(records, "elapsed_sec", Path(loss_vs_time))
    for name, sweep in sweeps.items():
        plot_sweep(name, sweep["keys"], by_run, by_setting, Path(sweep["plot"]))
    logs = {r.name: r.log for r in records}
    for name, paths in moe_plots.items():
        if not len(logs[name].train):  # diverged before its first train line: nothing to plot
            for path in paths.values():
                plot_nothing_logged(name, logs[name], Path(path))
            continue
        plot_expert_load(name, logs[name].train, Path(paths["expert_load"]))
        plot_router_stats(name, logs[name].train, Path(paths["dropped"]))
    _write_text(Path(table), summary_html(by_run, by_setting, comparison))
    _write_text(Path(run_settings), run_settings_html(records))
    _write_text(Path(samples), samples_html(setting_samples(records)))
    for frame, path in ((by_run, runs_csv), (by_setting, by_setting_csv), (comparison, comparison_csv)):
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False)
        log.info("wrote %s", path)
    named = [*(s["plot"] for s in sweeps.values()), *(p for ps in moe_plots.values() for p in ps.values())]
    remove_stale_figures(Path(loss_vs_step).parent, named)
    return Summary(runs=by_run, by_setting=by_setting, comparison=comparison)


# In the plots folder: the names of the figures summarize last wrote there for a sweep or an MoE run.
FIGURES_RECORD = ".summarize-figures.json"


def remove_stale_figures(plots: Path, figures: Sequence[str | Path]) -> None:
    """Delete the sweep and MoE figures that the last summary in `plots` wrote (FIGURES_RECORD) and
    this one did not (`figures`): their sweep or run has left the config, and beside the new tables
    they would describe runs the summary no longer has. Then record `figures`. Files summarize did not
    write stay, whatever their names."""
    record = plots / FIGURES_RECORD
    names = sorted({Path(f).name for f in figures if Path(f).resolve().parent == plots.resolve()})
    try:
        before = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        before = []
    for name in before if isinstance(before, list) else []:
        if isinstance(name, str) and name not in names and Path(name).name == name:
            path = plots / name
            if path.is_file():
                path.unlink()
                log.info("removed %s: its sweep or run is no longer in the config", path)
    with atomic_open(record, "w", encoding="utf-8") as f:
        json.dump(names, f)


def is_moe_run(r: RunRecord) -> bool:
    """A run of an ffn: moe model (config.json), or one whose log holds MoE statistics; DataError for a
    MoE model whose train lines lack them."""
    moe = r.config.get("model_config", {}).get("ffn") == "moe"
    if moe and len(r.log.train) and not r.log.is_moe:
        raise DataError(f"run {r.name}: config.json says ffn: moe, but its train lines in metrics.jsonl hold "
                        f"no expert_load; rerun its training")
    return moe or r.log.is_moe


def check_sweeps(records: Sequence[RunRecord], sweeps: Mapping[str, Mapping]) -> None:
    """Every sweep a run names has a plot and the run its swept keys; every plot has runs."""
    for r in records:
        if r.sweep is None:
            continue
        if r.sweep not in sweeps:
            raise DataError(
                f"run {r.name} is in sweep {r.sweep!r}, which has no plot path; "
                f"give one under sweeps (rule summarize: output sweeps)"
            )
        keys = list(sweeps[r.sweep]["keys"])
        if sorted(r.values) != sorted(keys):
            raise DataError(
                f"run {r.name} has swept values for {sorted(r.values)}, but sweep "
                f"{r.sweep!r} sweeps {keys}"
            )
    named = {r.sweep for r in records}
    for name in sweeps:
        if name not in named:
            raise DataError(
                f"sweep {name!r} has a plot path but no runs; every sweep needs at least one run"
            )


def _write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    log.info("wrote %s", path)
