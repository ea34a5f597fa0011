"""tinylm.gpu_claim: jobs side by side on a machine with several GPUs each take the least used one."""

from __future__ import annotations

import fcntl
import select
import subprocess
import sys
import textwrap

import pytest

from tinylm import gpu_claim
from tinylm.gpu_claim import claim, claim_gpu_for_job, visible_gpus

GPUS = ["GPU-aaaa", "GPU-bbbb"]


@pytest.fixture(autouse=True)
def give_back_claims():
    """claim_gpu_for_job keeps its claim for the process's life: here, for one test's."""
    yield
    for f in gpu_claim._held:
        f.close()
    gpu_claim._held.clear()


def test_claims_spread_over_the_gpus_then_share_them_two_by_two(tmp_path):
    held = [claim(GPUS, tmp_path) for _ in range(5)]
    assert [(i, others) for i, _, others in held] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2)]
    held[1][1].close()  # a job on GPU 1 ends
    i, f, others = claim(GPUS, tmp_path)
    assert (i, others) == (1, 1)
    assert f.name == str(tmp_path / "GPU-bbbb.0.lock")  # its freed slot, not a new one
    for _, g, _ in held:
        g.close()
    f.close()
    a, b = claim(GPUS, tmp_path), claim(GPUS, tmp_path)
    assert (a[0], a[2], b[0], b[2]) == (0, 0, 1, 0)  # all given back


# A job that claims a GPU, says which, and holds it until its stdin closes or it is killed.
HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from tinylm.gpu_claim import claim
    i, f, others = claim(sys.argv[2:], Path(sys.argv[1]))
    print(i, others, flush=True)
    sys.stdin.read()
""")


def test_claims_of_jobs_that_start_together_split_evenly_and_die_with_them(tmp_path):
    jobs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), *GPUS], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True) for _ in range(4)]
    got = sorted(tuple(map(int, job.stdout.readline().split())) for job in jobs)
    assert got == [(0, 0), (0, 1), (1, 0), (1, 1)]  # two jobs a GPU, whatever order they came in
    jobs[0].kill()  # killed, not stopped: the kernel still drops its lock
    jobs[0].wait()
    i, f, others = claim(GPUS, tmp_path)
    assert others == 1  # the killed job's GPU, which now has one job left
    f.close()
    for job in jobs[1:]:
        job.stdin.close()
        job.wait()


# A claimer that says when it is about to claim.
WAITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from tinylm.gpu_claim import claim
    print("ready", flush=True)
    i, f, others = claim(sys.argv[2:], Path(sys.argv[1]))
    print(i, others, flush=True)
    sys.stdin.read()
""")


def test_claimers_choose_one_at_a_time(tmp_path):
    """Counting the held slots and taking one is one step: a claimer waits while another chooses."""
    with open(tmp_path / "choose.lock", "a") as choosing:
        fcntl.flock(choosing, fcntl.LOCK_EX)  # this test is choosing
        job = subprocess.Popen([sys.executable, "-c", WAITER, str(tmp_path), *GPUS], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
        assert job.stdout.readline() == "ready\n"
        ready, _, _ = select.select([job.stdout], [], [], 2)  # a claim takes milliseconds
        assert not ready, "the job claimed a GPU while another claimer was choosing"
    assert job.stdout.readline().split() == ["0", "0"]  # as soon as the choice was free
    job.stdin.close()
    job.wait()


def test_a_training_job_shows_cuda_only_its_gpu(tmp_path):
    env = {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert claim_gpu_for_job("auto", env, tmp_path) == "2" and env["CUDA_VISIBLE_DEVICES"] == "2"
    env = {"CUDA_VISIBLE_DEVICES": "2, 3"}  # the first job still holds GPU 2
    assert claim_gpu_for_job("cuda", env, tmp_path) == "3" and env["CUDA_VISIBLE_DEVICES"] == "3"


@pytest.mark.parametrize("device, env", [
    ("cuda:1", {"CUDA_VISIBLE_DEVICES": "GPU-aaaa,GPU-bbbb"}),  # the user chose the GPU
    ("auto", {"CUDA_VISIBLE_DEVICES": "GPU-aaaa,GPU-bbbb", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}),  # torchrun
])
def test_a_job_that_names_its_gpu_keeps_it_and_counts_on_it(tmp_path, device, env):
    """It chooses nothing and CUDA shows it what it showed before, but a job choosing after it sees its GPU
    in use and takes the other."""
    before = dict(env)
    assert claim_gpu_for_job(device, env, tmp_path) == "GPU-bbbb"
    assert env == before
    assert claim(GPUS, tmp_path)[:3:2] == (0, 0)
    other = {"CUDA_VISIBLE_DEVICES": "GPU-aaaa,GPU-bbbb"}
    assert claim_gpu_for_job("auto", other, tmp_path) == "GPU-aaaa"  # the test's own claim went with its file


@pytest.mark.parametrize("device, env", [
    ("cpu", {"CUDA_VISIBLE_DEVICES": "0,1"}),
    ("auto", {"CUDA_VISIBLE_DEVICES": "1"}),  # one GPU (a SLURM job's, say): nothing to choose
    ("auto", {"CUDA_VISIBLE_DEVICES": ""}),
    ("auto", {"CUDA_VISIBLE_DEVICES": "0,-1,2"}),  # CUDA stops at -1: it shows GPU 0 alone
    ("cuda:2", {"CUDA_VISIBLE_DEVICES": "0,1"}),  # not there: training says so
])
def test_nothing_is_claimed_where_there_is_no_choice_to_make(tmp_path, device, env):
    before = dict(env)
    assert claim_gpu_for_job(device, env, tmp_path) is None
    assert env == before and not any(tmp_path.iterdir())


def test_cuda_visible_devices_counts_up_to_its_first_entry_cuda_cannot_read():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-1a2b, 3,MIG-4c5d,foo,2"}) == ["GPU-1a2b", "3", "MIG-4c5d"]


def test_a_claim_that_cannot_be_made_leaves_the_job_as_it_was(tmp_path, caplog):
    lock_dir = tmp_path / "claims"
    lock_dir.write_text("a file where the folder should be")
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert claim_gpu_for_job("auto", env, lock_dir) is None
    assert env == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert "could not claim a GPU" in caplog.text and "trains on the first visible GPU" in caplog.text


def test_without_cuda_visible_devices_the_gpus_are_those_nvidia_smi_lists(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n[ \"$1\" = --query-gpu=uuid ] || exit 9\nprintf 'GPU-1111\\nGPU-2222\\n'\n")
    smi.chmod(0o755)
    assert visible_gpus({"PATH": str(bin_dir)}) == ["GPU-1111", "GPU-2222"]
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")  # no driver loaded
    assert visible_gpus({"PATH": str(bin_dir)}) == []
    assert visible_gpus({"PATH": str(tmp_path / "empty")}) == []  # no nvidia-smi: a machine without GPUs
