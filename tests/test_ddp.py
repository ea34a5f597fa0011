"""Data parallelism: two torchrun processes on the CPU (gloo) follow the same loss curve as one process
at the same global batch, and stop together when one's loss is not finite. Runs
workflow_scripts/train_model.py the way rule train_model launches it."""

from __future__ import annotations

import sys

import pytest
from conftest import assert_same_curves, train_script


def test_two_processes_match_one_at_the_same_global_batch(packed, one_process_run, tmp_path):
    """Dense model only: a MoE layer's capacity and balance loss depend on each process's own batch."""
    model, train, one = one_process_run
    two = train_script(packed, tmp_path / "two", model, train, processes=2)

    assert_same_curves(one, two, train["max_steps"])


# Run as the torchrun script: rank 0's training loss turns NaN after POISON_AFTER steps, then the
# script named next runs as __main__ with the remaining arguments.
POISON_RANK0 = """
import os, runpy, sys
from tinylm.model import GPT

real_forward, calls = GPT.forward, [0]

def poisoned(self, idx, targets=None, **kw):
    out = real_forward(self, idx, targets, **kw)
    if targets is not None and self.training and os.environ["RANK"] == "0":
        calls[0] += 1
        if calls[0] > int(os.environ["POISON_AFTER"]):
            out["loss"] = out["loss"] * float("nan")
    return out

GPT.forward = poisoned
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_loss_not_finite_on_one_process_ends_the_run_on_all(packed, tiny_train_model, tiny_train_config,
                                                               tmp_path):
    """Rank 0's loss turns NaN on step 15, a step where the processes meet: rank 1's is still finite
    there (the NaN reaches its weights through the step's gradients). Both must stop as diverged at
    step 15, or the one going on waits in a collective the other never joins."""
    script = tmp_path / "poison_rank0.py"
    script.write_text(POISON_RANK0)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    train = tiny_train_config(max_steps=30, log_every=5, eval_every=5)
    rows = train_script(packed, tmp_path / "run", tiny_train_model(), train, processes=2, launcher=launcher,
                        env={"POISON_AFTER": "14"})
    assert [r for r in rows if r["kind"] == "diverged"] == [{"kind": "diverged", "step": 15}]
    assert rows[-1]["kind"] == "done" and rows[-1]["stop_reason"] == "diverged at step 15"
    assert rows[-1]["best_step"] == 10


# Run as the torchrun script: rank 0 stops the run with SIGTERM during STOP_AT (the run saves last.pt);
# with NODE_DIR set, every other rank trains in NODE_DIR instead of --run-dir, as processes on nodes that
# each see a disk of their own would. Then the script named next runs as __main__.
NODE_LOCAL = """
import os, runpy, signal, sys
import tinylm.step

real_lr_at, stop_at = tinylm.step.lr_at, int(os.environ.get("STOP_AT", "-1"))

def lr_and_signal(step, cfg):
    if step == stop_at and os.environ["RANK"] == "0":
        os.kill(os.getpid(), signal.SIGTERM)
    return real_lr_at(step, cfg)

tinylm.step.lr_at = lr_and_signal
sys.argv = sys.argv[1:]
if os.environ.get("NODE_DIR") and os.environ["RANK"] != "0":
    sys.argv[sys.argv.index("--run-dir") + 1] = os.environ["NODE_DIR"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_processes_that_see_different_run_directories_refuse_to_resume(packed, tiny_train_model, tiny_train_config,
                                                                       tmp_path):
    """Each process decided on its own whether to resume: across nodes whose run directories differ (a
    node-local disk), rank 0 resumed from last.pt while the others started from step 0 with fresh
    weights, then waited in collectives rank 0 never joined. Every process must refuse, keeping last.pt,
    and the same run resumes once they see one directory."""
    import hashlib

    script = tmp_path / "node_local.py"
    script.write_text(NODE_LOCAL)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    train = tiny_train_config(max_steps=30, log_every=5, eval_every=10, save_every=10)
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.pt"
    with pytest.raises(AssertionError, match="failed"):  # stopped: a run of several processes exits 1
        train_script(packed, run_dir, tiny_train_model(), train, processes=2, launcher=launcher,
                     env={"STOP_AT": "13"})
    saved = hashlib.sha256(last.read_bytes()).hexdigest()

    with pytest.raises(AssertionError, match="failed") as refused:
        train_script(packed, run_dir, tiny_train_model(), train, processes=2, launcher=launcher,
                     env={"NODE_DIR": str(tmp_path / "node1")}, timeout=120)
    said = str(refused.value)
    assert "do not all see one run directory" in said and f"{last} is kept" in said, said[-3000:]
    assert hashlib.sha256(last.read_bytes()).hexdigest() == saved
    # a last.pt of their own, from another step
    with pytest.raises(AssertionError, match="failed"):
        train_script(packed, tmp_path / "node1", tiny_train_model(), train, processes=2, launcher=launcher,
                     env={"STOP_AT": "7"})
    with pytest.raises(AssertionError, match="failed") as refused:
        train_script(packed, run_dir, tiny_train_model(), train, processes=2, launcher=launcher,
                     env={"NODE_DIR": str(tmp_path / "node1")}, timeout=120)
    assert f"finds a {last} other than another rank's" in str(refused.value), str(refused.value)[-3000:]
    assert hashlib.sha256(last.read_bytes()).hexdigest() == saved
    rows = train_script(packed, run_dir, tiny_train_model(), train, processes=2, launcher=launcher)
    assert rows[-1]["kind"] == "done" and rows[-1]["final_step"] == 30
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(5, 31, 5))
