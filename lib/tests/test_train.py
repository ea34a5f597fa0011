"""The training loop on the CPU with tiny models: schedule, data order, learning, early stopping,
resume after a signal, non-finite losses, checkpoints."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tinylm import step as step_mod
from tinylm.checkpoint import load_checkpoint, model_from_checkpoint
from tinylm.config import TrainConfig
from tinylm.errors import CheckpointError, ConfigError, OutputError, TrainingError
from tinylm.runlog import EXIT_PREEMPTED, RunFiles, RunPaths
from tinylm.step import RowSampler, lr_at
from tinylm.train import Progress, host_copy, progress_interval, train
from tinylm.verify import check_history


@pytest.fixture()
def run(tiny_train_model, tiny_train_config):
    """Train (tiny_train_model() unless `model`) on `packed` into tmp_path/name; (summary, run_dir)."""

    def run(packed, tmp_path, name="run", model=None, progress_every_sec=None, **over) -> tuple[dict, str]:
        run_dir = tmp_path / name
        summary = train(
            progress_every_sec=progress_every_sec,
            model_config=model or tiny_train_model(),
            train_config=tiny_train_config(**over),
            train_bin=packed["train"],
            val_bin=packed["validation"],
            tokenizer_path=packed["tokenizer"],
            run_dir=run_dir,
            eval_batch_size=16,
        )
        return summary, run_dir

    return run


def history(run_dir, kind):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def test_identical_runs_record_one_weights_sha256_and_another_seed_another(run, packed, tmp_path):
    """best_model.pt also carries its run's summary (wall times, tokens/s), so the file's sha256 differs
    between two identical runs; the sha256 of its weights alone, in config.json and metrics.json, says
    whether two runs trained the same model."""
    from tinylm.checkpoint import load_checkpoint, weights_sha256
    from tinylm.evaluate import evaluate_run

    shas = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        _, run_dir = run(packed, tmp_path, name=name, max_steps=6, seed=seed)
        config = json.loads((run_dir / "config.json").read_text())
        best = run_dir / "checkpoints" / "best_model.pt"
        assert config["weights_sha256"] == weights_sha256(load_checkpoint(best)["model"])
        metrics = evaluate_run(model_name=name, checkpoint=best, tokenizer_path=packed["tokenizer"],
                               val_bin=packed["validation"], test_bin=packed["validation"],
                               out_json=tmp_path / f"{name}.json", batch_size=16, device="cpu", prompts=["Once"],
                               max_new_tokens=2)
        assert metrics["weights_sha256"] == config["weights_sha256"]
        shas[name] = config["weights_sha256"]
    assert shas["a"] == shas["b"] != shas["c"]


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(0.5 * (1e-3 + 1e-4))
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_weight_decay_reaches_weight_matrices_only(tiny_config, ffn):
    """AdamW decays the weight matrices (embeddings, projections, router, experts' w1 and w2), never a
    bias or a LayerNorm parameter: the MoE experts' biases b1 and b2 are stacked over experts into 2-d
    tensors, yet are biases, as the dense MLP's are."""
    from tinylm.model import GPT, GPTConfig
    from tinylm.step import make_optimizer

    model = GPT(GPTConfig(**tiny_config(ffn=ffn)))
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    name = {id(p): n for n, p in model.named_parameters()}
    decayed = {name[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    kept = {name[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed | kept == set(name.values()) and not decayed & kept
    is_vector = re.compile(r"(bias|\.b1|\.b2|ln\d\.weight|ln_f\.weight)$")
    assert decayed == {n for n in name.values() if not is_vector.search(n)}
    assert ({"blocks.0.ffn.b1", "blocks.0.ffn.b2"} <= kept) == (ffn == "moe")


def test_an_optimizer_state_saved_with_the_experts_biases_decayed_resumes_into_todays_groups(tiny_config):
    """A last.pt written while the MoE experts' biases were in the decayed group (before 2026-12-07)
    loads into today's groups with every parameter's AdamW state where it belongs."""
    from tinylm.model import GPT, GPTConfig
    from tinylm.step import load_optimizer_state, make_optimizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(**tiny_config(ffn="moe")))
    params = list(model.parameters())
    old = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=1e-3)
    model(torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8)))["loss"].backward()
    old.step()
    saved = old.state_dict()
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    load_optimizer_state(opt, saved, model)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    for p in params:
        torch.testing.assert_close(opt.state[p]["exp_avg"], old.state[p]["exp_avg"])
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], old.state[p]["exp_avg_sq"])
    now = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    load_optimizer_state(now, opt.state_dict(), model)  # today's layout loads as it is
    for p in params:
        torch.testing.assert_close(now.state[p]["exp_avg"], old.state[p]["exp_avg"])


def test_row_sampler_is_a_pure_function_of_seed_and_step():
    a, b = RowSampler(50, 8, seed=3), RowSampler(50, 8, seed=3)
    whole = a.indices(0, 20)
    assert np.array_equal(whole[7:12], b.indices(7, 5))  # a resumed run reads the same batches
    epoch0 = whole.reshape(-1)[:50]
    assert sorted(epoch0.tolist()) == list(range(50))  # every row once per epoch
    assert not np.array_equal(RowSampler(50, 8, seed=4).indices(0, 5), whole[:5])


def test_cpu_batches_keep_the_sampled_row_order(tiny_train_model, tiny_train_config):
    """A MoE layer fills its experts' capacity in token order, so the order of the rows in a batch is
    part of the math: the CPU reads them in the sampled order, as CUDA does (a row twice included, as
    in a batch across the end of an epoch)."""
    from tinylm.distributed import DistInfo
    from tinylm.model import GPT, GPTConfig
    from tinylm.step import Stepper, make_optimizer

    cfg, cpu = TrainConfig.from_dict(tiny_train_config()), torch.device("cpu")
    model = GPT(GPTConfig.from_dict(tiny_train_model()))
    tokens = np.arange(10 * 17, dtype=np.uint16).reshape(10, 17)  # row r starts with token 17 * r
    stepper = Stepper(model, make_optimizer(model, cfg, cpu), cfg, cpu, DistInfo(), tokens)
    stepper.cpu_idx = np.array([7, 2, 9, 7, 0, 5, 1, 3])
    x, y = stepper._batch()
    first = [17 * r for r in stepper.cpu_idx]
    assert x[:, 0].tolist() == first and y[:, 0].tolist() == [t + 1 for t in first]


def test_train_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown key.*bogus"):
        TrainConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="train.gpus"):
        TrainConfig.from_dict({"gpus": 0})
    with pytest.raises(ConfigError, match="max_gpus"):
        TrainConfig.from_dict({"gpus": 4, "max_gpus": 2})


def progress_lines(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{name}: step ")
            and "/" in r.getMessage().split()[2]]


