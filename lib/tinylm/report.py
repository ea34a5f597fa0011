"""The cross-model summary (rule summarize): table, loss curves, MoE routing plots, sample pages.

Inputs per run: metrics.jsonl (the training log; see tinylm.runlog) and metrics.json (the evaluation;
see tinylm.evaluate). Outputs, each at the path the caller gives (rule summarize lists them), all
written atomically:

    csv              one row per model (SUMMARY_COLUMNS)
    table, samples   self-contained HTML pages for the Snakemake report: the table, the samples
    loss_vs_step     training and validation loss against step, every model
    loss_vs_time     the same against training wall-clock time
    moe_plots        per MoE run: expert_load (load per layer and expert), dropped (drops, router losses)
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from .errors import DataError
from .io import atomic_open, atomic_path, read_json

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = [
    "model",
    "n_params",
    "best_step",
    "val_loss",
    "val_ppl",
    "val_bpb",
    "test_loss",
    "test_ppl",
    "test_bpb",
    "train_tokens_per_sec",
    "train_wall_sec",
]
# Keys each metrics.jsonl line of a kind must carry; lines of other kinds are skipped.
LOG_KEYS = {
    "train": ("step", "ce_loss", "elapsed_sec"),
    "eval": ("step", "val_loss", "elapsed_sec"),
}
MOE_KEYS = ("expert_load", "dropped_frac", "balance_loss", "z_loss")


class RunLog(NamedTuple):
    """One run's metrics.jsonl: train and eval lines, one per step, sorted by step."""

    train: pd.DataFrame
    val: pd.DataFrame

    @property
    def is_moe(self) -> bool:
        return "expert_load" in self.train.columns


# -- reading ---------------------------------------------------------------------------------------


def read_metrics_log(path: str | Path) -> RunLog:
    """Parse metrics.jsonl; after a resume the last line logged for a (kind, step) wins."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; train the model first (rule train_model)")
    rows: dict[str, dict[int, dict]] = {kind: {} for kind in LOG_KEYS}
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, 1):
            if text.strip():
                line = _parse_line(text, f"{path}, line {lineno}")
                if line is not None:
                    rows[line["kind"]][line["step"]] = line
    if not rows["train"]:
        raise DataError(
            f"{path}: no training lines; is the run finished? Delete the run folder to retrain"
        )
    train = pd.DataFrame([rows["train"][s] for s in sorted(rows["train"])])
    val = pd.DataFrame([rows["eval"][s] for s in sorted(rows["eval"])], columns=LOG_KEYS["eval"])
    _check_moe_columns(train, path)
    return RunLog(train=train, val=val)


def _parse_line(text: str, where: str) -> dict | None:
    try:
        line = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e}); fix or remove the line") from e
    if not isinstance(line, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(line).__name__}")
    if line.get("kind") not in LOG_KEYS:
        return None
    for key in LOG_KEYS[line["kind"]]:
        value = line.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise DataError(
                f"{where}: {line['kind']} line needs a number for {key!r}, got {value!r}"
            )
    return line


def _check_moe_columns(train: pd.DataFrame, path: Path) -> None:
    """Either no training line has MoE keys or all do, with one (layers, experts) shape."""
    present = [key for key in MOE_KEYS if key in train.columns]
    if not present:
        return
    incomplete = [key for key in MOE_KEYS if key not in train.columns or train[key].isna().any()]
    if incomplete:
        raise DataError(f"{path}: some training lines lack MoE key(s) {', '.join(incomplete)}")
    shapes = {_shape(load) for load in train["expert_load"]}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise DataError(
            f"{path}: expert_load must be [layers][experts] with one shape on every line, got "
            + ", ".join(sorted(map(str, shapes)))
        )


def _shape(value) -> tuple | str:
    try:
        return np.array(value, dtype=float).shape
    except (TypeError, ValueError):
        return "ragged"


def read_run_metrics(path: str | Path, model: str) -> dict:
    """metrics.json of `model`, checked for the keys the summary and the samples page use."""
    metrics = read_json(path)
    if not isinstance(metrics, dict):
        raise DataError(f"{path}: expected a JSON object")
    missing = [key for key in [*SUMMARY_COLUMNS, "samples"] if key not in metrics]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)}; rerun rule evaluate_model")
    if metrics["model"] != model:
        raise DataError(f"{path}: holds model {metrics['model']!r}, expected {model!r}")
    samples = metrics["samples"]
    if not isinstance(samples, list) or not all(
        isinstance(s, dict)
        and isinstance(s.get("prompt"), str)
        and isinstance(s.get("completion"), str)
        for s in samples
    ):
        raise DataError(f"{path}: 'samples' must be a list of {{'prompt': str, 'completion': str}}")
    return metrics


def summary_table(metrics: Mapping[str, dict]) -> pd.DataFrame:
    """One row per model, in the given order; missing numbers (e.g. no timing) become NaN."""
    table = pd.DataFrame([{key: m[key] for key in SUMMARY_COLUMNS} for m in metrics.values()])
    numeric = SUMMARY_COLUMNS[1:]
    table[numeric] = table[numeric].apply(pd.to_numeric, errors="coerce")
    return table


# -- plots -----------------------------------------------------------------------------------------


def _figure(nrows: int, ncols: int, size: tuple[float, float], **kwargs):
    """A Figure on the Agg canvas (no pyplot: no global state, nothing left open)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kwargs)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    log.info("wrote %s", path)


