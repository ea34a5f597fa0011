"""The summary's figures (PNG, drawn on the Agg canvas): loss curves per setting, and per MoE run its
expert load and router statistics. Sweep plots: tinylm.report.sweeps."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..io import atomic_path
from .records import RunRecord
from .tables import time_unit

log = logging.getLogger(__name__)


def new_figure(nrows: int, ncols: int, size: tuple[float, float], **kwargs):
    """A Figure on the Agg canvas (no pyplot: no global state, nothing left open)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kwargs)


def save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    log.info("wrote %s", path)


def colours(names: Sequence[str]) -> dict[str, str]:
    """One colour per name: matplotlib's ten, tab20's twenty when there are more, and beyond twenty
    as many points spread along turbo (tab20's would repeat)."""
    if len(names) <= 10:
        return {name: f"C{i}" for i, name in enumerate(names)}
    from matplotlib import colormaps

    if len(names) <= 20:
        return {name: colormaps["tab20"](i) for i, name in enumerate(names)}
    return {name: colormaps["turbo"](i / (len(names) - 1)) for i, name in enumerate(names)}


def across_runs(frames: Sequence[pd.DataFrame], x: str, key: str):
    """x, mean, min and max of `key` over the runs, at every step one of them logged; x is the step
    or, for a time, its mean over the runs.

    Runs need not log at the same steps (a seed added after log_every changed; changing it retrains
    no finished run): each run is interpolated linearly onto that grid within the steps it logged,
    and counts nowhere outside them (a run that stopped early ends its part of the band).
    """
    cleaned = [f[["step", key] + ([x] if x != "step" else [])].dropna().drop_duplicates("step", keep="last")
               .sort_values("step") for f in frames]
    cleaned = [f for f in cleaned if len(f)]  # a run that logged none of `key` adds nothing
    if not cleaned:
        return (np.empty(0),) * 4
    steps = np.unique(np.concatenate([f["step"].to_numpy(dtype=float) for f in cleaned]))

    def on_grid(col: str) -> np.ndarray:  # (runs, steps), NaN outside each run's own steps
        rows = []
        for f in cleaned:
            s, v = f["step"].to_numpy(dtype=float), f[col].to_numpy(dtype=float)
            row = np.interp(steps, s, v)
            row[(steps < s[0]) | (steps > s[-1])] = np.nan
            rows.append(row)
        return np.vstack(rows)

    ys = on_grid(key)
    xs = steps if x == "step" else np.nanmean(on_grid(x), axis=0)
    return xs, np.nanmean(ys, axis=0), np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)


def plot_losses(records: Sequence[RunRecord], x: str, path: Path):
    """Training (left) and validation (right) loss of each setting against `x` (step or elapsed_sec),
    and save it; returns the figure.

    One line per setting: the mean over its ok runs, in a band from their minimum to their maximum.
    A run that is not ok is drawn on its own, dashed, and named in the legend; the y axis fits the ok
    runs where there are any.
    """
    fig, axes = new_figure(1, 2, (12, 4.8), sharex=True, sharey=True)
    ax_train, ax_val = axes[0]
    settings = list(dict.fromkeys(r.setting for r in records))
    colour = colours(settings)
    scale, unit = 1.0, ""
    if x == "elapsed_sec":
        scale, unit = time_unit(
            max((r.log.train["elapsed_sec"].max() for r in records if len(r.log.train)), default=0.0)
        )
    losses = []
    for setting in settings:
        logs = [r.log for r in records if r.setting == setting and r.status == "ok"]
        if not logs:
            continue
        for ax, frames, key in (
            (ax_train, [g.train for g in logs], "ce_loss"),
            (ax_val, [g.val for g in logs if len(g.val)], "val_loss"),
        ):
            if not frames:
                continue
            xs, mean, lo, hi = across_runs(frames, x, key)
            ax.plot(
                xs / scale,
                mean,
                color=colour[setting],
                lw=1.4,
                label=setting,
                marker="." if ax is ax_val else None,
            )
            if len(frames) > 1:
                ax.fill_between(xs / scale, lo, hi, color=colour[setting], alpha=0.2, lw=0)
            if ax is ax_val:
                best = int(np.nanargmin(mean))
                ax.plot(xs[best] / scale, mean[best], color=colour[setting], marker="*", ms=12)
            losses.append(np.concatenate([lo, hi]))
    # The axes fit the ok runs: a run that diverged may have logged losses of 1e12 on its way, which
    # would flatten every other curve; it is drawn as far as it stays within them.
    fit_others = not losses
    for r in records:
        if r.status == "ok":
            continue
        label = f"{r.name} ({r.status})"
        # a line through one point draws nothing: a run that stopped after one log line gets a marker
        ax_train.plot(
            r.log.train[x] / scale,
            r.log.train["ce_loss"],
            color=colour[r.setting],
            ls="--",
            lw=1,
            label=label,
            marker="x" if len(r.log.train) == 1 else None,
        )
        ax_val.plot(
            r.log.val[x] / scale,
            r.log.val["val_loss"],
            color=colour[r.setting],
            ls="--",
            lw=1,
            marker="x" if len(r.log.val) == 1 else None,
        )
        if fit_others:
            losses.append(np.concatenate([r.log.train["ce_loss"], r.log.val["val_loss"]]))
    xlabel = "training step" if x == "step" else f"training wall-clock time ({unit})"
    losses = np.concatenate(losses) if losses else np.array([1.0])
    for ax, title in ((ax_train, "Training loss"), (ax_val, "Validation loss (★ = lowest mean)")):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        axis = loss_axis(ax, losses)
    fit_losses(ax_train, losses)  # the axes share y
    ax_train.set_ylabel(f"cross-entropy (nats/token, {axis} scale)")
    handles, labels = ax_train.get_legend_handles_labels()
    fig.legend(
        handles,
        [wrap_name(label) for label in labels],
        loc="outside right upper",
        title="setting: mean over seeds,\nband from min to max",
        fontsize="small",
    )
    fig.suptitle("Loss against " + ("training step" if x == "step" else "training wall-clock time"))
    save_figure(fig, path)
    return fig