def test_progress_lines_name_the_run_and_the_steps_each_loss_averages(run, packed, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tinylm.train")
    _, run_dir = run(packed, tmp_path, name="falcon", max_steps=12, log_every=5, eval_every=12,
                     progress_every_sec=1e-9)  # a line at every step
    lines = progress_lines(caplog, "falcon")
    assert [int(re.search(r"step (\d+)/12 ", line)[1]) for line in lines] == list(range(1, 13)), lines
    windows = [re.search(r"loss [\d.]+ \((steps? [\d-]+)\)", line)[1] for line in lines]
    assert windows[:7] == ["step 1", "steps 1-2", "steps 1-3", "steps 1-4", "steps 1-5", "step 6", "steps 6-7"]
    assert windows[-1] == "steps 11-12"
    assert not [line for line in lines if "nan" in line]
    logged = {r["step"]: r["loss"] for r in history(run_dir, "train")}
    for step in (5, 10, 12):  # at a log step the line shows what metrics.jsonl records
        assert float(re.search(r"loss ([\d.]+)", lines[step - 1])[1]) == pytest.approx(logged[step], abs=1e-4)
    assert all(re.search(r"[\d,]+ tok/s .* elapsed  ~\S+ left$", line) for line in lines), lines[-1]


def test_progress_lines_can_be_turned_off(run, packed, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="tinylm.train")
    run(packed, tmp_path, name="quiet", max_steps=10, eval_every=10, progress_every_sec=0)
    monkeypatch.setenv("TINYLM_PROGRESS_SEC", "0")
    run(packed, tmp_path, name="quiet_env", max_steps=10, eval_every=10)
    assert progress_lines(caplog, "quiet") == progress_lines(caplog, "quiet_env") == []
    assert any(r.getMessage().startswith("quiet: done") for r in caplog.records)


def test_progress_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("TINYLM_PROGRESS_SEC", raising=False)
    assert progress_interval() == 10
    monkeypatch.setenv("TINYLM_PROGRESS_SEC", "2.5")
    assert progress_interval() == 2.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("TINYLM_PROGRESS_SEC", bad)
        with pytest.raises(ConfigError, match=f"TINYLM_PROGRESS_SEC = '{bad}'.*0 = no progress lines"):
            progress_interval()


def test_a_progress_line_is_due_every_interval(caplog):
    caplog.set_level(logging.INFO, logger="tinylm.train")
    clock = [100.0]
    state = {"train_sec": 0.0, "eval_sec": 0.0, "tokens": 25000}
    p = Progress(state, TrainConfig(max_steps=50), tokens_per_step=1000, step=0, log_mark=0, name="condor",
                 every_sec=10, clock=lambda: clock[0])
    clock[0] = 109.9
    assert not p.line_due()
    clock[0] = 110.0
    assert p.line_due()
    assert p.lap(20) == pytest.approx(2000.0)  # 20 steps x 1000 tokens in 10 s
    p.print_line(20, 2000.0, running_loss_sum=60.0)
    assert progress_lines(caplog, "condor") == ["condor: step 20/50  loss 3.0000 (steps 1-20)  2,000 tok/s  "
                                                "0m10s elapsed  ~0m15s left"]
    p.restart(20)
    assert not p.line_due()
    clock[0] = 112.0  # no train line yet and the running loss unknown (several processes): no number
    p.lap(25)
    p.print_line(25, 2500.0, running_loss_sum=None)
    p.train_line(25, torch.tensor([75.0, 75.0, 0.0, 0.0, 0.0]), torch.zeros(1, 1), 1e-3, 2500.0, moe=False)
    p.print_line(25, 2500.0, running_loss_sum=None)  # the window just logged
    lines = progress_lines(caplog, "condor")
    assert [line.split("  ")[1] for line in lines[1:]] == ["loss -", "loss 3.0000 (steps 1-25)"]


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the error shown when no GPU is present"
)
def test_device_cuda_without_gpu_fails_at_once(run, packed, tmp_path):
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        run(packed, tmp_path, device="cuda")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_loss_falls_and_outputs_are_written(run, packed, tmp_path, tiny_train_model):
    summary, run_dir = run(packed, tmp_path, max_steps=60, eval_every=20)
    train_rows = history(run_dir, "train")
    assert train_rows[0]["step"] == 5 and train_rows[-1]["step"] == 60
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.5
    evals = history(run_dir, "eval")
    assert [e["step"] for e in evals] == [0, 20, 40, 60]  # the untrained model first
    assert evals[-1]["val_loss"] < math.log(tiny_train_model()["vocab_size"])
    best = load_checkpoint(run_dir / "checkpoints" / "best_model.pt")
    assert best["step"] == summary["best_step"] == min(evals, key=lambda e: e["val_loss"])["step"]
    assert not (run_dir / "checkpoints" / "last.pt").exists()  # removed once training finished
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model_config"]["d_model"] == 32 and config["train_config"]["max_steps"] == 60
    assert history(run_dir, "done")[0]["final_step"] == 60


def test_a_cpu_run_records_the_device_and_the_fp32_it_ran_in(run, packed, tmp_path):
    from tinylm.evaluate import evaluate_run

    summary, run_dir = run(packed, tmp_path, max_steps=5, eval_every=5, precision="bf16")
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["device"], config["precision"]) == ("cpu", "fp32")
    assert config["train_config"]["precision"] == "bf16"  # the setting, as given
    assert (summary["device"], summary["precision"]) == ("cpu", "fp32")
    assert history(run_dir, "done")[0]["precision"] == "fp32"
    metrics = evaluate_run(model_name="run", checkpoint=run_dir / "checkpoints" / "best_model.pt",
                           tokenizer_path=packed["tokenizer"], val_bin=packed["validation"],
                           test_bin=packed["validation"], out_json=tmp_path / "metrics.json", batch_size=16,
                           device="cpu", precision="bf16", prompts=["Once"], max_new_tokens=2)
    ran = {"device": "cpu", "precision": "fp32", "train_device": "cpu", "train_precision": "fp32"}
    assert {k: metrics[k] for k in ran} == ran
    assert json.loads((tmp_path / "metrics.json").read_text())["precision"] == "fp32"