def _time_unit(max_sec: float) -> tuple[float, str]:
    """Seconds, minutes or hours, whichever keeps the axis numbers short."""
    if max_sec >= 3 * 3600:
        return 3600.0, "h"
    if max_sec >= 300:
        return 60.0, "min"
    return 1.0, "s"


def plot_losses(runs: Mapping[str, RunLog], x: str, path: Path) -> None:
    """Training (left) and validation (right) loss of every model against `x` (step or elapsed_sec)."""
    fig, axes = _figure(1, 2, (11, 4.5), sharex=True, sharey=True)
    ax_train, ax_val = axes[0]
    scale, unit = 1.0, ""
    if x == "elapsed_sec":
        scale, unit = _time_unit(max(r.train["elapsed_sec"].max() for r in runs.values()))
    for i, (model, run) in enumerate(runs.items()):
        colour = f"C{i % 10}"
        ax_train.plot(run.train[x] / scale, run.train["ce_loss"], color=colour, lw=1.2, label=model)
        if len(run.val):
            ax_val.plot(
                run.val[x] / scale, run.val["val_loss"], color=colour, marker=".", label=model
            )
            best = run.val["val_loss"].idxmin()
            ax_val.plot(
                run.val[x][best] / scale, run.val["val_loss"][best], color=colour, marker="*", ms=12
            )
    xlabel = "training step" if x == "step" else f"training wall-clock time ({unit})"
    losses = np.concatenate(
        [np.concatenate([r.train["ce_loss"], r.val["val_loss"]]) for r in runs.values()]
    )
    for ax, title in (
        (ax_train, "Training loss"),
        (ax_val, "Validation loss (★ = best checkpoint)"),
    ):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        scale = loss_axis(ax, losses)
        ax.legend(title="model")
    ax_train.set_ylabel(f"cross-entropy (nats/token, {scale} scale)")
    fig.suptitle("Loss against " + ("training step" if x == "step" else "training wall-clock time"))
    _save(fig, path)


def loss_axis(ax, losses) -> str:
    """Log y with plain numbers on 4 to 12 ticks when the losses span a factor of 3, else linear.

    Returns "log" or "linear" for the axis label. Losses from ln(vocab) down to the final loss span
    about a factor of 5: log scale keeps the late, flat part readable.
    """
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    lo, hi = float(np.nanmin(losses)), float(np.nanmax(losses))
    ax.grid(True, which="both", alpha=0.3)
    if not (lo > 0 and hi / lo >= 3):
        return "linear"
    ax.set_yscale("log")
    # Within a decade the finer steps give at least 4 ticks; over more they would crowd.
    subs = (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8) if hi / lo < 10 else (1, 1.5, 2, 3, 4, 6, 8)
    ax.yaxis.set_major_locator(LogLocator(subs=subs))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    return "log"


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges around sorted centres (steps need not be evenly spaced)."""
    if len(centres) == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    mid = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - mid[0]], mid, [2 * centres[-1] - mid[-1]]])


def plot_expert_load(model: str, train: pd.DataFrame, path: Path) -> None:
    """Heatmap per layer of each expert's share of routed tokens over training (white = uniform)."""
    from matplotlib.colors import TwoSlopeNorm

    load = np.array(train["expert_load"].tolist(), dtype=float)  # (steps, layers, experts)
    _, n_layers, n_experts = load.shape
    ncols = min(n_layers, 3)
    nrows = math.ceil(n_layers / ncols)
    fig, axes = _figure(
        nrows, ncols, (4.2 * ncols + 1.2, 2.6 * nrows + 0.9), sharex=True, sharey=True
    )
    uniform = 1 / n_experts
    norm = TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=max(2 * uniform, float(load.max())))
    x_edges = _edges(train["step"].to_numpy(dtype=float))
    y_edges = np.arange(n_experts + 1) - 0.5
    for layer, ax in enumerate(axes.flat):
        if layer >= n_layers:
            ax.set_visible(False)
            continue
        mesh = ax.pcolormesh(x_edges, y_edges, load[:, layer, :].T, cmap="RdBu_r", norm=norm)
        ax.set_title(f"layer {layer}")
        if n_experts <= 16:
            ax.set_yticks(range(n_experts))
    fig.colorbar(mesh, ax=axes, label=f"share of kept token assignments (uniform = 1/{n_experts})")
    fig.supxlabel("training step")
    fig.supylabel("expert")
    fig.suptitle(f"{model}: expert load per layer (red = overloaded, blue = underused)")
    _save(fig, path)


