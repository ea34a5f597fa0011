"""The summary's figures: loss curves, MoE expert load and router statistics (PNG, Agg canvas)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from ..io import atomic_path
from .records import RunLog

log = logging.getLogger(__name__)


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


def time_unit(max_sec: float) -> tuple[float, str]:
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
        scale, unit = time_unit(max(r.train["elapsed_sec"].max() for r in runs.values()))
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