def test_metrics_json_records_the_cpu_threads_the_evaluation_computed_with(run, packed, tmp_path):
    """The evaluation's losses on the CPU depend on its thread count too (the smoke test's metrics.json
    val_loss at --cores 1 and --cores 2 differ in the 7th digit, from the same checkpoint), so
    metrics.json says it, as config.json does the training's."""
    from tinylm.evaluate import evaluate_run

    _, run_dir = run(packed, tmp_path, max_steps=2, eval_every=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = evaluate_run(model_name="run", checkpoint=run_dir / "checkpoints" / "best_model.pt",
                               tokenizer_path=packed["tokenizer"], val_bin=packed["validation"],
                               test_bin=packed["validation"], out_json=tmp_path / "metrics.json", batch_size=16,
                               device="cpu", prompts=["Once"], max_new_tokens=2)
    finally:
        torch.set_num_threads(threads)
    assert metrics["cpu_threads"] == 1
    assert json.loads((tmp_path / "metrics.json").read_text())["cpu_threads"] == 1


def test_the_same_seed_trains_the_same_run_and_another_seed_another(run, packed, tmp_path, tiny_train_model):
    """The README's reproducible baseline: same config and seed, same losses and weights (on one machine
    and thread count); another seed, other initial weights and batches, so other losses."""
    clock = {"sec", "elapsed_sec", "tokens_per_sec", "train_tokens_per_sec", "train_wall_sec", "train_sec", "eval_sec"}

    def trained(name, **over):
        _, run_dir = run(packed, tmp_path, name=name, model=tiny_train_model(ffn="moe", n_experts=4, top_k=2),
                         max_steps=10, eval_every=5, **over)
        rows = [{k: v for k, v in json.loads(line).items() if k not in clock}
                for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return rows, load_checkpoint(run_dir / "checkpoints" / "best_model.pt")["model"]

    (rows_a, weights_a), (rows_b, weights_b) = trained("a"), trained("b")
    assert rows_a == rows_b
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    rows_c, _ = trained("c", seed=8)
    assert [r.get("loss") for r in rows_c] != [r.get("loss") for r in rows_a]


def test_config_json_records_the_software_and_cpu_threads_the_run_computed_with(run, packed, tmp_path):
    """Same config and seed on the CPU give the same losses only with the same torch build and thread
    count (a run at --cores 1 and one at --cores 2 differ in the 7th digit), so config.json says both."""
    import platform

    import tokenizers

    import tinylm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, run_dir = run(packed, tmp_path, max_steps=2, eval_every=2)
    finally:
        torch.set_num_threads(threads)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["cpu_threads"] == 1
    checkout = Path(tinylm.__file__).resolve().parents[2]
    commit = subprocess.run(["git", "-C", str(checkout), "describe", "--always", "--dirty", "--abbrev=40",
                             "--exclude=*"],
                            capture_output=True, text=True).stdout.strip() or None  # fmt: skip
    assert config["software"] == {"python": platform.python_version(), "torch": torch.__version__,
                                  "numpy": np.__version__, "tokenizers": tokenizers.__version__,
                                  "tinylm": tinylm.__version__, "tinylm_commit": commit}


def test_only_the_process_that_writes_the_records_asks_for_the_software_versions(run, packed, tmp_path,
                                                                                  monkeypatch):
    """software_versions() runs git (given up to 10 s) for config.json, which only rank 0 writes: every
    other rank of a train.gpus > 1 run asked too, and threw the answer away."""
    import tinylm.train as train_mod
    from tinylm.distributed import DistInfo

    asked = []
    monkeypatch.setattr(train_mod, "software_versions", lambda: asked.append(1) or {})
    monkeypatch.setattr(train_mod, "init_distributed", lambda device_type: DistInfo(rank=1))  # not the main one
    monkeypatch.setattr(train_mod.Run, "fit", lambda self: {})  # its records are started by now
    run(packed, tmp_path, max_steps=2, eval_every=2)
    assert asked == [] and not (tmp_path / "run" / "config.json").exists()


def test_outputs_are_written_exactly_where_asked(packed, tmp_path, tiny_train_model, tiny_train_config):
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    train(model_config=tiny_train_model(), train_config=tiny_train_config(max_steps=10), train_bin=packed["train"],
          val_bin=packed["validation"], tokenizer_path=packed["tokenizer"], run_dir=scratch,
          best_path=out / "best.pt", history_path=out / "log.jsonl", config_path=out / "settings.json",
          eval_batch_size=16)
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "log.jsonl", "settings.json"]
    assert load_checkpoint(out / "best.pt")["step"] == 10
    # no last.pt once training finished, no .lock once it let go: only the attempt's log is kept
    assert [p for p in scratch.rglob("*") if p.is_file()] == [scratch / "logs" / "attempt-1.log"]


def test_moe_statistics_are_logged(run, packed, tmp_path, tiny_train_model):
    moe = tiny_train_model(ffn="moe", n_experts=4, top_k=2, d_ff_expert=32)
    _, run_dir = run(packed, tmp_path, model=moe, max_steps=10, eval_every=10)
    row = history(run_dir, "train")[-1]
    assert 0.0 <= row["dropped_frac"] < 1.0 and row["balance_loss"] > 0 and row["z_loss"] > 0
    load = np.array(row["expert_load"])
    assert load.shape == (2, 4) and np.allclose(load.sum(axis=1), 1.0, atol=1e-5)


def test_early_stopping_triggers(run, packed, tmp_path):
    # lr 0 (min_lr 0): the loss never improves after the first evaluation.
    summary, run_dir = run(
        packed,
        tmp_path,
        lr=1e-12,
        min_lr=0.0,
        max_steps=100,
        eval_every=5,
        patience=2,
        min_delta=0.01,
        min_step=0,
    )
    assert summary["stop_reason"].startswith("early stopping")
    # The untrained model's loss (step 0) is the first to beat; lr 1e-12 leaves the fp32 weights as
    # they are, so neither step 5 nor step 10 improves on it.
    assert summary["final_step"] == 10
    assert summary["best_step"] == 0


def test_best_model_is_the_lowest_validation_loss_whatever_min_delta(run, packed, tmp_path):
    """min_delta decides what counts for patience only: losses that fall by less than it still make
    the best model (as Keras's EarlyStopping beside its ModelCheckpoint)."""
    summary, run_dir = run(packed, tmp_path, max_steps=30, eval_every=5, patience=2, min_delta=10.0)
    evals = history(run_dir, "eval")
    # The untrained model's loss (step 0) is the reference; 5 and 10 fall by less than 10.
    assert summary["final_step"] == 10 and [r["step"] for r in evals] == [0, 5, 10]
    assert summary["stop_reason"] == "early stopping: no improvement of more than min_delta = 10 in 2 evaluations"
    lowest = min(evals, key=lambda r: r["val_loss"])
    assert lowest["step"] > 5  # the run learned: the test means something
    assert (summary["best_step"], summary["best_val_loss"]) == (lowest["step"], lowest["val_loss"])
    assert load_checkpoint(run_dir / "checkpoints" / "best_model.pt")["step"] == lowest["step"]
    assert [r["improved"] for r in evals] == [r["val_loss"] == min(e["val_loss"] for e in evals[: i + 1])
                                              for i, r in enumerate(evals)]


@pytest.mark.parametrize("last_step, stop_reason, over", [
    (10, "early stopping", {"lr": 1e-12, "min_lr": 0.0, "max_steps": 100, "patience": 2, "min_delta": 0.01}),
    (30, "max_steps", {"max_steps": 30})])
def test_a_signal_on_the_last_step_finishes_the_run(run, packed, tmp_path, monkeypatch, last_step, stop_reason, over):
    """The run is over: it writes its best model and ends as it would have, not as preempted (a rerun
    of an early-stopped run would have trained on past the step where it stopped)."""
    with monkeypatch.context() as m:
        _signal_at(m, last_step - 1)  # during the last step
        summary, run_dir = run(packed, tmp_path, eval_every=5, **over)
    assert summary["stop_reason"].startswith(stop_reason) and summary["final_step"] == last_step
    assert (run_dir / "checkpoints" / "best_model.pt").exists() and not history(run_dir, "stopped")


def test_early_stopping_waits_for_min_step(run, packed, tmp_path):
    summary, _ = run(
        packed,
        tmp_path,
        lr=1e-12,
        min_lr=0.0,
        max_steps=100,
        eval_every=5,
        patience=1,
        min_delta=0.01,
        min_step=30,
    )
    assert summary["final_step"] == 30


def _signal_at(monkeypatch, step_to_stop: int):
    real = step_mod.lr_at

    def lr_and_signal(step, cfg):
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, cfg)

    monkeypatch.setattr(step_mod, "lr_at", lr_and_signal)


def _stopped_by_sigterm(monkeypatch, train_call, step: int = 3) -> None:
    """Call `train_call` and let a SIGTERM at `step` stop it (exit 75, last.pt saved)."""
    with monkeypatch.context() as m:
        _signal_at(m, step)
        with pytest.raises(SystemExit):
            train_call()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_sigterm_saves_and_resume_equals_uninterrupted_run(run, packed, tmp_path, monkeypatch, tiny_train_model,
                                                           dropout):
    """With dropout the resumed run also draws the masks the uninterrupted one drew (last.pt keeps the
    random generators' states)."""
    model = tiny_train_model(dropout=dropout)
    full, full_dir = run(packed, tmp_path, name="full", model=model, max_steps=30)

    with monkeypatch.context() as m:
        _signal_at(m, 13)
        with pytest.raises(SystemExit) as exc:
            run(packed, tmp_path, name="resumed", model=model, max_steps=30)
    assert exc.value.code == EXIT_PREEMPTED
    run_dir = tmp_path / "resumed"
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert 13 <= last["step"] <= 15 and last["optimizer"] is not None
    assert history(run_dir, "stopped")[0]["step"] == last["step"]

    resumed, _ = run(packed, tmp_path, name="resumed", model=model, max_steps=30)
    assert resumed["final_step"] == full["final_step"] == 30
    a, _ = model_from_checkpoint(full_dir / "checkpoints" / "best_model.pt")
    b, _ = model_from_checkpoint(run_dir / "checkpoints" / "best_model.pt")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    # the resumed log repeats no step and matches the uninterrupted one
    steps = [r["step"] for r in history(run_dir, "train")]
    assert steps == sorted(set(steps)) == [r["step"] for r in history(full_dir, "train")]
    assert [r["loss"] for r in history(run_dir, "train")] == pytest.approx(
        [r["loss"] for r in history(full_dir, "train")], abs=1e-6
    )
    assert history(run_dir, "resume")[0]["step"] == last["step"]
    # the log keeps the stop, though it is rewritten from last.pt (Snakemake deletes a failed job's log)
    assert history(run_dir, "stopped") == [{"kind": "stopped", "step": last["step"], "signal": "SIGTERM"}]


