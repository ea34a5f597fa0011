"""Rule train_model's script on a machine with several GPUs: it claims the least used one before CUDA
starts (tinylm.gpu_claim; lib/tests/test_gpu_claim.py tests the claims themselves)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from conftest import train_script

from tinylm.gpu_claim import claim


def test_a_training_job_beside_another_takes_the_other_gpu(packed, tiny_train_model, tiny_train_config,
                                                           tmp_path, monkeypatch):
    """Two GPUs visible (a stand-in nvidia-smi lists them), the first held by another job: the script
    claims the second and shows CUDA only that one. Without CUDA here it then trains on the CPU."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    bin_dir, tmp = tmp_path / "bin", tmp_path / "tmp"
    bin_dir.mkdir()
    tmp.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf 'GPU-1111\\nGPU-2222\\n'\n")
    smi.chmod(0o755)
    # the other job's claim, where the script looks for claims: its temporary directory
    _, other_job, _ = claim(["GPU-1111", "GPU-2222"], tmp / f"tinylm-gpu-claims-{os.getuid()}")
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    run_dir = tmp_path / "run"
    rows = train_script(packed, run_dir, tiny_train_model(), tiny_train_config(max_steps=2, device="auto"), processes=1,
                        env={"PATH": path, "TMPDIR": str(tmp)})
    other_job.close()
    assert rows[-1]["kind"] == "done"
    out = (run_dir / "script-output.txt").read_text()
    assert "GPU 1 of the 2 visible (GPU-2222), 0 other training jobs on it" in out, out
