"""Data parallelism: two torchrun processes on the CPU (gloo) follow the same loss curve as one process
at the same global batch. Runs workflow_scripts/train_model.py the way rule train_model launches it."""

from __future__ import annotations

from conftest import assert_same_curves, train_script


def test_two_processes_match_one_at_the_same_global_batch(packed, one_process_run, tmp_path):
    """Dense model only: a MoE layer's capacity and balance loss depend on each process's own batch."""
    model, train, one = one_process_run
    two = train_script(packed, tmp_path / "two", model, train, processes=2)

    assert_same_curves(one, two, train["max_steps"])