def test_a_training_attempt_removes_the_evaluation_of_the_model_it_replaces(run, packed, tmp_path, monkeypatch):
    """Snakemake deletes best_model.pt before it trains a run again (a changed setting, --forcerun), but
    not the evaluation of that model, metrics.json: stopped then, the run would leave the old model's
    numbers beside its last.pt, and `snakemake .../metrics.json`, the target being there, would neither
    resume it nor evaluate it again ("Nothing to be done")."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"val_loss": 1.0}')
    _stopped_by_sigterm(monkeypatch, lambda: run(packed, tmp_path, max_steps=30))
    assert (run_dir / "checkpoints" / "last.pt").exists()
    assert not (run_dir / "metrics.json").exists()


def test_a_run_resumed_at_another_cpu_thread_count_says_so_and_records_both(run, packed, tmp_path, monkeypatch,
                                                                            caplog):
    """CPU arithmetic differs with the thread count, and a resume may get another (a rerun at another
    `snakemake --cores`): the resumed run then matches neither count's uninterrupted run, yet it went on
    silently and config.json recorded only the last attempt's count. It warns, and config.json lists
    every count the run's steps computed with."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _stopped_by_sigterm(monkeypatch, lambda: run(packed, tmp_path, max_steps=10))
        torch.set_num_threads(1)
        with caplog.at_level(logging.WARNING, logger="tinylm.train"):
            run(packed, tmp_path, max_steps=10)
    finally:
        torch.set_num_threads(threads)
    assert re.search(r"resumed on 1 CPU thread.*computed with 2", caplog.text), caplog.text
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["cpu_threads"] == 1 and config["cpu_threads_all"] == [1, 2]


def test_a_run_resumed_on_another_device_or_compile_setting_records_every_one(run, packed, tmp_path, monkeypatch):
    """train.device and train.compile may change between the attempts of one run (the README allows it),
    and the arithmetic changes with them; yet config.json and metrics.json named only the last attempt's
    device. As with the CPU thread counts, last.pt carries every setup the run's steps computed with, and
    a run that mixed them lists them all. This machine has no GPU: the first attempt's record is made to
    say that it trained compiled on one, as such an attempt's last.pt would."""
    from tinylm.evaluate import evaluate_run

    _stopped_by_sigterm(monkeypatch, lambda: run(packed, tmp_path, max_steps=10))
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    ck = load_checkpoint(last)
    cpu = {"device": "cpu", "precision": "fp32", "compile": False, "world_size": 1}
    assert ck["extra"]["ran_on_all"] == [cpu]
    gpu = {"device": "cuda:0 (NVIDIA H100 80GB HBM3)", "precision": "bf16", "compile": True, "world_size": 1}
    ck["extra"]["ran_on_all"] = [gpu]
    torch.save(ck, last)
    summary, run_dir = run(packed, tmp_path, max_steps=10)
    both = [gpu, cpu]
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["device"], config["ran_on_all"]) == ("cpu", both)
    assert summary["ran_on_all"] == history(run_dir, "done")[0]["ran_on_all"] == both
    metrics = evaluate_run(model_name="run", checkpoint=run_dir / "checkpoints" / "best_model.pt",
                           tokenizer_path=packed["tokenizer"], val_bin=packed["validation"],
                           test_bin=packed["validation"], out_json=tmp_path / "metrics.json", batch_size=16,
                           device="cpu", prompts=["Once"], max_new_tokens=2)
    assert (metrics["train_device"], metrics["train_ran_on_all"]) == ("cpu", both)

    # a run resumed on the setup it started on lists none
    _stopped_by_sigterm(monkeypatch, lambda: run(packed, tmp_path, name="same", max_steps=10))
    summary, run_dir = run(packed, tmp_path, name="same", max_steps=10)
    assert "ran_on_all" not in summary and "ran_on_all" not in json.loads((run_dir / "config.json").read_text())


def test_resume_refuses_a_different_config(run, packed, tmp_path, monkeypatch, tiny_train_model, caplog):
    _stopped_by_sigterm(monkeypatch, lambda: run(packed, tmp_path, max_steps=30))
    with pytest.raises(CheckpointError, match=r"last\.pt.*different train config.*lr"):
        run(packed, tmp_path, max_steps=30, lr=1e-2)
    with pytest.raises(CheckpointError, match="different model config.*d_model"):
        run(packed, tmp_path, model=tiny_train_model(d_model=64), max_steps=30)
    # settings that do not change the math may differ: for a dense model, the number of processes too
    with caplog.at_level(logging.INFO, logger="tinylm.train"):
        summary, _ = run(packed, tmp_path, max_steps=30, log_every=3, gpus=2)
    assert summary["final_step"] == 30
    assert re.search(r"resumed from .*last\.pt at step 4 \(best val loss [0-9.]+ at step 0\)", caplog.text), caplog.text


def test_a_resumed_run_that_never_improves_keeps_the_best_weights_from_before_the_stop(run, packed, tmp_path,
                                                                                      monkeypatch):
    """last.pt carries the best weights so far: a run stopped after its best evaluation (step 10) and
    resumed into worse ones writes the step-10 weights as best_model.pt, as the same run uninterrupted
    does, not the weights it had at the stop or after."""
    import tinylm.train as train_mod

    real = train_mod.evaluate_loss

    def worse_after(n_real):  # evaluations after the first n_real of this process are worse than any
        calls = []

        def evaluate(*args, **kwargs):
            calls.append(1)
            res = real(*args, **kwargs)
            return res if len(calls) <= n_real else {**res, "loss": 100.0}

        return evaluate

    with monkeypatch.context() as m:
        m.setattr(train_mod, "evaluate_loss", worse_after(3))  # steps 0, 5, 10
        full, full_dir = run(packed, tmp_path, name="full", max_steps=20, eval_every=5)
    assert full["best_step"] == 10
    _stopped_by_sigterm(monkeypatch, lambda: run(packed, tmp_path, max_steps=20, eval_every=5), step=13)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["extra"]["best_step"] == 10
    monkeypatch.setattr(train_mod, "evaluate_loss", worse_after(0))
    summary, run_dir = run(packed, tmp_path, max_steps=20, eval_every=5)
    assert summary["final_step"] == 20 and summary["best_step"] == 10
    a, b = (load_checkpoint(d / "checkpoints" / "best_model.pt") for d in (full_dir, run_dir))
    assert a["step"] == b["step"] == 10
    for name, weight in a["model"].items():
        assert torch.equal(b["model"][name], weight), name


def test_resume_of_a_moe_run_refuses_another_number_of_processes(run, packed, tmp_path, monkeypatch,
                                                                 tiny_train_model):
    """Each process routes its own share of the batch, with its own capacity: for a MoE model the
    number of processes (train.gpus) is part of the math."""
    moe = tiny_train_model(ffn="moe", n_experts=4, top_k=2, d_ff_expert=32)
    _stopped_by_sigterm(monkeypatch, lambda: run(packed, tmp_path, model=moe, max_steps=30))
    with pytest.raises(CheckpointError, match=r"different train config.*gpus: checkpoint 1 vs now 2"):
        run(packed, tmp_path, model=moe, max_steps=30, gpus=2)


def poison_training_loss(monkeypatch, after_calls: int) -> None:
    """Make every training forward after the first `after_calls` return a NaN loss."""
    from tinylm.model import GPT

    real_forward = GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, **kw):
        out = real_forward(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] > after_calls:
                out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", poisoned)


def test_non_finite_loss_ends_the_run_as_diverged_with_its_best_model(run, packed, tmp_path, monkeypatch, caplog):
    """A diverged run finishes its job (a sweep goes on to the summary) with the best weights it had,
    and its log says it diverged, so the summary shows it so and leaves it out of the means."""
    from tinylm.report.records import read_metrics_log, run_status

    poison_training_loss(monkeypatch, after_calls=12)
    with caplog.at_level("WARNING", logger="tinylm.train"):
        summary, run_dir = run(packed, tmp_path, max_steps=30, save_every=10, log_every=5, eval_every=5)
    # the advice fits the run: an fp32 run on the CPU is not told to use bf16/fp32 (that is for fp16)
    assert "non-finite training loss at step 13" in caplog.text and "lower train.lr" in caplog.text
    assert "bf16" not in caplog.text
    assert summary["stop_reason"] == "diverged at step 13" and summary["final_step"] == 15
    best = load_checkpoint(run_dir / "checkpoints" / "best_model.pt")
    assert best["step"] == 10 and all(torch.isfinite(v).all() for v in best["model"].values())
    assert not (run_dir / "checkpoints" / "last.pt").exists()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-2] == {"kind": "diverged", "step": 13} and rows[-1]["kind"] == "done"
    assert run_status(read_metrics_log(run_dir / "metrics.jsonl"), {"val_loss": 1.0, "val_bpb": 1.0, "test_loss": 1.0,
                                                            "test_bpb": 1.0}) == (
        "diverged", "non-finite training loss at step 13 (metrics.jsonl)")


