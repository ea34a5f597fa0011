"""profiles/slurm against a real one-node SLURM cluster (tests/slurm/cluster.sh starts it).

The workflow runs in temporary copies of the repository, never in the developer's data/ or artifacts/.
The node is this machine (few cores, one fake GPU), so each copy's profiles/slurm/config.yaml is the
real profile with `cpus_*` and `mem_mb` clamped to what the node has and a shorter first status check;
everything else (executor, retries, GPU requests, tasks, slurm_extra) is the profile as shipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SNAKEMAKE, assert_same_curves, train_script

pytestmark = pytest.mark.slurm

CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
# summarize (like all and verify) is a localrule: it runs beside snakemake, not as a cluster job
DATA_RULES = {"download_tinystories", "train_tokenizer", "pack_tokens"}
GPU_RULES = {"train_model", "evaluate_model"}

# Small enough for a 2-core CPU (training and evaluation of all three models in about two minutes),
# long enough for test_sigterm_resumes to stop baseline between its first periodic checkpoint and the
# end. The demo's models keep their own eval_every (50).
TINY_TRAIN = {"batch_size": 8, "max_steps": 60, "save_every": 20, "log_every": 5}
# The data as the other workflow tests shorten the demo's (tests/fixtures/short-demo.yaml).
SHORT_DEMO_DATA = yaml.safe_load((REPO / "tests" / "fixtures" / "short-demo.yaml").read_text())["dataset"]
TINY_CONFIG = {"train": TINY_TRAIN, "dataset": SHORT_DEMO_DATA}
DEMO_TIMEOUT = 900  # about 3 minutes on an idle 2-core machine
JOB_TIMEOUT = 300


# -- cluster ---------------------------------------------------------------------------------------


def _cluster(cmd: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER_SH), cmd], capture_output=True, text=True, timeout=timeout
    )


def _node_idle() -> bool:
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.split()[:1] in (["idle"], ["mix"], ["alloc"])


@pytest.fixture(scope="session")
def slurm_cluster():
    """Reuse a running test cluster, or install and start one (and stop it at the end)."""
    if _cluster("status", 60).returncode == 0 and _node_idle():
        yield
        return
    if os.geteuid() != 0:
        pytest.fail(
            f"no SLURM cluster is running and starting one needs root: sudo {CLUSTER_SH} start"
        )
    for cmd, timeout in (("install", 600), ("start", 300)):
        res = _cluster(cmd, timeout)
        if res.returncode != 0:
            pytest.fail(
                f"{CLUSTER_SH} {cmd} failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}"
            )
    try:
        yield
    finally:
        _cluster("stop", 120)


def sacct_jobs(run_id: str) -> list[dict]:
    """This run's jobs as {id, rule, tres, state}; the plugin names jobs by run id, rules go in the comment."""
    out = subprocess.run(
        [
            "sacct",
            "-P",
            "-n",
            "-X",
            "-S",
            "now-1days",
            "--name",
            run_id,
            "--format=JobID,Comment,AllocTRES,State",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    jobs = []
    for line in out.splitlines():
        jobid, comment, tres, state = line.split("|")
        rule = comment.removeprefix("rule_").split("_wildcards_")[0]
        jobs.append({"id": jobid, "rule": rule, "tres": tres, "state": state.split()[0]})
    return jobs


# -- workflow runs in a copy ------------------------------------------------------------------------


def node_resources() -> tuple[int, int]:
    """(CPUs, memory in MB) of the test node, as SLURM sees it."""
    out = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%c %m"], capture_output=True, text=True, check=True
    )
    cpus, mem = out.stdout.split()[:2]
    return int(cpus), int(mem)


def fit_profile(profile: dict, cpus: int, mem_mb: int) -> dict:
    """The profile with CPU and memory requests clamped to the test node; nothing else changes."""
    fitted = json.loads(json.dumps(profile))
    for res in [fitted.get("default-resources", {}), *fitted.get("set-resources", {}).values()]:
        for key in ("cpus_per_task", "cpus_per_gpu"):
            if key in res:
                res[key] = min(res[key], cpus)
        if "mem_mb" in res:
            res["mem_mb"] = min(res["mem_mb"], mem_mb // 2)
    fitted["max-threads"] = cpus  # rule threads become --cpus-per-task
    fitted["slurm-init-seconds-before-status-checks"] = 3
    return fitted


def copy_repo(dest: Path) -> Path:
    """The working tree's source files (tracked and new, not ignored) with a node-sized slurm profile."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    profile = dest / "profiles" / "slurm" / "config.yaml"
    fitted = fit_profile(yaml.safe_load(profile.read_text()), *node_resources())
    profile.write_text(yaml.safe_dump(fitted, sort_keys=False))
    (dest / "tiny.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    return dest


class Snakemake:
    """One snakemake process in a copy; output goes to a file so a long run can be watched."""

    def __init__(self, workdir: Path, *args: str, env: dict | None = None, name: str = "snakemake"):
        self.workdir, self.args = workdir, args
        self.log = workdir / f"{name}.out"
        # as from an activated environment: jobs run `python`, and sbatch passes PATH on (--export=ALL)
        venv_bin = str(Path(sys.executable).parent)
        env = {
            **os.environ,
            **(env or {}),
            "PYTHONPATH": str(workdir / "lib"),
            "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}",
            "VIRTUAL_ENV": str(Path(venv_bin).parent),
        }
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [SNAKEMAKE, *args],
                cwd=workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                start_new_session=True,
            )

    @property
    def output(self) -> str:
        return self.log.read_text()

    @property
    def run_id(self) -> str | None:
        m = re.search(r"SLURM run ID: (\S+)", self.output)
        return m.group(1) if m else None

    def wait(self, timeout: float) -> Snakemake:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(
                f"snakemake {' '.join(self.args)} did not finish in {timeout:.0f} s; "
                f"output ends:\n{self.output[-5000:]}"
            )
        return self

    def stop(self) -> None:
        """SIGTERM lets snakemake cancel its jobs; anything left under this run id is cancelled too."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.run_id:
            subprocess.run(["scancel", "--name", self.run_id], capture_output=True)

    def check(self) -> Snakemake:
        assert self.proc.returncode == 0, (
            f"snakemake {' '.join(self.args)} failed:\n{self.output[-8000:]}"
        )
        return self


def demo_args(
    *targets: str, configfiles: tuple[str, ...] = (), flags: tuple[str, ...] = ()
) -> list[str]:
    # targets first: --configfile takes every word after it
    return [
        *targets,
        *flags,
        "--profile",
        "profiles/slurm",
        "--configfile",
        "config/demo.yaml",
        "tiny.yaml",
        *configfiles,
    ]


@pytest.fixture(scope="session")
def demo(slurm_cluster, tmp_path_factory):
    """The demo workflow, run once through profiles/slurm; returns the finished Snakemake."""
    workdir = copy_repo(tmp_path_factory.mktemp("demo"))
    return Snakemake(workdir, *demo_args(flags=("--verbose",)), name="demo").wait(DEMO_TIMEOUT)


# -- tests ------------------------------------------------------------------------------------------


def test_demo_runs_on_slurm_with_gpus_only_where_asked(demo):
    demo.check()
    models = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())["models"]
    for model in models:
        assert (demo.workdir / f"artifacts/demo/runs/{model}/metrics.json").is_file()
    assert (demo.workdir / "artifacts/demo/summary.csv").is_file()

    jobs = sacct_jobs(demo.run_id)
    assert jobs, f"sacct shows no job named {demo.run_id}"
    assert {j["rule"] for j in jobs} == DATA_RULES | GPU_RULES, jobs
    for job in jobs:
        assert job["state"] == "COMPLETED", job
        has_gpu = "gres/gpu=1" in job["tres"].split(",")
        assert has_gpu == (job["rule"] in GPU_RULES), job
    for rule in GPU_RULES:
        assert sum(j["rule"] == rule for j in jobs) == len(models)

    # sbatch flags: --gpus from the rule's gpu resource, no --ntasks-per-gpu (torchrun starts the
    # processes inside one task), the early SIGTERM from slurm_extra
    calls = re.findall(r"sbatch call: (.*?) --wrap", demo.output)
    train_calls = [c for c in calls if "--comment rule_train_model" in c]
    assert train_calls and all("--gpus=1" in c and "--nodes=1" in c and "--signal=TERM@120" in c for c in train_calls), (
        train_calls
    )
    assert not any("--ntasks-per-gpu" in c for c in calls), calls
    assert not any(
        "--gpus" in c
        for c in calls
        if "rule_train_model" not in c and "rule_evaluate_model" not in c
    )


def test_named_profile_from_home_config(slurm_cluster, tmp_path):
    """profiles/slurm linked into ~/.config/snakemake works as `--profile slurm` from any folder."""
    workdir = copy_repo(tmp_path / "repo")
    home = tmp_path / "home"
    subprocess.run(
        'mkdir -p ~/.config/snakemake && ln -s "$PWD/profiles/slurm" ~/.config/snakemake/slurm',
        shell=True,
        check=True,
        cwd=workdir,
        env={**os.environ, "HOME": str(home)},
    )
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    target = "data/raw/synthetic-demo/meta.json"  # one CPU job: the synthetic stories
    run = Snakemake(
        workdir, target, "--profile", "slurm", "--configfile", "config/demo.yaml", env=env
    )
    run.wait(JOB_TIMEOUT).check()
    assert run.run_id, "the slurm executor did not run"
    assert [(j["rule"], j["state"]) for j in sacct_jobs(run.run_id)] == [
        ("download_tinystories", "COMPLETED")
    ]


def with_demo_data(workdir: Path, demo: Snakemake) -> Path:
    """workdir with the demo's stories, tokenizer and packed splits (modification times kept), for
    a test whose config builds the same ones: only its training and evaluation jobs run."""
    for built in ("data", "artifacts/tokenizers"):
        if (demo.workdir / built).is_dir():
            shutil.copytree(demo.workdir / built, workdir / built)
    return workdir


def _jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


def _running_job(run_id: str, rule: str) -> str | None:
    out = subprocess.run(
        ["squeue", "-h", "--name", run_id, "-t", "RUNNING", "-o", "%i %k"],
        capture_output=True,
        text=True,
    ).stdout
    for line in out.splitlines():
        jobid, comment = line.split(maxsplit=1)
        if comment.startswith(f"rule_{rule}"):
            return jobid
    return None


def test_sigterm_checkpoints_and_retry_resumes(demo, tmp_path):
    """A training job stopped with SIGTERM (as before a time limit) resumes on the profile's retry."""
    workdir = with_demo_data(copy_repo(tmp_path / "repo"), demo)
    run_dir = workdir / "artifacts/demo/runs/baseline"
    run = Snakemake(
        workdir, *demo_args(str(run_dir.relative_to(workdir) / "metrics.json")), name="resume"
    )
    save_every = TINY_TRAIN["save_every"]
    try:
        deadline, jobid = time.monotonic() + JOB_TIMEOUT, None
        while time.monotonic() < deadline and run.proc.poll() is None:
            steps = [
                r["step"] for r in _jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "train"
            ]
            if steps and steps[-1] > save_every and (run_dir / "checkpoints/last.pt").exists():
                jobid = _running_job(run.run_id, "train_model")
                if jobid:
                    break
            time.sleep(0.2)
        assert jobid, (
            f"training never got past step {save_every} while running:\n{run.output[-5000:]}"
        )
        # steps only, not the batch shell (--full): what SLURM does at --signal=TERM@120
        subprocess.run(["scancel", "--signal=TERM", jobid], check=True)
        run.wait(JOB_TIMEOUT).check()
    finally:
        run.stop()

    train_jobs = [j for j in sacct_jobs(run.run_id) if j["rule"] == "train_model"]
    assert [j["state"] for j in train_jobs] == ["FAILED", "COMPLETED"], train_jobs
    log = (workdir / "artifacts/demo/logs/train_model/baseline.log").read_text()
    m = re.search(r"resumed from \S+ at step (\d+)", log)
    assert m, f"no 'resumed from' line in the training log:\n{log[-3000:]}"
    resumed = int(m.group(1))
    assert save_every <= resumed < TINY_TRAIN["max_steps"], log
    assert {"kind": "resume", "step": resumed} in _jsonl(run_dir / "metrics.jsonl")

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["final_step"] == TINY_TRAIN["max_steps"]
    reference = demo.workdir / "artifacts/demo/runs/baseline/metrics.json"
    if reference.is_file():  # the demo trained baseline with the same settings, uninterrupted
        ref = json.loads(reference.read_text())
        assert (metrics["final_step"], metrics["best_step"]) == (
            ref["final_step"],
            ref["best_step"],
        )


@pytest.mark.parametrize(
    "train, keys",
    [
        ({"gpus": 0}, ["train.gpus"]),
        ({"gpus": 3, "max_gpus": 2}, ["train.gpus", "train.max_gpus"]),
    ],
)
def test_bad_gpu_counts_fail_before_submission(slurm_cluster, tmp_path, train, keys):
    workdir = copy_repo(tmp_path / "repo")
    (workdir / "bad.yaml").write_text(yaml.safe_dump({"train": train}))
    run = Snakemake(workdir, *demo_args(configfiles=("bad.yaml",))).wait(120)
    assert run.proc.returncode != 0, run.output
    for key in keys:
        assert key in run.output, run.output
    assert run.run_id is None and "sbatch" not in run.output, run.output


def _node_gpus() -> int:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%G"], capture_output=True, text=True, check=True)
    return sum(int(m) for m in re.findall(r"gpu:(?:[^:,(]+:)?(\d+)", out.stdout.split()[0]))


@pytest.mark.parametrize("resource", ["CPUs", "MB of memory", "GPUs", "minutes of run time"])
def test_a_job_no_node_can_hold_fails_before_submission(slurm_cluster, tmp_path, resource):
    """SLURM queues a job asking for more CPUs than any node has, or more time than its partition
    allows, for ever (PendingReason PartitionConfig, PartitionTimeLimit) and Snakemake waits without a
    word: the run must stop at once instead, naming the rule, the resource and what the biggest node
    has (the partition allows)."""
    workdir = copy_repo(tmp_path / "repo")
    cpus, mem_mb = node_resources()
    profile_path = workdir / "profiles" / "slurm" / "config.yaml"
    profile = yaml.safe_load(profile_path.read_text())
    data = profile["set-resources"]["download_tinystories"]
    target, rule, configfiles = f"data/raw/{SHORT_DEMO_DATA['name']}/meta.json", "download_tinystories", ()
    if resource == "CPUs":
        data["cpus_per_task"], asked, has = 8 * cpus, 8 * cpus, cpus
    elif resource == "MB of memory":
        data["mem_mb"], asked, has = 2 * mem_mb, 2 * mem_mb, mem_mb
    elif resource == "minutes of run time":  # cluster.sh's partition short allows 30 minutes
        data["slurm_partition"], data["runtime"], asked, has = "short", 240, 240, 30
    else:
        (workdir / "gpus.yaml").write_text(yaml.safe_dump({"train": {"gpus": _node_gpus() + 1}}))
        target, rule, configfiles = "artifacts/demo/runs/condor/metrics.json", "train_model", ("gpus.yaml",)
        asked, has = _node_gpus() + 1, _node_gpus()
    profile_path.write_text(yaml.safe_dump(profile, sort_keys=False))
    run = Snakemake(workdir, *demo_args(target, configfiles=configfiles)).wait(90)
    assert run.proc.returncode != 0, run.output
    assert re.search(rf"rule {rule}\b.*\b{asked} {resource}.*\b(has|allows) {has}\b", run.output), run.output
    if run.run_id:  # nothing was submitted, not even the jobs that would fit
        assert sacct_jobs(run.run_id) == [], run.output


def test_sweep_is_one_job_per_run(demo, tmp_path):
    """config/sweep-demo.yaml at one seed: two runs, each its own train_model and evaluate_model job.
    Its dataset and tokenizer are the demo's (the same names and settings): the demo's are reused."""
    workdir = with_demo_data(copy_repo(tmp_path / "repo"), demo)
    (workdir / "one-seed.yaml").write_text(yaml.safe_dump({"sweeps": {"lr": {"seeds": [1]}}}))
    configs = ("config/sweep-demo.yaml", "tiny.yaml", "one-seed.yaml")  # tiny.yaml last: it shrinks
    run = Snakemake(workdir, "--profile", "profiles/slurm", "--configfile", *configs, name="sweep")
    run.wait(DEMO_TIMEOUT).check()
    runs = ["condor-lr0.001-seed1", "condor-lr0.003-seed1"]
    for name in runs:
        metrics = json.loads((workdir / f"artifacts/sweep-demo/runs/{name}/metrics.json").read_text())
        assert metrics["model"] == name and metrics["final_step"] == TINY_TRAIN["max_steps"]
    assert (workdir / "artifacts/sweep-demo/summary.csv").is_file()
    jobs = sacct_jobs(run.run_id)
    assert sorted(j["rule"] for j in jobs) == ["evaluate_model"] * 2 + ["train_model"] * 2, jobs
    assert all(j["state"] == "COMPLETED" for j in jobs), jobs


def test_two_tasks_train_as_two_nodes_meeting_at_a_torchrun_rendezvous(
    slurm_cluster, packed, one_process_run, tmp_path
):
    """The launch across nodes in docs/cluster.md, on the test cluster's one node: srun starts two tasks
    standing in for one task on each of two nodes, and each runs profiles/slurm/torchrun-nodes.sh, whose
    torchrun meets the other's at a c10d rendezvous on the allocation's first node. The two processes
    (gloo, on the CPU) train as one run, and follow one process's losses at the same global batch."""
    model, train, one = one_process_run
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("", 0))
        port = s.getsockname()[1]
    launcher = ["srun", "--ntasks=2", "--cpus-per-task=1", "--time=5", "--kill-on-bad-exit=1",
                str(REPO / "profiles" / "slurm" / "torchrun-nodes.sh"), "1"]
    two = train_script(packed, tmp_path / "two", model, train, processes=2, launcher=launcher,
                       env={"TINYLM_RDZV_PORT": str(port)})
    assert_same_curves(one, two, train["max_steps"])
