"""The comparison figures on a fabricated sweep: loss curves per setting, sweep plots with error bars."""

import json
from pathlib import Path

import fake_runs
import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer

from tinylm.report import summarize_runs
from tinylm.report.plots import colours, plot_losses
from tinylm.report.records import read_run
from tinylm.report.sweeps import plot_sweep

LRS, WIDTHS = (0.001, 0.003), (64, 128)


def sweep_runs(root: Path) -> dict[str, dict]:
    """condor alone over 2 seeds; sweep "lr": 2 rates x 2 seeds; sweep "grid": 2 rates x 2 widths
    x 3 seeds, one of them diverged."""
    entries = {}

    def add(setting, seed, sweep, values, floor, **kwargs):
        run = f"{setting}-seed{seed}"
        run_dir = fake_runs.write_fake_run(root / run, run, seed=seed, floor=floor, **kwargs)
        entries[run] = {
            "history": run_dir / "metrics.jsonl",
            "metrics": run_dir / "metrics.json",
            "config": run_dir / "config.json",
            "model": "condor",
            "setting": setting,
            "seed": seed,
            "sweep": sweep,
            "values": values,
        }

    for seed in (1, 2):
        add("condor", seed, None, {}, 1.9)
    for lr in LRS:
        for seed in (1, 2):
            add(f"condor-lr{lr}", seed, "lr", {"lr": lr}, 1.8 + 20 * lr, train_config={"lr": lr})
    for lr in LRS:
        for width in WIDTHS:
            for seed in (1, 2, 3):
                diverge = 150 if (lr, width, seed) == (0.003, 128, 3) else None
                add(
                    f"condor-d_model{width}-lr{lr}",
                    seed,
                    "grid",
                    {"lr": lr, "d_model": width},
                    2.2 - width / 400 + 20 * lr,
                    diverge_at=diverge,
                )
    return entries


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweeps")
    entries = sweep_runs(root / "runs")
    plots = root / "plots"
    sweeps = {
        "lr": {"plot": plots / "sweep_lr.png", "keys": ["lr"]},
        "grid": {"plot": plots / "sweep_grid.png", "keys": ["lr", "d_model"]},
    }
    result = summarize_runs(entries, **fake_runs.summary_outputs(root, moe=()), sweeps=sweeps)
    return root, entries, result


def errorbars(ax) -> list[ErrorbarContainer]:
    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def test_sweep_plot_has_one_point_per_value_with_95_percent_error_bars(summary, tmp_path):
    _, _, result = summary
    fig = plot_sweep("lr", ["lr"], result.runs, result.by_setting, tmp_path / "lr.png")
    rows = result.by_setting[result.by_setting["sweep"] == "lr"]
    ax_loss, ax_bpb = fig.axes[:2]
    for ax, key in ((ax_loss, "val_loss"), (ax_bpb, "val_bpb")):
        (bars,) = errorbars(ax)
        line, _, (segments,) = bars.lines
        assert list(line.get_xdata()) == list(LRS)
        np.testing.assert_allclose(line.get_ydata(), rows[f"{key}_mean"])
        spans = [seg[1, 1] - seg[0, 1] for seg in segments.get_segments()]
        np.testing.assert_allclose(spans, 2 * rows[f"{key}_ci95"])
        assert ax.get_xlabel() == "lr"
    assert (tmp_path / "lr.png").read_bytes().startswith(b"\x89PNG")


def test_sweep_over_two_keys_has_one_series_per_other_value(summary, tmp_path):
    _, _, result = summary
    fig = plot_sweep("grid", ["lr", "d_model"], result.runs, result.by_setting, tmp_path / "g.png")
    series = errorbars(fig.axes[0])
    assert [c.get_label() for c in series] == [f"d_model={w}" for w in WIDTHS]
    for c in series:
        xs = c.lines[0].get_xdata()
        assert len(xs) == len(LRS)
        np.testing.assert_allclose(xs, LRS, rtol=0.1)  # dodged a little apart, still at their value
    note = " ".join(fig._supxlabel.get_text().split())
    assert "condor-d_model128-lr0.003-seed3 (diverged)" in note and "n = 2 to 3" in note


def test_a_sweep_with_one_value_along_x_keeps_its_series_in_view(summary, tmp_path):
    # grid {lr: [0.001], d_model: [64, 128]}: the series were dodged by 3% of a unit span (0.03), not of
    # the axis, and both points fell outside the axis drawn around 0.001: an empty plot.
    _, _, result = summary
    by_setting = result.by_setting[result.by_setting["swept.lr"] == 0.001]
    fig = plot_sweep("grid", ["lr", "d_model"], result.runs, by_setting, tmp_path / "g.png")
    for ax in fig.axes[:2]:
        lo, hi = ax.get_xlim()
        series = errorbars(ax)
        assert len(series) == len(WIDTHS)
        for c in series:
            (x,) = c.lines[0].get_xdata()
            assert lo < x < hi and x == pytest.approx(0.001, rel=0.1)