def test_a_resumed_run_names_the_step_it_diverged_at(run, packed, tmp_path, monkeypatch):
    """The step counts from the start of the run, not of the process: stopped at step 14, resumed, and
    the loss not finite at step 23 is step 23, as in test_non_finite_loss_ends_the_run_as_diverged..."""
    with monkeypatch.context() as m:
        _signal_at(m, 13)
        with pytest.raises(SystemExit):
            run(packed, tmp_path, max_steps=30, save_every=10, log_every=5, eval_every=5)
    resumed_at = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"]
    poison_training_loss(monkeypatch, after_calls=22 - resumed_at)  # steps 1..22 finite, 23 not
    summary, run_dir = run(packed, tmp_path, max_steps=30, save_every=10, log_every=5, eval_every=5)
    assert summary["stop_reason"] == "diverged at step 23" and summary["final_step"] == 25
    assert history(run_dir, "diverged") == [{"kind": "diverged", "step": 23}]


def test_non_finite_loss_before_the_first_periodic_evaluation_keeps_the_untrained_model(run, packed, tmp_path,
                                                                                       monkeypatch):
    """An lr sweep's highest rate may diverge within a few steps: the run is recorded as diverged with
    the only weights it evaluated, the untrained ones (step 0), and the sweep goes on to its summary."""
    from tinylm.model import GPT

    poison_training_loss(monkeypatch, after_calls=12)
    summary, run_dir = run(packed, tmp_path, max_steps=30, save_every=10, log_every=5, eval_every=50)
    assert summary["stop_reason"] == "diverged at step 13" and summary["best_step"] == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kind"] == "eval" and rows[0]["step"] == 0 and rows[-2] == {"kind": "diverged", "step": 13}
    best, ckpt = model_from_checkpoint(run_dir / "checkpoints" / "best_model.pt")
    torch.manual_seed(json.loads((run_dir / "config.json").read_text())["train_config"]["seed"])
    untrained = GPT(best.config).state_dict()  # the model as the run built it before its first step
    assert ckpt["step"] == 0 and all(torch.equal(v, untrained[k]) for k, v in best.state_dict().items())


