"""tests/faults.py, three seeded trials: interrupted and recovered as README.md says, the workflow
ends with the artifacts of an uninterrupted run. About two minutes on 2 cores."""

from __future__ import annotations

import faults  # tests/, on sys.path as the folder of this test file
import pytest


@pytest.mark.slow
def test_interrupted_workflows_recover_to_the_uninterrupted_artifacts(tmp_path, capsys):
    # Seed 200: SIGTERM to training, SIGKILL to everything while data is made, and SIGKILL to
    # Snakemake early in training (its orphaned trainer then meets the rerun's).
    status = faults.main(["--trials", "3", "--seed", "200", "--keep", str(tmp_path)])
    out = capsys.readouterr().out
    for fault in ("sigterm-job", "sigkill-all", "sigkill-snakemake"):
        assert f": {fault} " in out, out
    assert "3 faults, 3 recovered, 0 lost" in out, out
    assert status == 0, out