def test_loss_curves_have_one_mean_line_and_band_per_setting(summary, tmp_path):
    _, entries, result = summary
    records = [read_run(run, entry) for run, entry in entries.items()]
    fig = plot_losses(records, "step", tmp_path / "loss.png")
    ax_train = fig.axes[0]
    settings = list(dict.fromkeys(result.runs["setting"]))
    labels = [
        line.get_label() for line in ax_train.get_lines() if not line.get_label().startswith("_")
    ]
    assert labels == [*settings, "condor-d_model128-lr0.003-seed3 (diverged)"]
    assert len(ax_train.collections) == len(
        settings
    )  # a min-max band each: every setting has >= 2 runs
    mean = ax_train.get_lines()[0]
    steps = records[0].log.train["step"]
    both = (
        records[0].log.train["ce_loss"].to_numpy() + records[1].log.train["ce_loss"].to_numpy()
    ) / 2
    np.testing.assert_allclose(mean.get_xdata(), steps)
    np.testing.assert_allclose(mean.get_ydata(), both)


def test_long_setting_names_leave_the_loss_panels_their_width(tmp_path):
    # A sweep over several keys names its settings at length; unwrapped in the legend beside the
    # panels, such a name squeezed each panel to a sixth of the figure and ran under its title.
    setting = "falcon-aux_loss_coef0.01-capacity_factor1.25-d_ff_expert512-lr0.001-warmup_steps20"
    records = []
    for seed in (1, 2, 3):
        run = f"{setting}-seed{seed}"
        run_dir = fake_runs.write_fake_run(tmp_path / run, run, seed=seed, diverge_at=150 if seed == 3 else None)
        records.append(read_run(run, {"history": run_dir / "metrics.jsonl", "metrics": run_dir / "metrics.json",
                                      "config": run_dir / "config.json", "setting": setting, "seed": seed}))
    fig = plot_losses(records, "step", tmp_path / "loss.png")
    fig.canvas.draw()
    assert all(ax.get_position().width > 0.3 for ax in fig.axes[:2])
    assert fig._suptitle.get_window_extent().x1 < fig.legends[0].get_window_extent().x0
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert [label.replace("\n", "") for label in labels] == [setting, f"{setting}-seed3 (diverged)"]


@pytest.mark.parametrize("n", [3, 10, 20, 27, 60])
def test_every_setting_gets_a_colour_of_its_own(n):
    # A 3 x 3 x 3 sweep has 27 settings: tab20's colours repeated from the 21st on, and the 21st
    # setting's curve looked like the first's.
    from matplotlib.colors import to_hex

    names = [f"condor-{i}" for i in range(n)]
    assert len({to_hex(c) for c in colours(names).values()}) == n


