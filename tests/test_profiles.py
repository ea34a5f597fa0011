"""The profiles as the README and docs/cluster.md type them, in a copy laid out like a fresh clone.

Dry runs: Snakemake plans the jobs with the profile's resources and submits nothing, so no SLURM
cluster is needed (tests/test_slurm.py runs the profile on a real one).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, offline_env, planned_jobs, snakemake

WHOLE_CHAIN = {"all": 1, "download_tinystories": 1, "train_tokenizer": 1, "pack_tokens": 3,
               "train_model": 3, "evaluate_model": 3, "summarize": 1}


@pytest.fixture()
def no_user_profiles(tmp_path) -> dict:
    """Environment without the user's and the site's profile folders, so that `--profile slurm` can
    only find the one in the repository."""
    home = tmp_path / "home"
    home.mkdir()
    return {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_CONFIG_DIRS": str(tmp_path / "xdg")}


@pytest.mark.parametrize("profile", ["slurm", "profiles/slurm"])
def test_slurm_profile_plans_every_job_with_its_resources(repo_copy, no_user_profiles, profile):
    res = snakemake(repo_copy, "--profile", profile, "-n", env=no_user_profiles)
    out = res.stdout + res.stderr
    assert f"Using profile {profile} for setting default command line arguments" in out
    assert planned_jobs(res) == WHOLE_CHAIN
    train = re.search(r"^rule train_model:\n(?:    .*\n)*?    resources: (.*)$", out, re.M)
    assert train, out
    # from profiles/slurm/config.yaml: default-resources, then train_model's set-resources
    for setting in ("slurm_partition=debug", "runtime=240", "mem_mb=32000", "cpus_per_gpu=4", "tasks=0",
                    "nodes=1", "slurm_extra=--signal=TERM@120"):
        assert setting in train.group(1), train.group(1)
    # --gpus=N counts the job's GPUs over all its nodes: one node, or torchrun --standalone sees part of them
    evaluate = re.search(r"^rule evaluate_model:\n(?:    .*\n)*?    resources: (.*)$", out, re.M)
    assert evaluate and "nodes=1" in evaluate.group(1).split(", "), out


def test_local_profile_trains_one_model_per_gpu_and_evaluates_beside_it(repo_copy, no_user_profiles):
    """profiles/local: training jobs take the machine's one GPU; evaluation jobs take none of it, so
    an evaluation runs beside the next model's training instead of after every training."""
    res = snakemake(repo_copy, "--profile", "profiles/local", "-n", env=no_user_profiles)
    out = res.stdout + res.stderr
    assert planned_jobs(res) == WHOLE_CHAIN
    for rule, gpus in (("train_model", "gpu=1"), ("evaluate_model", "gpu=0")):
        jobs = re.findall(rf"^rule {rule}:\n(?:    .*\n)*?    resources: (.*)$", out, re.M)
        assert len(jobs) == 3 and all(gpus in r.split(", ") for r in jobs), (rule, jobs)


def test_the_launch_across_nodes_refuses_to_run_without_srun():
    """profiles/slurm/torchrun-nodes.sh in a batch script's environment (a job, no job step): it
    stops at once, where one torchrun would wait for nodes that never join (tests/test_slurm.py runs
    it under srun)."""
    batch = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    batch.update(SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n[1-2]", SLURM_NTASKS="2", SLURM_NNODES="2")
    res = subprocess.run([str(REPO / "profiles" / "slurm" / "torchrun-nodes.sh"), "4", "train.py"],
                         capture_output=True, text=True, env=batch, timeout=30)
    assert res.returncode == 2 and "SLURM_STEP_NODELIST is not set: run this with srun" in res.stderr, res.stderr


def test_the_study_command_runs_two_trainings_at_once_and_passes_targets_on(repo_copy, no_user_profiles):
    """dev/study.py, the README's one command for the whole study: the local profile with two training
    jobs at once (--resources gpu=2), and extra arguments (here a dry run of one model's chain) placed
    where neither --resources nor --configfile, which take every word up to the next option, swallow
    a target."""
    env = {**offline_env(), **no_user_profiles, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    res = subprocess.run([sys.executable, "dev/study.py", "--", "-pn", "artifacts/study/runs/condor/metrics.json"],
                         cwd=repo_copy, capture_output=True, text=True, env=env, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert ("$ snakemake -pn artifacts/study/runs/condor/metrics.json --profile profiles/local --resources gpu=2 "
            "--configfile config/study.yaml") in out
    assert planned_jobs(res) == {"download_tinystories": 1, "train_tokenizer": 1, "pack_tokens": 3,
                                 "train_model": 1, "evaluate_model": 1}
    assert "--report" not in out  # nothing was built to report on


@pytest.mark.parametrize("extra", [["--resources", "gpu=1"], ["--res=gpu=1"], ["--reso", "gpu=1"],
                                   ["--configfile", "config/demo.yaml"], ["--pro", "profiles/slurm"]])
def test_the_study_command_refuses_an_option_it_would_override(extra):
    """It gives snakemake --profile, --resources and --configfile after the extra arguments, where
    they would win without a word; abbreviations included, as snakemake takes them."""
    res = subprocess.run([sys.executable, "dev/study.py", "--", *extra], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert (f"{extra[0]}: this command sets snakemake's --profile, --resources and --configfile itself; "
            "give --gpu-slots N or --configfile FILE before --") in res.stderr


def test_slurm_profile_asks_no_gpu_for_runs_on_the_cpu(repo_copy, no_user_profiles):
    """train.device: cpu trains and evaluates on the CPU: its jobs ask SLURM for no GPU (a CPU-only
    partition can run them), where the other runs' jobs ask for theirs."""
    (repo_copy / "cpu.yaml").write_text("models: {condor: {train: {device: cpu, gpus: 2}}}\n")
    res = snakemake(repo_copy, "--profile", "slurm", "-n", "--configfile", "cpu.yaml", env=no_user_profiles)
    out = res.stdout + res.stderr
    for rule in ("train_model", "evaluate_model"):
        jobs = dict(re.findall(rf"^rule {rule}:\n(?:    .*\n)*?    wildcards: run=(\w+)\n(?:    .*\n)*?"
                               r"    resources: (.*)$", out, re.M))
        gpus = {run: [r for r in resources.split(", ") if r.startswith("gpu=")] for run, resources in jobs.items()}
        assert gpus == {"baseline": ["gpu=1"], "falcon": ["gpu=1"], "condor": ["gpu=0"]}, (rule, gpus)