def wrap_name(name: str, width: int = 28) -> str:
    """A run or setting name in lines of about `width` characters, broken after hyphens: a sweep's
    long names would otherwise take the figure's width from its panels."""
    lines = [""]
    for part in re.split(r"(?<=-)", name):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


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


def fit_losses(ax, losses) -> None:
    """y limits around the finite `losses` with a margin, on the axis's scale (after loss_axis)."""
    finite = np.asarray(losses, dtype=float)
    finite = finite[np.isfinite(finite)]
    if not len(finite):
        return
    lo, hi = float(finite.min()), float(finite.max())
    if ax.get_yscale() == "log":
        pad = (hi / lo) ** 0.05
        ax.set_ylim(lo / pad, hi * pad)
    else:
        pad = 0.05 * (hi - lo) or 0.05 * abs(hi) or 0.05
        ax.set_ylim(lo - pad, hi + pad)


def plot_nothing_logged(run: str, log, path: Path) -> None:
    """In place of a MoE run's statistics plot when it logged no train line (it diverged first)."""
    why = f"it diverged at step {log.diverged['step']}" if log.diverged else "it stopped"
    fig, axes = new_figure(1, 1, (6.4, 2.4))
    ax = axes[0][0]
    ax.set_axis_off()
    ax.text(0.5, 0.5, f"{run}: no MoE statistics were logged;\n{why} before its first train line "
            f"(train.log_every)", ha="center", va="center", wrap=True)
    save_figure(fig, path)


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
    fig, axes = new_figure(
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
    fig.colorbar(mesh, ax=axes, label=f"share of routed token assignments (kept or dropped) (uniform = 1/{n_experts})")
    fig.supxlabel("training step")
    fig.supylabel("expert")
    fig.suptitle(f"{model}: expert load per layer (red = overloaded, blue = underused)")
    save_figure(fig, path)


def plot_router_stats(model: str, train: pd.DataFrame, path: Path) -> None:
    """Dropped fraction, load-balancing loss and router z-loss of an MoE run against step."""
    n_layers = len(train["expert_load"].iloc[0])
    fig, axes = new_figure(3, 1, (8, 7.5), sharex=True)
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
    # Each layer's balance loss is 1 when routing is uniform: the line marks the sum's value there,
    # n_layers. Not a floor: uneven routing can score below it (top-1, 2 experts: 6 of 10 tokens at
    # probability 0.5025 on one, 4 at 1.0 on the other give 0.92).
    axes[1, 0].axhline(n_layers, color="0.4", ls="--", lw=1, label=f"uniform routing ({n_layers})")
    axes[1, 0].legend()
    axes[-1, 0].set_xlabel("training step")
    fig.suptitle(f"{model}: dropped tokens and router losses")
    save_figure(fig, path)