def test_wandb_failure_never_stops_training(run, packed, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.chdir(tmp_path)  # no .env here
    summary, _ = run(
        packed, tmp_path, max_steps=10, wandb={"enabled": True, "project": "x", "mode": "online"}
    )
    assert summary["final_step"] == 10


def test_packed_ids_beyond_vocab_are_refused(run, packed, tmp_path, tiny_train_model):
    from tinylm.errors import DataError

    with pytest.raises(DataError, match="vocab"):
        run(packed, tmp_path, model=tiny_train_model(vocab_size=300), max_steps=5)


def test_splits_packed_with_another_tokenizer_are_refused_naming_it(run, packed, tmp_path):
    """The message names the tokenizer the run was given, not 'the tokenizer given'."""
    from tinylm.errors import DataError

    other = tmp_path / "other" / "tokenizer.json"
    other.parent.mkdir()
    other.write_text(packed["tokenizer"].read_text().replace('"<unk>"', '"<unknown>"', 1))
    with pytest.raises(DataError, match=rf"train\.bin: packed with tokenizer sha256 \w+, but {other} has sha256"):
        run({**packed, "tokenizer": other}, tmp_path, max_steps=5)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """Synthetic stories -> a 512-token BPE -> packed rows of 17 tokens (train and validation)."""
    from tinylm.data import build_synthetic_corpus

    return build_synthetic_corpus(tmp_path_factory.mktemp("packed"), n_train=400, n_validation=40,
                                  vocab_size=512, seq_len=16)


def test_a_resume_with_another_eval_batch_size_is_refused(packed, tmp_path, monkeypatch, tiny_train_model,
                                                          tiny_train_config):
    """eval.batch_size is the batch of the evaluations that pick the best weights (an MoE layer's
    capacity follows it): a run interrupted under one and resumed under another would mix the two.
    The job and the workflow's check before any job refuse it, naming both, and keep last.pt."""
    from tinylm.workflow import check_resumes

    def train_with(eval_batch_size):
        return train(model_config=tiny_train_model(), train_config=tiny_train_config(max_steps=30),
                     train_bin=packed["train"], val_bin=packed["validation"], tokenizer_path=packed["tokenizer"],
                     run_dir=tmp_path / "run", eval_batch_size=eval_batch_size)

    _stopped_by_sigterm(monkeypatch, lambda: train_with(16))
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    with pytest.raises(CheckpointError, match=r"last\.pt: made with eval\.batch_size = 16, now 4: .*restore "
                                              r"eval\.batch_size: 16 to resume"):
        train_with(4)
    assert last.read_bytes() == before
    runs = {"run": {"model_config": tiny_train_model(), "train_config": tiny_train_config(max_steps=30),
                    "eval_batch_size": 4}}
    with pytest.raises(ConfigError, match=r"made with eval\.batch_size = 16, now 4"):
        check_resumes(runs, tmp_path)
    runs["run"]["eval_batch_size"] = 16
    check_resumes(runs, tmp_path)
    assert train_with(16)["final_step"] == 30


def _rows_of_another_length(packed, tmp_path):
    from tinylm.data import pack_split

    other = {"tokenizer": packed["tokenizer"]}
    for split in ("train", "validation"):
        other[split] = tmp_path / "p8" / f"{split}.bin"
        pack_split(Path(packed[split]).with_suffix(".txt"), packed["tokenizer"], other[split], seq_len=8)
    return other


def _other_validation_stories(packed, tmp_path):
    from tinylm.data import pack_split

    other = dict(packed)
    other["validation"] = tmp_path / "other" / "validation.bin"
    pack_split(Path(packed["train"]).with_suffix(".txt"), packed["tokenizer"], other["validation"], seq_len=16)
    return other


@pytest.mark.parametrize("other_data, message", [
    # packing.seq_len changed and the data rebuilt, as the workflow's refusal of changed data settings suggests
    (_rows_of_another_length, r"last\.pt: made with rows of packing\.seq_len = 16 tokens, but .*train\.bin has rows of 8"),
    # the same tokenizer and row length, other stories (dataset.validation_n changed, its folder rebuilt)
    (_other_validation_stories, r"last\.pt: made from the validation split sha256 \w+, but .*other/validation\.bin has sha256 \w+"),
])  # fmt: skip
def test_a_resume_on_other_packed_data_is_refused(run, packed, tmp_path, monkeypatch, other_data, message):
    """The resumed steps would train on other rows than the first ones, or pick the best weights by losses
    on two validation sets. The job refuses, naming the file, and keeps last.pt."""
    other = other_data(packed, tmp_path)
    _stopped_by_sigterm(monkeypatch, lambda: run(packed, tmp_path, max_steps=30))
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    with pytest.raises(CheckpointError, match=message):
        run(other, tmp_path, max_steps=30)
    assert last.read_bytes() == before
    assert run(packed, tmp_path, max_steps=30)[0]["final_step"] == 30


def test_dotenv_is_read_from_the_working_directory(tmp_path, monkeypatch):
    """README: the W&B key comes from the environment or a .env file in the working directory; not
    from a .env beside tinylm's sources or above them, nor from one above the working directory."""
    from tinylm import runlog

    monkeypatch.setenv("TINYLM_TEST_DOTENV", "unset below")
    monkeypatch.delenv("TINYLM_TEST_DOTENV")  # restored to unset after the test
    (tmp_path / ".env").write_text("TINYLM_TEST_DOTENV=from-dotenv\n")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    runlog.load_dotenv()
    assert "TINYLM_TEST_DOTENV" not in os.environ
    monkeypatch.chdir(tmp_path)
    runlog.load_dotenv()
    assert os.environ["TINYLM_TEST_DOTENV"] == "from-dotenv"
    monkeypatch.setenv("TINYLM_TEST_DOTENV", "from-environment")  # the environment wins
    runlog.load_dotenv()
    assert os.environ["TINYLM_TEST_DOTENV"] == "from-environment"


@pytest.mark.parametrize("damage", ["utf-16", "unreadable"])
def test_a_dotenv_that_cannot_be_read_is_named_and_w_and_b_goes_on(tmp_path, monkeypatch, caplog, damage):
    """A .env in UTF-16 (what PowerShell 5's `echo WANDB_API_KEY=... > .env` writes) or one this user may
    not read disabled W&B for the run, with the key in the environment or in offline mode, where none
    is needed; the warning, `UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 0`, named no file."""
    from tinylm.runlog import WandB

    monkeypatch.chdir(tmp_path)
    dotenv = tmp_path / ".env"
    dotenv.write_text("TINYLM_TEST_DOTENV=from-dotenv\n", encoding="utf-16" if damage == "utf-16" else "utf-8")
    if damage == "unreadable":
        import builtins

        opened = builtins.open

        def refuse(file, *args, **kwargs):  # chmod 000 binds no one under root
            if Path(file) == dotenv:
                raise PermissionError(13, "Permission denied", str(file))
            return opened(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setenv("TINYLM_TEST_DOTENV", "unset below")
    monkeypatch.delenv("TINYLM_TEST_DOTENV")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with caplog.at_level(logging.WARNING, logger="tinylm"):
        wandb = WandB({"enabled": True, "project": "tinylm-test", "mode": "offline"}, "r", {}, tmp_path / "run")
    try:
        assert wandb.run is not None, caplog.text
    finally:
        wandb.finish()
    assert "TINYLM_TEST_DOTENV" not in os.environ
    (warning,) = [r.getMessage() for r in caplog.records if r.name.startswith("tinylm") and r.levelno >= logging.WARNING]
    assert f"could not read {dotenv}" in warning and "W&B goes on without it" in warning, warning


def test_a_missing_w_and_b_key_is_named_with_where_tinylm_looked(tmp_path, monkeypatch, caplog):
    """Online without a key, W&B's own words were `No API key configured. Use `wandb login` to log in.`:
    nothing of the environment variable or of the .env file, the one that a .env saved beside the
    Snakefile of another working directory misses."""
    from tinylm.runlog import WandB

    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login either
    with caplog.at_level(logging.WARNING, logger="tinylm"):
        wandb = WandB({"enabled": True, "project": "tinylm-test", "mode": "online"}, "r", {}, tmp_path / "run")
    assert wandb.run is None
    (warning,) = [r.getMessage() for r in caplog.records if r.name.startswith("tinylm") and r.levelno >= logging.WARNING]
    assert f"no WANDB_API_KEY in the environment or in {tmp_path / '.env'}" in warning, warning
    assert "train.wandb.mode: offline" in warning, warning


def test_a_w_and_b_failure_other_than_the_key_gets_no_key_advice(tmp_path, monkeypatch, caplog):
    """A user logged in with `wandb login` (~/.netrc, no WANDB_API_KEY) whose start fails for another
    reason (network, project) was told to set WANDB_API_KEY."""
    import wandb

    from tinylm.runlog import WandB

    def init(**kwargs):
        raise wandb.errors.CommError("Network error (ConnectionError), entering retry loop.")

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(wandb, "init", init)
    with caplog.at_level(logging.WARNING, logger="tinylm"):
        run = WandB({"enabled": True, "project": "tinylm-test", "mode": "online"}, "r", {}, tmp_path / "run")
    assert run.run is None
    (warning,) = [r.getMessage() for r in caplog.records if r.name.startswith("tinylm") and r.levelno >= logging.WARNING]
    assert "Network error" in warning and "WANDB_API_KEY" not in warning, warning


def test_wandb_offline_logs_locally_and_the_key_stays_out_of_files(run, packed, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("WANDB_API_KEY=0123456789abcdef0123456789abcdef01234567\n")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    summary, run_dir = run(
        packed,
        tmp_path,
        max_steps=10,
        wandb={"enabled": True, "project": "tinylm-test", "mode": "offline"},
    )
    assert summary["final_step"] == 10
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline, "W&B offline mode wrote no run"
    out, err = capfd.readouterr()
    assert "deprecated" not in out + err, out + err  # every run printed W&B's warning about reinit=True
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".log", ".yaml", ".txt"):
            assert "0123456789abcdef" not in path.read_text(errors="replace"), path


def test_wandb_keeps_one_run_across_a_resume_and_logs_the_final_row(run, packed, tmp_path, monkeypatch, caplog):
    """A run stopped by SIGTERM and resumed is one W&B run (the same id, resumed), and the final `done`
    row, which has no step, goes to the run's summary instead of disabling W&B."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    wandb_cfg = {"enabled": True, "project": "tinylm-test", "mode": "offline"}
    with monkeypatch.context() as m:
        _signal_at(m, 6)
        with pytest.raises(SystemExit):
            run(packed, tmp_path, max_steps=12, wandb=wandb_cfg)
    with caplog.at_level(logging.WARNING, logger="tinylm"):
        summary, run_dir = run(packed, tmp_path, max_steps=12, wandb=wandb_cfg)
    assert summary["final_step"] == 12
    assert not [r.message for r in caplog.records if "W&B" in r.message]
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    ids = {re.match(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)", p.name)[1] for p in offline}  # then -1 within a second
    assert len(offline) == 2 and len(ids) == 1, offline
    # offline, the summary is a record in the run's transaction log (protobuf), keys as plain bytes
    log_bytes = next(offline[-1].glob("run-*.wandb")).read_bytes()
    assert b"final_step" in log_bytes and b"best_val_loss" in log_bytes


def test_a_fresh_start_removes_the_w_and_b_runs_of_the_attempt_before(run, packed, tmp_path, monkeypatch, caplog):
    """A run trained again from step 0 in its folder (`snakemake --forceall`, `--forcerun`, a deleted
    last.pt) left the earlier attempt's W&B runs in <run_dir>/wandb beside the new one: `wandb sync` of
    the folder uploaded them too, and it grew with every rebuild. With W&B off for the new attempt its
    run-id stayed too, and a resume with W&B on continued the discarded run. A fresh start removes the
    folder (a resume keeps it: test_wandb_keeps_one_run_across_a_resume_and_logs_the_final_row); the
    attempt logs stay."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    wandb_cfg = {"enabled": True, "project": "tinylm-test", "mode": "offline"}
    ids = []
    for _ in range(2):
        with caplog.at_level(logging.INFO, logger="tinylm"):
            _, run_dir = run(packed, tmp_path, max_steps=6, wandb=wandb_cfg)
        offline = list((run_dir / "wandb").glob("offline-run-*"))
        assert len(offline) == 1, offline
        ids.append(re.fullmatch(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)", offline[0].name)[1])
        assert (run_dir / "wandb" / "run-id").read_text().strip() == ids[-1]
    assert ids[0] != ids[1]
    assert [r.getMessage() for r in caplog.records if "removed" in r.getMessage()] == [
        f"this run starts from step 0: removed {run_dir / 'wandb'}, the W&B files of the attempt before (1 run)"]
    run(packed, tmp_path, max_steps=6, wandb={**wandb_cfg, "enabled": False})
    assert not (run_dir / "wandb").exists()
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == [f"attempt-{n}.log" for n in (1, 2, 3)]


def test_a_checkpoint_holds_host_copies_that_later_steps_leave_alone():
    """last.pt is written in the background while training goes on: what it holds must be copies."""
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    saved = host_copy(opt.state_dict())
    before = {k: v.clone() for k, v in saved["state"][0].items()}
    model(torch.ones(2, 4)).sum().backward()
    opt.step()  # updates the live state in place
    for key, value in before.items():
        assert torch.equal(saved["state"][0][key], value), key
    assert not torch.equal(saved["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert saved["param_groups"][0]["betas"] == opt.state_dict()["param_groups"][0]["betas"]


def test_a_failed_background_checkpoint_write_is_raised_naming_the_file(tmp_path):
    paths = RunPaths.in_run_dir(tmp_path / "run")
    paths.run_dir.mkdir()
    (paths.run_dir / "checkpoints").write_text("a file where the checkpoint folder belongs")
    files = RunFiles(paths, main=True)
    files.save_last({"step": 1})  # returns at once; the write fails in its thread
    with pytest.raises(CheckpointError, match=r"could not write .*last\.pt"):
        files.wait_for_writes()
    files.wait_for_writes()  # reported once


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_training_log_the_disk_cannot_hold_is_named_with_what_to_do(tmp_path):
    """A full disk while a line is appended to metrics.jsonl ended the trainer in an OSError traceback
    that named no file; it is one error naming the log and the resume. /dev/full refuses every write
    with ENOSPC, as a full disk does."""
    paths = RunPaths.in_run_dir(tmp_path / "run", history="/dev/full")
    files = RunFiles(paths, main=True)
    with pytest.raises(OutputError, match=r"could not write /dev/full: No space left on device .*resumes from"):
        files.record({"kind": "train", "step": 1, "loss": 1.0})


def test_a_failed_last_pt_write_is_warned_of_at_once_and_does_not_fail_a_finished_run(
        run, packed, tmp_path, monkeypatch, caplog):
    """A write of last.pt that fails in the background is logged when it fails. A later save raises it
    (the run stops, its last good last.pt kept); once the run has finished and written best_model.pt
    and its record, the failed last.pt no longer matters (it is deleted anyway): the run succeeds. It
    used to exit 1 after its outputs were written, and Snakemake deleted the finished run."""
    from tinylm import runlog

    real = runlog.save_checkpoint

    def full_disk(path, checkpoint):
        if Path(path).name == "last.pt" and checkpoint["step"] == 20:
            raise OSError(28, "No space left on device")
        return real(path, checkpoint)

    monkeypatch.setattr(runlog, "save_checkpoint", full_disk)
    with caplog.at_level(logging.WARNING, logger="tinylm"):
        summary, run_dir = run(packed, tmp_path, max_steps=30, save_every=10, eval_every=5)
    assert summary["final_step"] == 30
    assert (run_dir / "checkpoints" / "best_model.pt").is_file()
    assert not (run_dir / "checkpoints" / "last.pt").exists()
    warned = [r.getMessage() for r in caplog.records if "last.pt" in r.getMessage()]
    assert any("could not write" in m and "No space left on device" in m for m in warned), warned
    with pytest.raises(CheckpointError, match=r"could not write .*last\.pt.*No space left"):
        run(packed, tmp_path, name="longer", max_steps=40, save_every=10, eval_every=5)


def test_a_finished_run_removes_the_temp_file_of_a_last_pt_write_that_was_killed(run, packed, tmp_path):
    """A write of last.pt killed part-way (SIGKILL in a stop signal's grace period, out of memory) leaves
    its temporary file, removed by the next write of last.pt. A run whose remaining steps wrote none (no
    save_every step left before max_steps, or save_every raised on the rerun) kept it, checkpoint-sized,
    beside best_model.pt for good; a finished run removes it with last.pt."""
    import subprocess
    import sys

    from tinylm.io import TMP_PREFIX

    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()  # a pid no process has now: the killed writer's
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / f"{TMP_PREFIX}{gone.pid}.last.pt.abcd_123.tmp").write_bytes(b"half a checkpoint")
    run(packed, tmp_path, max_steps=10, eval_every=5, save_every=100)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best_model.pt"]


def test_last_pt_is_kept_while_wandb_finishes(run, packed, tmp_path, monkeypatch):
    """W&B's finish uploads the run (seconds, online) after best_model.pt is written. last.pt was removed
    before it, so a job killed then (SIGKILL after a time limit's grace period: SIGTERM is ignored while
    the run ends) failed, Snakemake deleted its outputs, and nothing was left to resume: the whole run
    trained again. last.pt now goes once W&B is done."""
    from tinylm import runlog

    last = tmp_path / "run" / "checkpoints" / "last.pt"
    seen = []
    monkeypatch.setattr(runlog.WandB, "finish", lambda self: seen.append(last.exists()))
    run(packed, tmp_path, max_steps=30, save_every=10)
    assert seen == [True] and not last.exists()


def test_a_run_writes_last_pt_in_the_background_and_waits_for_it(run, packed, tmp_path, monkeypatch):
    """Every save_every step hands last.pt to a writer thread; a stop signal's save is on disk before exit."""
    import threading

    from tinylm import runlog

    writers = []
    real_thread = threading.Thread

    def thread(*args, **kwargs):
        t = real_thread(*args, **kwargs)
        writers.append(t)
        return t

    monkeypatch.setattr(runlog.threading, "Thread", thread)
    run(packed, tmp_path, max_steps=30, save_every=10, log_every=5, eval_every=10)
    assert [t.name for t in writers] == ["tinylm-save-last"] * 2  # steps 10 and 20 (none at the last step)
    assert not any(t.is_alive() for t in writers)


def test_a_best_model_changed_after_training_is_refused_by_evaluation_and_verify(run, packed, tmp_path):
    """Training records best_model.pt's sha256 in the run's config.json. Evaluation and generation
    (model_from_checkpoint) refuse a file that no longer matches, and verify reports it: before, the
    only record was metrics.json's, which re-evaluating the damaged file rewrote."""
    from tinylm.checkpoint import model_from_checkpoint
    from tinylm.errors import DataError
    from tinylm.verify import verify_artifacts

    _, run_dir = run(packed, tmp_path, max_steps=6)
    best = run_dir / "checkpoints" / "best_model.pt"
    record = json.loads((run_dir / "config.json").read_text())["files"]["checkpoints/best_model.pt"]
    assert record["bytes"] == best.stat().st_size
    model_from_checkpoint(best)  # intact: loads
    verify_artifacts([run_dir])
    data = bytearray(best.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\x3f" * 64  # inside the weights; same size
    best.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"best_model\.pt: sha256 .*, but .*config\.json recorded .* when training"):
        model_from_checkpoint(best)
    with pytest.raises(DataError, match=r"best_model\.pt: sha256"):
        verify_artifacts([run_dir])


def test_checkpoints_store_the_tied_embedding_once(run, packed, tmp_path, monkeypatch):
    """lm_head.weight is tok_emb.weight: saved as two copies it took 2 MB of condor's 5.6 MB file.
    Both names stay (load_state_dict wants them), one storage behind them."""
    with monkeypatch.context() as m:
        _signal_at(m, 6)  # after the evaluation at step 4: last.pt holds best weights too
        with pytest.raises(SystemExit):
            run(packed, tmp_path, max_steps=8, eval_every=4)
    run_dir = tmp_path / "run"
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    _, run_dir = run(packed, tmp_path, max_steps=8, eval_every=4)
    best = torch.load(run_dir / "checkpoints" / "best_model.pt", weights_only=True)
    for weights in (best["model"], last["model"], last["best_model"]):
        emb, head = weights["tok_emb.weight"], weights["lm_head.weight"]
        assert emb.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()


def test_a_signal_during_the_step_0_evaluation_exits_as_preempted(run, packed, tmp_path, monkeypatch):
    """The evaluation before step 1 (with train.compile_eval it compiles) is inside the loop's signal
    handling: the job exits with the preempted status, nothing to resume, and runs again from scratch."""
    import tinylm.train as train_mod

    real = train_mod.evaluate_loss

    def evaluate_and_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(train_mod, "evaluate_loss", evaluate_and_signal)
        with pytest.raises(SystemExit) as exc:
            run(packed, tmp_path, max_steps=10, eval_every=5)
    assert exc.value.code == EXIT_PREEMPTED
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    summary, run_dir = run(packed, tmp_path, max_steps=10, eval_every=5)
    assert summary["final_step"] == 10 and [r["step"] for r in history(run_dir, "eval")] == [0, 5, 10]


def test_a_run_resumed_without_any_evaluation_that_diverges_fails_and_keeps_last_pt(run, packed, tmp_path,
                                                                                     monkeypatch):
    """A last.pt written before runs evaluated at step 0 (tinylm older than 2026-12-05) may hold no
    best weights: a divergence before the next evaluation leaves nothing to keep, and the job fails."""
    import tinylm.train as train_mod

    with monkeypatch.context() as m:
        m.setattr(train_mod.Run, "evaluate_untrained", lambda self, stop: None)  # as those versions ran
        _signal_at(m, 3)
        with pytest.raises(SystemExit):
            run(packed, tmp_path, max_steps=30, save_every=10, log_every=5, eval_every=50)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 4
    poison_training_loss(monkeypatch, after_calls=8)  # steps 5..12 finite, 13 not
    with pytest.raises(TrainingError, match=r"non-finite training loss at step 13, before any evaluation.*last\.pt"):
        run(packed, tmp_path, max_steps=30, save_every=10, log_every=5, eval_every=50)
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["step"] == 10 and all(torch.isfinite(v).all() for v in last["model"].values())


def test_a_resume_with_other_settings_is_refused_before_any_job(run, packed, tmp_path, monkeypatch,
                                                                 tiny_train_model, tiny_train_config):
    """The workflow's onstart check (workflow.check_resumes) judges an interrupted run's last.pt as its
    training job's resume would: other math refused, naming the setting and keeping last.pt; settings
    that do not change the math, and runs with no last.pt, pass."""
    from tinylm.errors import ConfigError
    from tinylm.workflow import check_resumes, dry_run_warnings

    _stopped_by_sigterm(monkeypatch, lambda: run(packed, tmp_path, max_steps=30))
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    before = last.read_bytes()

    def runs(model=None, **over):
        return {"run": {"model_config": model or tiny_train_model(), "train_config": tiny_train_config(max_steps=30, **over)},
                "fresh": {"model_config": tiny_train_model(d_model=64), "train_config": tiny_train_config()}}

    check_resumes(runs(), tmp_path)
    check_resumes(runs(log_every=3, gpus=2, device="cpu"), tmp_path)
    with pytest.raises(ConfigError, match=r"last\.pt: made with a different train config \(lr: checkpoint 0\.003 vs now "
                                          r"0\.01\); delete the checkpoint to start over, or restore the old settings\. "
                                          r"Nothing was run; .*last\.pt is kept"):
        check_resumes(runs(lr=1e-2), tmp_path)
    with pytest.raises(ConfigError, match="different model config.*d_model"):
        check_resumes(runs(model=tiny_train_model(d_model=64)), tmp_path)
    # rows of another packing.seq_len: the job repacks the data, then refuses last.pt (checkpoint.check_resumable)
    at_seq_len = runs()
    at_seq_len["run"]["seq_len"] = 16  # the rows the run trained on
    check_resumes(at_seq_len, tmp_path)
    at_seq_len["run"]["seq_len"] = 32
    with pytest.raises(ConfigError, match=r"last\.pt: made with rows of packing\.seq_len = 16 tokens, but this "
                                          r"config's packed data \(packing\.seq_len\) has rows of 32"):
        check_resumes(at_seq_len, tmp_path)
    # a dry run, which skips the check, warns of it
    assert dry_run_warnings(runs(), tmp_path) == []
    warning, = dry_run_warnings(runs(lr=1e-2), tmp_path)
    assert re.fullmatch(r".*last\.pt: made with a different train config \(lr: checkpoint 0\.003 vs now 0\.01\).*; "
                        r"without -n, Snakemake stops before any job when it is to train run run", warning), warning
    # two runs refused: both named in one message
    shutil.copytree(tmp_path / "run" / "checkpoints", tmp_path / "copy" / "checkpoints")
    both = {**runs(lr=1e-2), "copy": runs(lr=1e-2)["run"]}
    with pytest.raises(ConfigError) as e:
        check_resumes(both, tmp_path)
    assert [line.split(": made with")[0] for line in str(e.value).splitlines()] == [
        str(last), str(tmp_path / "copy" / "checkpoints" / "last.pt"), "Nothing was run; those last.pt files are kept"]
    assert len(dry_run_warnings(both, tmp_path)) == 2
    assert last.read_bytes() == before
    summary, _ = run(packed, tmp_path, max_steps=30)  # what check_resumes passed, resume takes
    assert summary["final_step"] == 30


def test_a_checkpoint_that_cannot_be_written_is_named_with_what_to_do(tmp_path):
    """A disk that fills up while torch.save writes gave torch's own RuntimeError ("[enforce fail at
    inline_container.cc:...] . unexpected pos ..."), naming neither the checkpoint nor the cause: at the
    end of a run, a traceback for best_model.pt. Here the kernel refuses the write past a file-size limit."""
    import subprocess
    import sys

    path = tmp_path / "checkpoints" / "best_model.pt"
    path.parent.mkdir()
    path.write_bytes(b"the checkpoint before")
    script = f"""
import resource, signal, torch
from tinylm.checkpoint import save_checkpoint
from tinylm.errors import CheckpointError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
try:
    save_checkpoint({str(path)!r}, {{"model": {{"w": torch.zeros(100_000)}}}})
except CheckpointError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"could not write {path} (") and "room on its disk" in out.stdout, out.stdout
    assert path.read_bytes() == b"the checkpoint before" and os.listdir(path.parent) == ["best_model.pt"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/self/fd (Linux)")
def test_a_checkpoint_write_refused_for_room_frees_the_room_while_its_error_is_kept(tmp_path):
    """torch.save's writer of the temporary file stays open as long as the error refers to it (its
    frames are in the traceback), so the removed temp kept its bytes on the disk: a run keeps a failed
    background write of last.pt to raise later, and on a full disk it then could not write even
    best_model.pt, though removing the temp had made room for it. A refused write now frees its bytes
    at once, whoever still holds the error."""
    import subprocess
    import sys

    path = tmp_path / "checkpoints" / "last.pt"
    script = f"""
import os, resource, signal, torch
from tinylm.checkpoint import save_checkpoint
from tinylm.errors import CheckpointError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
try:
    save_checkpoint({str(path)!r}, {{"model": {{"w": torch.zeros(100_000)}}}})
except CheckpointError as e:
    kept = e  # as RunFiles keeps a background write's error
held = []
for fd in os.listdir("/proc/self/fd"):
    target = os.readlink(f"/proc/self/fd/{{fd}}") if os.path.islink(f"/proc/self/fd/{{fd}}") else ""
    if ".tinylm-tmp." in target:
        held.append((target, os.stat(f"/proc/self/fd/{{fd}}").st_blocks))
print(held)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert out.returncode == 0, out.stderr
    held = eval(out.stdout)
    assert all(blocks == 0 for _, blocks in held), held
    assert os.listdir(path.parent) == []


def test_an_early_stopped_run_logs_the_training_loss_of_its_last_steps(run, packed, tmp_path):
    """The last window is logged however the run ends: at max_steps, and at an early stop that falls
    between two log steps (here the evaluation at step 10, with train lines every 3 steps)."""
    summary, run_dir = run(packed, tmp_path, lr=1e-12, min_lr=0.0, max_steps=100, eval_every=5, log_every=3,
                           patience=2, min_delta=0.01)
    assert summary["stop_reason"].startswith("early stopping") and summary["final_step"] == 10
    assert [r["step"] for r in history(run_dir, "train")] == [3, 6, 9, 10]
    assert check_history(run_dir / "metrics.jsonl") == []
