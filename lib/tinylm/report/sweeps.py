"""One figure per sweep: validation loss and bits per byte of each setting against the swept value."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError
from .plots import colours, new_figure, save_figure
from .records import is_number
from .tables import SWEPT

PANELS = (
    ("val_loss", "Validation loss", "nats/token"),
    ("val_bpb", "Validation bits per byte", "bits/byte"),
)
DODGE = (
    0.03  # series drawn this share of the x range apart, so that their error bars do not overlap
)


def value_text(value) -> str:
    """A swept value as written in a config (a table column of floats turns 64 into 64.0)."""
    return f"{value:g}" if is_number(value) else str(value)


def plot_sweep(
    name: str, keys: Sequence[str], runs: pd.DataFrame, by_setting: pd.DataFrame, path: Path
):
    """Sweep `name`: its settings against the first of `keys`, and save it; returns the figure.

    Each point is a setting's mean over its ok runs with the 95% t-interval of that mean as error
    bar; small circles are the runs themselves. Each combination of the other keys is one series.
    """
    rows = by_setting[by_setting["sweep"] == name]
    if rows.empty:
        raise DataError(f"sweep {name!r}: no runs to plot")
    x_key, others = keys[0], list(keys[1:])
    values = list(dict.fromkeys(rows[SWEPT + x_key]))
    numeric = all(is_number(v) for v in values)
    log_x = numeric and min(values) > 0 and max(values) / min(values) >= 3
    if numeric:
        values = sorted(values)

    def transformed(v):  # the x position, on the axis's own scale
        return math.log10(v) if log_x else float(v) if numeric else float(values.index(v))

    # the x range the series are dodged by a share of; one numeric value: the width _x_axis gives it
    span = (transformed(values[-1]) - transformed(values[0])) or (numeric and abs(float(values[0]))) or 1.0
    groups = list(rows.groupby([SWEPT + k for k in others], sort=False)) if others else [((), rows)]
    colour = colours([str(key) for key, _ in groups])
    fig, axes = new_figure(1, 2, (11.5, 4.6), sharex=True)
    for i, (group_key, group) in enumerate(groups):
        shift = (i - (len(groups) - 1) / 2) * DODGE * span
        group = group.assign(_t=[transformed(v) for v in group[SWEPT + x_key]]).sort_values("_t")
        xs = np.array(
            [
                _position(v, t + shift, shift, log_x, numeric)
                for v, t in zip(group[SWEPT + x_key], group["_t"], strict=True)
            ],
            dtype=float,
        )
        at = dict(zip(group["setting"], xs, strict=True))
        label = (
            ", ".join(
                f"{k}={value_text(v)}"
                for k, v in zip(others, np.atleast_1d(group_key), strict=True)
            )
            or None
        )
        single = runs[runs["setting"].isin(at) & (runs["status"] == "ok")]
        for ax, (key, _, _) in zip(axes[0], PANELS, strict=True):
            ax.errorbar(
                xs,
                group[f"{key}_mean"].to_numpy(dtype=float),
                yerr=group[f"{key}_ci95"].to_numpy(dtype=float),
                color=colour[str(group_key)],
                marker="o",
                ms=6,
                capsize=4,
                lw=1.3,
                label=label,
            )
            ax.scatter(
                single["setting"].map(at),
                single[key],
                s=16,
                facecolors="none",
                edgecolors=colour[str(group_key)],
                alpha=0.7,
                lw=0.8,
                zorder=3,
            )
    for ax, (_, title, unit) in zip(axes[0], PANELS, strict=True):
        _x_axis(ax, values, log_x, numeric)
        ax.set_xlabel(x_key)
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if others:
            ax.legend(fontsize="small")
    models = ", ".join(dict.fromkeys(rows["model"]))
    fig.suptitle(
        f"Sweep {name} ({models}): the best checkpoint's validation numbers against {x_key}"
    )
    fig.supxlabel(_note(rows, runs[runs["sweep"] == name]), fontsize=9)
    save_figure(fig, path)
    return fig


def _position(value, t: float, shift: float, log_x: bool, numeric: bool) -> float:
    """x of a point: the value itself unless dodged (the log axis's value back from its exponent)."""
    if shift == 0:
        return float(value) if numeric else t
    return 10**t if log_x else t


def _x_axis(ax, values: list, log_x: bool, numeric: bool) -> None:
    """Ticks at the swept values, labelled with them."""
    from matplotlib.ticker import NullLocator

    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
    positions = [float(v) for v in values] if numeric else list(range(len(values)))
    ax.set_xticks(positions, [value_text(v) for v in values])
    if not numeric or len(values) == 1:
        lo, hi = positions[0], positions[-1]
        pad = 0.5 if not numeric else abs(lo) * 0.5 or 0.5
        ax.set_xlim(lo - pad, hi + pad)


def _note(rows: pd.DataFrame, runs: pd.DataFrame) -> str:
    """What the marks mean and which runs were left out, wrapped under the panels."""
    lo, hi = int(rows["n"].min()), int(rows["n"].max())
    n = f"n = {lo}" if lo == hi else f"n = {lo} to {hi}"
    text = (
        f"Points: mean over seeds ({n} ok runs each); bars: 95% Student-t interval of the mean "
        f"(none with one run); circles: the runs."
    )
    left_out = runs[runs["status"] != "ok"]
    if len(left_out):
        text += (
            " Left out: "
            + ", ".join(
                f"{r} ({s})" for r, s in zip(left_out["run"], left_out["status"], strict=True)
            )
            + "."
        )
    return "\n".join(textwrap.wrap(text, 130, break_on_hyphens=False))
