"""tinylm.report on fabricated runs (tests/fixtures/fake_runs.py): tables, plots, pages, errors."""

import io
import json
import math
from pathlib import Path

import fake_runs
import pandas as pd
import pytest
from fake_runs import summary_outputs as outputs

from tinylm.errors import DataError
from tinylm.report import RUN_COLUMNS, read_metrics_log, read_run_metrics, summarize_runs

MODELS = {"baseline": None, "falcon": 4, "condor": None}  # name -> experts (None = dense)


def make_runs(root: Path) -> dict[str, Path]:
    return {
        model: fake_runs.write_fake_run(
            root / model, model, n_experts=experts, resume_at=100 if experts else None, seed=i
        )
        for i, (model, experts) in enumerate(MODELS.items())
    }


def run_files(runs: dict[str, Path]) -> dict[str, dict]:
    return {
        m: {
            "history": d / "metrics.jsonl",
            "metrics": d / "metrics.json",
            "config": d / "config.json",
        }
        for m, d in runs.items()
    }


@pytest.fixture(scope="module")
def summarized(tmp_path_factory):
    root = tmp_path_factory.mktemp("summary")
    runs = make_runs(root / "runs")
    summary = summarize_runs(run_files(runs), **outputs(root))
    return root, runs, summary.runs


def test_one_row_per_run_with_finite_numbers(summarized):
    root, _, table = summarized
    on_disk = pd.read_csv(root / "summary.csv")
    assert list(on_disk.columns) == RUN_COLUMNS
    assert (
        list(on_disk["run"]) == list(MODELS) == list(on_disk["model"]) == list(on_disk["setting"])
    )
    assert list(on_disk["seed"]) == [0, 1, 2]  # as config.json records them
    assert set(on_disk["status"]) == {"ok"} and set(on_disk["precision"]) == {"fp32"}  # CPU runs
    numbers = on_disk[RUN_COLUMNS[RUN_COLUMNS.index("n_params") :]].to_numpy(dtype=float)
    assert all(math.isfinite(x) for x in numbers.flat)
    # Empty texts (sweep, status_note) come back from a CSV as NaN, as they do from the returned table's.
    pd.testing.assert_frame_equal(on_disk, pd.read_csv(io.StringIO(table.to_csv(index=False))))
    by_setting = pd.read_csv(root / "summary_by_setting.csv")
    assert list(by_setting["setting"]) == list(MODELS) and set(by_setting["n"]) == {1}
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_plots_exist_and_moe_plots_only_for_moe_runs(summarized):
    root, _, _ = summarized
    pngs = {p.name for p in (root / "plots").glob("*.png")}
    assert pngs == {
        "loss_vs_step.png",
        "loss_vs_time.png",
        "falcon_expert_load.png",
        "falcon_dropped.png",
    }
    for name in pngs:
        data = (root / "plots" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000


def test_samples_page_escapes_text(summarized):
    root, _, _ = summarized
    page = (root / "plots" / "samples.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    for model in MODELS:
        assert fake_runs.completion(model) not in page  # raw '<hi>' would be markup
        assert "said &quot;&lt;hi&gt; &amp; bye&quot;" in page
        assert f"<th>{model}</th>" in page
    assert "<b>The girl</b>" in page


def test_summary_page_lists_every_model(summarized):
    root, _, _ = summarized
    page = (root / "plots" / "summary.html").read_text(encoding="utf-8")
    for model in MODELS:
        assert f"<th>{model}</th>" in page


def test_resumed_steps_count_once(summarized):
    _, runs, _ = summarized
    run = read_metrics_log(runs["falcon"] / "metrics.jsonl")
    assert run.train["step"].is_unique and run.train["step"].is_monotonic_increasing
    assert run.val["step"].is_unique
    assert run.train["ce_loss"].max() < 50  # the stale copies carry +100
    assert run.val["val_loss"].max() < 50
    assert run.is_moe and not read_metrics_log(runs["baseline"] / "metrics.jsonl").is_moe


def test_missing_files_are_named(tmp_path):
    runs = make_runs(tmp_path / "runs")
    (runs["condor"] / "metrics.json").unlink()
    with pytest.raises(
        DataError, match=r"condor/metrics\.json: file not found.*rule evaluate_model"
    ):
        summarize_runs(run_files(runs), **outputs(tmp_path))
    (runs["falcon"] / "metrics.jsonl").unlink()
    with pytest.raises(DataError, match=r"falcon/metrics\.jsonl: file not found"):
        summarize_runs(run_files(runs), **outputs(tmp_path))
    assert not (tmp_path / "summary.csv").exists()


@pytest.mark.parametrize("moe", [(), ("falcon", "condor")])
def test_moe_plots_must_match_the_moe_runs(tmp_path, moe):
    runs = make_runs(tmp_path / "runs")
    with pytest.raises(
        DataError, match=r"MoE plot paths were given for .* MoE statistics are \['falcon'\]"
    ):
        summarize_runs(run_files(runs), **outputs(tmp_path, moe=moe))
    assert not (tmp_path / "plots").exists()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"kind": "train", "step": 5, "ce_lo', r"line 3: not valid JSON"),
        ("[1, 2]", r"line 3: expected a JSON object"),
        (
            '{"kind": "eval", "step": 5, "elapsed_sec": 1}',
            r"line 3: eval line needs a number for 'val_loss'",
        ),
        ('{"kind": ["train"], "step": 1}', r"line 3: 'kind' must be text, got \['train'\]"),
    ],
)
def test_malformed_log_line_is_named(tmp_path, line, message):
    path = tmp_path / "metrics.jsonl"
    good = {"kind": "train", "step": 1, "ce_loss": 2.0, "elapsed_sec": 1.0}
    path.write_text(f"{json.dumps(good)}\n{json.dumps({'kind': 'resume', 'step': 1})}\n{line}\n")
    with pytest.raises(DataError, match=rf"{path}, {message}"):
        read_metrics_log(path)


