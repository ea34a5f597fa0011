"""Data parallelism: two torchrun processes on the CPU (gloo) follow the same loss curve as one process
at the same global batch, and stop together when one's loss is not finite. Runs
workflow_scripts/train_model.py the way rule train_model launches it."""

from __future__ import annotations

import sys

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
