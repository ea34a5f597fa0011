"""Data parallelism: two torchrun processes on the CPU (gloo) follow the same loss curve as one process
at the same global batch. Runs workflow_scripts/train_model.py the way rule train_model launches it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """Synthetic stories -> a 512-token BPE -> packed rows of 17 tokens (train and validation)."""
    from tinylm.data import build_synthetic_corpus

    return build_synthetic_corpus(tmp_path_factory.mktemp("packed"), n_train=400, n_validation=40,
                                  vocab_size=512, seq_len=16)


def train_script(packed, run_dir: Path, model: dict, train: dict, processes: int) -> list[dict]:
    """Run train_model.py (under torchrun for several processes); return metrics.jsonl's rows."""
    params = {"model": model, "train": {**train, "gpus": processes}, "eval_batch_size": 16}
    launcher = [sys.executable]
    if processes > 1:  # what rules/common.smk's train_launcher builds for train.gpus > 1
        launcher += [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(processes),
        ]
    cmd = [
        *launcher,
        str(REPO / "workflow_scripts" / "train_model.py"),
        "--name",
        run_dir.name,
        "--train-bin",
        str(packed["train"]),
        "--val-bin",
        str(packed["validation"]),
        "--tokenizer",
        str(packed["tokenizer"]),
        "--best",
        str(run_dir / "checkpoints" / "best_model.pt"),
        "--history",
        str(run_dir / "metrics.jsonl"),
        "--config",
        str(run_dir / "config.json"),
        "--run-dir",
        str(run_dir),
        "--threads",
        "1",
        "--params",
        json.dumps(params),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "lib")}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert res.returncode == 0, (
        f"{' '.join(cmd[:8])} ... failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    )
    assert json.loads((run_dir / "config.json").read_text())["world_size"] == processes
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def curve(rows: list[dict], kind: str, key: str = "loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if r["kind"] == kind]


def test_two_processes_match_one_at_the_same_global_batch(
    packed, tmp_path, tiny_train_model, tiny_train_config
):
    """Dense model only: a MoE layer's capacity and balance loss depend on each process's own batch."""
    model, train = tiny_train_model(), tiny_train_config(max_steps=20, log_every=1)
    one = train_script(packed, tmp_path / "one", model, train, processes=1)
    two = train_script(packed, tmp_path / "two", model, train, processes=2)

    train_one, train_two = curve(one, "train"), curve(two, "train")
    assert [s for s, _ in train_one] == list(range(1, train["max_steps"] + 1))
    assert [s for s, _ in train_two] == [s for s, _ in train_one]
    for (step, a), (_, b) in zip(train_one, train_two, strict=True):
        assert b == pytest.approx(a, abs=1e-4), f"step {step}: one process {a}, two processes {b}"
    eval_one, eval_two = curve(one, "eval", "val_loss"), curve(two, "eval", "val_loss")
    assert eval_one and [s for s, _ in eval_two] == [s for s, _ in eval_one]
    assert [v for _, v in eval_two] == pytest.approx([v for _, v in eval_one], abs=1e-4)
    # the loss moved: equal curves are not two copies of an untrained model
    assert train_one[-1][1] < train_one[0][1] - 0.5