def test_sweep_pngs_are_written_where_asked(summary):
    root, _, _ = summary
    for name in ("sweep_lr.png", "sweep_grid.png", "loss_vs_step.png", "loss_vs_time.png"):
        data = (root / "plots" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000


def test_seeds_logged_at_different_steps_average_into_one_smooth_curve():
    """A seed added after log_every changed logs at other steps than the finished ones (changing
    log_every retrains nothing). The mean over seeds is taken on one grid, each run interpolated
    within the steps it ran, not step by step over whichever runs logged that step."""
    import pandas as pd

    from tinylm.report.plots import across_runs

    a = pd.DataFrame({"step": np.arange(10, 71, 10)})  # every 10 steps
    b = pd.DataFrame({"step": np.arange(7, 64, 7)})  # every 7, to step 63
    for f, offset in ((a, 2.0), (b, 1.0)):
        f["ce_loss"] = offset - f["step"] / 100
        f["elapsed_sec"] = f["step"] * 0.5
    xs, mean, lo, hi = across_runs([a, b], "step", "ce_loss")
    both = (xs >= 10) & (xs <= 63)  # where both runs ran
    assert set(xs) == set(a["step"]) | set(b["step"])
    np.testing.assert_allclose(mean[both], 1.5 - xs[both] / 100)
    np.testing.assert_allclose(lo[both], 1.0 - xs[both] / 100)
    np.testing.assert_allclose(hi[both], 2.0 - xs[both] / 100)
    np.testing.assert_allclose(mean[xs == 7], [0.93])  # before a's first line: b alone
    np.testing.assert_allclose(mean[xs == 70], [1.3])  # after b's last line: a alone
    xt, *_ = across_runs([a, b], "elapsed_sec", "ce_loss")
    np.testing.assert_allclose(xt, xs * 0.5)
    none = a.iloc[:0]  # a run with no lines adds nothing
    np.testing.assert_allclose(across_runs([a, none, b], "step", "ce_loss")[1], mean)


def test_a_null_grid_value_is_a_value_of_its_own_in_tables_and_sweep_plots(tmp_path):
    # grid {train.eval_rows: [null, 32], train.batch_size: [4, 8]}: null (the whole split) must not
    # read as "not swept" (an empty cell, a NaN the plot drops) and 32 must stay 32, not 32.0.
    entries = {}
    for rows in (None, 32):
        for batch in (4, 8):
            setting = f"condor-batch_size{batch}-eval_rows{'null' if rows is None else rows}"
            for seed in (1, 2):
                run = f"{setting}-seed{seed}"
                run_dir = fake_runs.write_fake_run(tmp_path / "runs" / run, run, seed=seed, floor=1.9 + seed / 100)
                entries[run] = {"history": run_dir / "metrics.jsonl", "metrics": run_dir / "metrics.json",
                                "config": run_dir / "config.json", "model": "condor", "setting": setting,
                                "seed": seed, "sweep": "s", "values": {"eval_rows": rows, "batch_size": batch}}
    entries["condor"] = {**entries["condor-batch_size4-eval_rows32-seed1"], "setting": "condor", "seed": 1,
                         "sweep": None, "values": {}}
    entries["condor"]["history"] = fake_runs.write_fake_run(tmp_path / "runs" / "condor", "condor", seed=1,
                                                            floor=1.9) / "metrics.jsonl"
    for key in ("metrics", "config"):
        entries["condor"][key] = entries["condor"]["history"].with_name(f"{key}.json")
    for order in (["eval_rows", "batch_size"], ["batch_size", "eval_rows"]):
        sweeps = {"s": {"plot": tmp_path / "plots" / "s.png", "keys": order}}
        result = summarize_runs(entries, **fake_runs.summary_outputs(tmp_path, moe=()), sweeps=sweeps)
        runs = result.runs.set_index("run")
        assert runs.loc["condor-batch_size4-eval_rowsnull-seed1", "swept.eval_rows"] == "null"
        assert runs.loc["condor", "swept.eval_rows"] is None  # not swept: an empty cell
        assert [runs.loc[f"condor-batch_size{b}-eval_rows32-seed1", "swept.batch_size"] for b in (4, 8)] == [4, 8]
        for table in ("summary.csv", "summary_by_setting.csv"):
            text = (tmp_path / table).read_text()
            assert ",32.0," not in text and ",4.0," not in text and ",null," in text, table
        fig = plot_sweep("s", order, result.runs, result.by_setting, tmp_path / "s.png")
        series = errorbars(fig.axes[0])
        assert sum(len(c.lines[0].get_xdata()) for c in series) == 4  # every setting drawn
        assert np.isfinite(np.concatenate([c.lines[0].get_ydata() for c in series])).all()
        if order[0] == "batch_size":
            assert sorted(c.get_label() for c in series) == ["eval_rows=32", "eval_rows=null"]


def test_a_diverged_run_does_not_squash_the_loss_axes(tmp_path):
    # A run that diverged logged finite losses of 1e12 before its non-finite one: drawn to its end,
    # it put 12 decades on the axes and flattened every ok curve against the bottom.
    entries = {}
    for seed in (1, 2, 3):
        run = f"condor-seed{seed}"
        run_dir = fake_runs.write_fake_run(tmp_path / run, run, seed=seed, diverge_at=150 if seed == 3 else None)
        entries[run] = {"history": run_dir / "metrics.jsonl", "metrics": run_dir / "metrics.json",
                        "config": run_dir / "config.json", "model": "condor", "setting": "condor", "seed": seed}
    history = entries["condor-seed3"]["history"]
    lines = [json.loads(line) for line in history.read_text().splitlines()]
    for line in lines:
        if line.get("step", 0) >= 100:
            for key in ("loss", "ce_loss", "val_loss"):
                if key in line:
                    line[key] *= 1e12
    history.write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = [read_run(run, entry) for run, entry in entries.items()]
    assert records[2].status == "diverged" and records[2].log.val["val_loss"].max() > 1e12
    fig = plot_losses(records, "step", tmp_path / "loss.png")
    ok_losses = np.concatenate([r.log.train["ce_loss"] for r in records[:2]])
    for ax in fig.axes[:2]:
        bottom, top = ax.get_ylim()
        assert top < 2 * ok_losses.max() and bottom > 0.5 * ok_losses.min()
    dashed = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_label() == "condor-seed3 (diverged)"


def test_a_run_that_diverged_after_one_evaluation_still_shows(tmp_path):
    # A run that diverged soon after its first evaluation logged one validation point: a dashed line
    # through one point draws nothing, and the run was in the legend but nowhere on the axes.
    entries = {}
    for seed in (1, 2):
        run = f"condor-seed{seed}"
        run_dir = fake_runs.write_fake_run(tmp_path / run, run, seed=seed, diverge_at=60 if seed == 2 else None)
        entries[run] = {"history": run_dir / "metrics.jsonl", "metrics": run_dir / "metrics.json",
                        "config": run_dir / "config.json", "model": "condor", "setting": "condor", "seed": seed}
    records = [read_run(run, entry) for run, entry in entries.items()]
    assert records[1].status == "diverged" and len(records[1].log.val) == 1
    fig = plot_losses(records, "step", tmp_path / "loss.png")
    dashed = [line for ax in fig.axes[:2] for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert dashed and all(line.get_marker() not in (None, "None", "") for line in dashed
                          if len(line.get_xdata()) == 1)
    assert any(len(line.get_xdata()) == 1 for line in dashed)