def test_log_without_training_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "resume", "step": 0}\n')
    with pytest.raises(DataError, match="no training lines"):
        read_metrics_log(path)


@pytest.mark.parametrize("cut", [lambda load: load[:1], lambda load: [load[0][:2], *load[1:]]])
def test_inconsistent_expert_load_is_rejected(tmp_path, cut):
    run = fake_runs.write_fake_run(tmp_path, "falcon", n_experts=4, max_steps=50)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["expert_load"] = cut(first["expert_load"])
    (run / "metrics.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    with pytest.raises(DataError, match="expert_load must be"):
        read_metrics_log(run / "metrics.jsonl")


def test_metrics_json_checked(tmp_path):
    run = fake_runs.write_fake_run(tmp_path, "condor")
    path = run / "metrics.json"
    with pytest.raises(DataError, match="holds model 'condor', expected 'falcon'"):
        read_run_metrics(path, "falcon")
    metrics = json.loads(path.read_text())
    del metrics["test_bpb"]
    path.write_text(json.dumps(metrics))
    with pytest.raises(DataError, match=r"metrics\.json: missing key\(s\) test_bpb"):
        read_run_metrics(path, "condor")
    metrics["test_bpb"] = 1.0
    del metrics["model"]
    path.write_text(json.dumps(metrics))
    with pytest.raises(DataError, match=r"metrics\.json: missing key\(s\) model;"):
        read_run_metrics(path, "condor")
    path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_run_metrics(path, "condor")


def seeded_runs(root: Path) -> dict[str, dict]:
    """Setting condor over four seeds: one ok, one diverged, one failed, one with an infinite loss."""
    runs = {
        "condor-seed1": fake_runs.write_fake_run(root / "condor-seed1", "condor-seed1", seed=1),
        "condor-seed2": fake_runs.write_fake_run(
            root / "condor-seed2", "condor-seed2", seed=2, diverge_at=120
        ),
        "condor-seed3": fake_runs.write_fake_run(
            root / "condor-seed3", "condor-seed3", seed=3, fail_at=130
        ),
        "condor-seed4": fake_runs.write_fake_run(root / "condor-seed4", "condor-seed4", seed=4),
    }
    path = runs["condor-seed4"] / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["test_loss"] = math.inf
    path.write_text(json.dumps(metrics))
    files = run_files(runs)
    for run, entry in files.items():
        entry.update(model="condor", setting="condor", seed=int(run[-1]), sweep=None, values={})
    return files


def test_diverged_and_failed_runs_are_shown_and_left_out(tmp_path):
    summary = summarize_runs(seeded_runs(tmp_path / "runs"), **outputs(tmp_path, moe=()))
    on_disk = pd.read_csv(tmp_path / "summary.csv")
    assert list(on_disk["status"]) == ["ok", "diverged", "failed", "diverged"]
    notes = list(on_disk["status_note"].fillna(""))
    assert notes[0] == ""
    assert "non-finite training loss at step 120" in notes[1]
    assert "ended at step 120" in notes[2] and "no 'done' line" in notes[2]
    assert "test_loss" in notes[3]
    assert on_disk["final_step"].tolist()[:3] == [200, 110, 120]  # the last step each one logged
    (row,) = summary.by_setting.to_dict("records")
    assert (row["n"], row["n_excluded"]) == (1, 3)
    assert row["val_loss_mean"] == on_disk["val_loss"][0] and math.isnan(row["val_loss_sd"])
    page = (tmp_path / "plots" / "summary.html").read_text()
    for run, status in [("condor-seed2", "diverged"), ("condor-seed3", "failed")]:
        assert f"<th>{run.replace('-', '-<wbr>')}</th><td>{status}</td>" in page
    assert "3 runs left out" in page


def test_run_without_config_json_is_named(tmp_path):
    runs = make_runs(tmp_path / "runs")
    (runs["falcon"] / "config.json").unlink()
    with pytest.raises(DataError, match=r"falcon/config\.json: file not found"):
        summarize_runs(run_files(runs), **outputs(tmp_path))


def test_seed_must_match_the_recorded_one(tmp_path):
    files = seeded_runs(tmp_path / "runs")
    files["condor-seed1"]["seed"] = 7
    with pytest.raises(
        DataError, match=r"condor-seed1/config\.json records train seed 1, .* seed 7"
    ):
        summarize_runs(files, **outputs(tmp_path, moe=()))


def test_run_name_must_match_the_records(tmp_path):
    files = seeded_runs(tmp_path / "runs")
    files["condor-seed9"] = files.pop("condor-seed1")
    files["condor-seed9"]["seed"] = 1
    with pytest.raises(
        DataError, match=r"config\.json: holds run 'condor-seed1', expected 'condor-seed9'"
    ):
        summarize_runs(files, **outputs(tmp_path, moe=()))


def test_sweep_plots_must_match_the_sweeps(tmp_path):
    files = seeded_runs(tmp_path / "runs")
    files["condor-seed1"].update(sweep="lr", values={"lr": 0.001})
    with pytest.raises(
        DataError, match=r"run condor-seed1 is in sweep 'lr', which has no plot path"
    ):
        summarize_runs(files, **outputs(tmp_path, moe=()))
    sweeps = {
        "lr": {"plot": tmp_path / "lr.png", "keys": ["lr"]},
        "width": {"plot": tmp_path / "w.png", "keys": ["d_model"]},
    }
    with pytest.raises(DataError, match=r"sweep 'width' has a plot path but no runs"):
        summarize_runs(files, **outputs(tmp_path, moe=()), sweeps=sweeps)
    del sweeps["width"]
    sweeps["lr"]["keys"] = ["lr", "beta2"]
    with pytest.raises(
        DataError,
        match=r"run condor-seed1 .* values for \['lr'\], but sweep 'lr' sweeps \['lr', 'beta2'\]",
    ):
        summarize_runs(files, **outputs(tmp_path, moe=()), sweeps=sweeps)


def test_swept_value_must_match_the_recorded_one(tmp_path):
    files = seeded_runs(tmp_path / "runs")
    files = {"condor-seed1": files["condor-seed1"]}
    sweeps = {"lr": {"plot": tmp_path / "lr.png", "keys": ["train.lr"]}}
    files["condor-seed1"].update(sweep="lr", values={"train.lr": 0.001})
    with pytest.raises(
        DataError,
        match=r"records train.lr = 0.0003, but the run table gives run condor-seed1 train.lr = 0.001",
    ):
        summarize_runs(files, **outputs(tmp_path, moe=()), sweeps=sweeps)
    files["condor-seed1"]["values"] = {"train.lr": 0.0003}
    summary = summarize_runs(files, **outputs(tmp_path, moe=()), sweeps=sweeps)
    assert list(summary.runs["swept.train.lr"]) == [0.0003]


@pytest.mark.parametrize("models", [{"falcon": 4, "condor": None}, {"falcon": 4}, {"condor": None}])
def test_runs_that_diverged_before_their_first_train_line_are_summarized(tmp_path, models):
    """An lr sweep's highest rate may diverge before the first train line (log_every steps): the run
    has its step-0 evaluation and nothing else. The summary shows it as diverged; a MoE run's plots
    say that it logged no statistics (the workflow declares them for every MoE run)."""
    runs = {}
    for model, experts in models.items():
        run_dir = fake_runs.write_fake_run(tmp_path / "runs" / model, model, n_experts=experts, diverge_at=3)
        history = run_dir / "metrics.jsonl"
        step0 = {"kind": "eval", "step": 0, "val_loss": 7.6, "val_ppl": math.exp(7.6), "best_val_loss": 7.6,
                 "improved": True, "sec": 0.1, "elapsed_sec": 0.1}
        history.write_text(json.dumps(step0) + "\n" + history.read_text())
        runs[model] = run_dir
    ok = {"condor"} - set(models)  # a finished run beside them where the parametrization has none
    for model in ok:
        runs[model] = fake_runs.write_fake_run(tmp_path / "runs" / model, model)
    moe = tuple(m for m, e in models.items() if e)
    summary = summarize_runs(run_files(runs), **outputs(tmp_path, moe=moe))
    status = dict(zip(summary.runs["run"], summary.runs["status"], strict=True))
    assert all(status[m] == "diverged" for m in models)
    for m in moe:
        for kind in ("expert_load", "dropped"):
            assert (tmp_path / "plots" / f"{m}_{kind}.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "plots" / "loss_vs_time.png").exists()


def test_figures_of_sweeps_and_runs_no_longer_in_the_config_are_removed(tmp_path):
    # A dropped sweep or MoE run left its figure in plots/ beside the new summary, describing runs the
    # summary no longer has. What summarize did not write stays, even under a name it would use.
    plots = tmp_path / "plots"
    plots.mkdir()
    mine = ["notes.txt", "sweep_lr_before.png", "falcon-old_dropped.png"]
    for name in mine:
        (plots / name).write_text("x")
    runs = make_runs(tmp_path / "runs")
    sweep = {"plot": plots / "sweep_old.png", "keys": ["lr"]}
    files = run_files(runs)
    files["condor"].update(sweep="old", values={"lr": 0.001})
    summarize_runs(files, **outputs(tmp_path), sweeps={"old": sweep})
    assert {"sweep_old.png", "falcon_dropped.png"} <= {p.name for p in plots.iterdir()}
    files["condor"].update(sweep=None, values={})
    files.pop("falcon")
    summarize_runs(files, **outputs(tmp_path, moe=()))
    left = {p.name for p in plots.iterdir()}
    assert not left & {"sweep_old.png", "falcon_dropped.png", "falcon_expert_load.png"}
    assert set(mine) <= left and "loss_vs_step.png" in left