def plot_router_stats(model: str, train: pd.DataFrame, path: Path) -> None:
    """Dropped fraction, load-balancing loss and router z-loss of an MoE run against step."""
    n_layers = len(train["expert_load"].iloc[0])
    fig, axes = _figure(3, 1, (8, 7.5), sharex=True)
    panels = (
        (
            "dropped_frac",
            100.0,
            "dropped (%)",
            "Token assignments dropped at expert capacity (mean over layers)",
        ),
        (
            "balance_loss",
            1.0,
            "balance loss",
            f"Load-balancing loss, summed over {n_layers} layers, unweighted",
        ),
        ("z_loss", 1.0, "z-loss", f"Router z-loss, summed over {n_layers} layers, unweighted"),
    )
    for ax, (key, scale, ylabel, title) in zip(axes[:, 0], panels, strict=True):
        ax.plot(train["step"], train[key] * scale, color="C3", lw=1.2, label="logged")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    # Each layer's balance loss is 1 when routing is uniform, so the sum's floor is n_layers.
    axes[1, 0].axhline(n_layers, color="0.4", ls="--", lw=1, label=f"uniform routing ({n_layers})")
    axes[1, 0].legend()
    axes[-1, 0].set_xlabel("training step")
    fig.suptitle(f"{model}: dropped tokens and router losses")
    _save(fig, path)


# -- HTML pages ------------------------------------------------------------------------------------

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 0.35em 0.6em; vertical-align: top; text-align: left; }}
th {{ background: #f0f0f0; }}
td.text {{ white-space: pre-wrap; max-width: 32em; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
</style>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"""


def _table_page(title: str, note: str, head: str, rows: list[str]) -> str:
    """A standalone page: title, a note, and one table (cells already escaped)."""
    body = (
        f"<p>{html.escape(note)}</p>\n<table>\n<tr>{head}</tr>\n" + "\n".join(rows) + "\n</table>"
    )
    return _PAGE.format(title=html.escape(title), body=body)


def summary_html(table: pd.DataFrame) -> str:
    """The summary table as a standalone page: rounded numbers, units in two-line headers.

    It fits the report's pane in a 1400-pixel window; summary.csv keeps every column (perplexity
    too) at full precision.
    """
    time_scale, time_unit = _time_unit(table["train_wall_sec"].max())
    columns = [  # (column of `table`, header lines, format)
        ("n_params", ("parameters", "(millions)"), lambda v: f"{v / 1e6:.3g}"),
        ("best_step", ("best", "step"), "{:,.0f}".format),
        ("val_loss", ("val loss", "(nats/token)"), "{:.3f}".format),
        ("val_bpb", ("val bpb", "(bits/byte)"), "{:.3f}".format),
        ("test_loss", ("test loss", "(nats/token)"), "{:.3f}".format),
        ("test_bpb", ("test bpb", "(bits/byte)"), "{:.3f}".format),
        ("train_tokens_per_sec", ("speed", "(k tokens/s)"), lambda v: f"{v / 1e3:,.1f}"),
        ("train_wall_sec", ("train time", f"({time_unit})"), lambda v: f"{v / time_scale:,.1f}"),
    ]
    head = "<th>model</th>" + "".join(
        f"<th>{'<br>'.join(map(html.escape, lines))}</th>" for _, lines, _ in columns
    )
    rows = []
    for record in table.to_dict("records"):
        cells = [f"<th>{html.escape(str(record['model']))}</th>"]
        for col, _, fmt in columns:
            text = "n/a" if pd.isna(record[col]) else fmt(record[col])
            cells.append(f'<td class="num">{text}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    note = (
        "Losses are cross-entropy in nats per token, bpb is bits per byte of text. Rounded here; "
        "summary.csv has every column at full precision, perplexity (exp(loss)) too."
    )
    return _table_page("Model summary", note, head, rows)


def sample_text(completion: str) -> str:
    """A completion as shown: no trailing whitespace, runs of blank lines cut to one."""
    return re.sub(r"\n[ \t]*\n(?:[ \t]*\n)+", "\n\n", completion.rstrip())


def samples_html(metrics: Mapping[str, dict]) -> str:
    """One row per prompt, one column per model's completion, all text HTML-escaped."""
    completions = {
        model: {s["prompt"]: s["completion"] for s in m["samples"]} for model, m in metrics.items()
    }
    prompts = list(dict.fromkeys(p for by_prompt in completions.values() for p in by_prompt))
    head = "<th>prompt</th>" + "".join(f"<th>{html.escape(model)}</th>" for model in completions)
    rows = []
    for prompt in prompts:
        cells = [f'<td class="text"><b>{html.escape(prompt)}</b></td>']
        for by_prompt in completions.values():
            text = by_prompt.get(prompt)
            if text is not None:
                text = f"<b>{html.escape(prompt)}</b>{html.escape(sample_text(text))}"
            cells.append(f'<td class="text">{text or ""}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    note = "Each cell is the prompt (bold) and its continuation by the model's best checkpoint."
    return _table_page("Generated samples", note, head, rows)


def _write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    log.info("wrote %s", path)


# -- the whole step --------------------------------------------------------------------------------


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
        raise DataError(f"MoE plot paths were given for {sorted(moe_plots)}, but the runs with MoE statistics "
                        f"are {moe_runs}; declare the plots for exactly the models with ffn: moe")
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
