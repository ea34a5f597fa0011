"""Fault injection: interrupt the workflow at a random point, recover as README.md says, and compare
every artifact with an uninterrupted run's.

    python tests/faults.py --trials 20 --seed 1     # prints "N faults, M recovered, K lost"

Each trial runs a workflow smaller than config/demo.yaml (one model, FAULT_CONFIG) in a temporary
copy of the repository (a trial that interrupts training starts from the reference's data) and, at a
random moment in the life of one data-preparation or training job (the reference run's job times
say how long each lives), injects one fault, each kind in turn:

    sigterm-job        SIGTERM to the job's process (a time limit, a preemption)
    sigkill-job        SIGKILL to the job's process (out of memory, a killed step)
    sigkill-snakemake  SIGKILL to Snakemake alone; its jobs go on running as orphans
    sigkill-all        SIGKILL to Snakemake and every job process (a lost node or session)

then recovers as README.md's "Interrupting and resuming" says: after SIGTERM the same command
(with --rerun-incomplete if Snakemake asks for it), after SIGKILL of a job the same command with
--rerun-incomplete, after SIGKILL of Snakemake `snakemake --unlock` first; a rerun that finds the
run still held by the old trainer waits for it to exit and runs again.
The trial is recovered when that ends well, `snakemake verify` passes, and the raw splits,
tokenizer.json and packed .bin files are the reference's bytes, best_model.pt holds the same
weights and metrics.jsonl the same rows (timing fields and `stopped` and `resume` rows aside).
Exits 1 when a trial lost something, naming what.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml


def _workflow_test_helpers():
    """tests/conftest.py by its path: under pytest, `import conftest` may find lib/tests' one."""
    path = Path(__file__).with_name("conftest.py")
    spec = importlib.util.spec_from_file_location("tests_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_helpers = _workflow_test_helpers()
SNAKEMAKE, copy_repo, offline_env = _helpers.SNAKEMAKE, _helpers.copy_repo, _helpers.offline_env

FAULTS = ("sigterm-job", "sigkill-job", "sigkill-snakemake", "sigkill-all")
MODEL = "condor"
# Small data and a small model; 2400 steps keep training going for about 20 s on 2 cores, long
# enough for an orphaned trainer to meet the one a rerun starts.
FAULT_CONFIG = {
    "dataset": {"name": "faults", "source": "synthetic", "train_n": None, "validation_n": None,
                "test_n": 60, "synthetic": {"n_train": 600, "n_validation": 60, "seed": 1234}},
    "tokenizer": {"name": "faults-bpe512", "vocab_size": 512},
    "packing": {"seq_len": 32},
    "train": {"device": "cpu", "batch_size": 8, "max_steps": 2400, "warmup_steps": 10, "lr": 1.0e-3,
              "min_lr": 1.0e-4, "eval_every": 200, "eval_rows": 64, "save_every": 200, "log_every": 20},
    "eval": {"batch_size": 64, "max_new_tokens": 8, "prompts": ["Once"]},
    "models": {MODEL: {"d_model": 64, "d_ff": 128, "n_heads": 2, "max_seq_len": 32}},
}  # fmt: skip
# The target first: --configfile takes every word after it. One thread per job: torch's threads of
# two jobs on 2 busy cores run ten times slower.
TARGET = f"artifacts/runs/{MODEL}/metrics.json"
ARGS = (TARGET, "--cores", "2", "--set-threads", "train_model=1", "evaluate_model=1",
        "--configfile", "faults.yaml")  # fmt: skip
# Job processes that a fault may hit: data preparation and training, not evaluation.
TARGET_SCRIPTS = ("download_tinystories.py", "train_tokenizer.py", "pack_tokens.py",
                  "train_model.py")  # fmt: skip
TIMING_KEYS = {"sec", "tokens_per_sec", "elapsed_sec", "train_tokens_per_sec", "train_wall_sec", "train_sec",
               "eval_sec"}  # fmt: skip
RUN_TIMEOUT = 300


# -- processes --------------------------------------------------------------------------------------


def session_processes(sid: int) -> dict[int, str]:
    """pid -> command line of every process in session `sid` (Snakemake and its jobs, orphans too)."""
    procs = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        # after "pid (comm) ": state ppid pgrp session ...
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            procs[int(entry.name)] = cmd.strip()
    return procs


def job_processes(sid: int) -> dict[int, str]:
    """The Python processes running a workflow script (not the shells that start them)."""
    return {
        pid: cmd
        for pid, cmd in session_processes(sid).items()
        if cmd.startswith(("python", sys.executable)) and "workflow_scripts/" in cmd
    }


def kill_session(sid: int, timeout: float = 60) -> list[str]:
    """Wait up to `timeout` s for the session's processes to end, then SIGKILL them; their commands."""
    deadline = time.monotonic() + timeout
    while (left := session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return list(left.values())


def start(workdir: Path, *args: str) -> subprocess.Popen:
    with open(workdir / "snakemake.out", "a") as log:
        log.write(f"\n$ snakemake {' '.join(args)}\n")
        log.flush()
        return subprocess.Popen([SNAKEMAKE, *args], cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                env=offline_env(), start_new_session=True)


def run(workdir: Path, *args: str) -> tuple[int, str]:
    """Run Snakemake to its end: its exit status and what it printed."""
    out = workdir / "snakemake.out"
    start_at = out.stat().st_size if out.exists() else 0
    proc = start(workdir, *args)
    try:
        rc = proc.wait(RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = -1
    finally:
        kill_session(proc.pid, timeout=0)
    with open(out, errors="replace") as f:
        f.seek(start_at)
        return rc, f.read()


# -- the workflow in a copy -------------------------------------------------------------------------


def prepare(workdir: Path, data_from: Path | None = None) -> Path:
    """A copy of the repository whose config trains MODEL only, on FAULT_CONFIG's small data
    (copied from `data_from`, modification times kept, so that only training and evaluation run)."""
    copy_repo(workdir)
    for built in ("data", "artifacts/tokenizers") if data_from else ():
        shutil.copytree(data_from / built, workdir / built)
    config = workdir / "config" / "config.yaml"  # --configfile can add models, not remove them
    base = yaml.safe_load(config.read_text())
    base["models"] = {MODEL: base["models"][MODEL]}
    config.write_text(yaml.safe_dump(base, sort_keys=False))
    (workdir / "faults.yaml").write_text(yaml.safe_dump(FAULT_CONFIG, sort_keys=False))
    return workdir


def reference_run(workdir: Path) -> list[tuple[str, float]]:
    """The uninterrupted run; returns (job command, seconds it ran) for every job a fault may hit."""
    proc = start(prepare(workdir), *ARGS)
    seen: dict[int, tuple[str, float, float]] = {}
    while proc.poll() is None:
        now = time.monotonic()
        for pid, cmd in job_processes(proc.pid).items():
            seen[pid] = (cmd, seen.get(pid, (cmd, now))[1], now)
        time.sleep(0.02)
    if proc.returncode != 0:
        raise SystemExit(f"the reference run failed; see {workdir / 'snakemake.out'}")
    if run(workdir, "verify", *ARGS[1:])[0]:
        raise SystemExit(
            f"snakemake verify failed on the reference run; see {workdir / 'snakemake.out'}"
        )
    return sorted(
        (cmd, end - begin)
        for cmd, begin, end in seen.values()
        if any(s in cmd for s in TARGET_SCRIPTS)
    )


@dataclass
class Trial:
    fault: str
    job: str  # the command the fault was aimed at
    delay: float  # seconds after that job started
    hit: str = ""  # the command it hit
    problems: list[str] = field(default_factory=list)


def inject(workdir: Path, trial: Trial, ref: Path) -> int | None:
    """Run the workflow and inject trial.fault; returns Snakemake's session id (its orphans keep
    it), or None when the run ended before the fault."""
    training = "train_model.py" in trial.job
    proc = start(prepare(workdir, data_from=ref if training else None), *ARGS)
    sid, target = proc.pid, None
    while target is None and proc.poll() is None:
        target = next((p for p, c in job_processes(sid).items() if c == trial.job), None)
        time.sleep(0.01)
    time.sleep(trial.delay)
    jobs = job_processes(sid)
    deadline = time.monotonic() + 10
    while not jobs and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # between two jobs: the fault hits the next one
        jobs = job_processes(sid)
    if proc.poll() is not None or not jobs:
        if proc.wait():
            trial.problems.append(f"the run failed before the fault; see {workdir}/snakemake.out")
            return sid
        return None
    pid = target if target in jobs else min(jobs)
    trial.hit = jobs[pid]
    if trial.fault == "sigterm-job":
        os.kill(pid, signal.SIGTERM)
    elif trial.fault == "sigkill-job":
        os.kill(pid, signal.SIGKILL)
    elif trial.fault == "sigkill-snakemake":
        os.kill(sid, signal.SIGKILL)
    else:
        for p in [sid, *session_processes(sid)]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        proc.wait(RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        trial.problems.append(f"snakemake did not end within {RUN_TIMEOUT} s after the fault")
    return sid


def recover(workdir: Path, trial: Trial, sid: int) -> None:
    """As README.md's "Interrupting and resuming" says, word for word; the jobs of a killed
    Snakemake are left to end by themselves, as they would be."""
    again = (*ARGS, "--rerun-incomplete")
    if trial.fault in ("sigkill-snakemake", "sigkill-all"):
        steps = [(*ARGS, "--unlock"), again]
    elif trial.fault == "sigkill-job":
        steps = [again]
    else:
        steps = [ARGS]
    for args in steps:
        rc, out = run(workdir, *args)
        if rc and args == ARGS and "--rerun-incomplete" in out:  # "add it if Snakemake asks"
            rc, out = run(workdir, *again)
        # README: a rerun that finds the old trainer still saving stops before any job ("is being
        # trained"), or, started in the instant between, in the trainer ("in use by another trainer")
        if rc and ("is being trained" in out or "in use by another trainer" in out):
            kill_session(sid, timeout=60)  # "wait a few seconds for that process to exit"
            rc, out = run(workdir, *args)
        if rc:
            trial.problems.append(f"`snakemake {' '.join(args)}` failed ({rc}); see {workdir}/snakemake.out")
            break
    # A job still running could change the artifacts after the rerun: wait for it first.
    if left := kill_session(sid, timeout=120):
        trial.problems.append(f"still running 120 s after recovery, killed: {left}")
    if not trial.problems and run(workdir, "verify", *ARGS[1:])[0]:
        trial.problems.append(f"snakemake verify failed after recovery: {workdir}/artifacts/logs/verify.log")


# -- comparison -------------------------------------------------------------------------------------


def history(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if k not in TIMING_KEYS}
        for r in rows
        if r.get("kind") not in ("resume", "stopped")  # what the interruptions add
    ]


def compare(ref: Path, work: Path) -> list[str]:
    """What differs between the reference's artifacts and the trial's."""
    d, t = FAULT_CONFIG["dataset"]["name"], FAULT_CONFIG["tokenizer"]["name"]
    run = Path("artifacts/runs") / MODEL
    same_bytes = [Path(f"data/raw/{d}/{s}.txt") for s in ("train", "validation", "test")]
    same_bytes += [Path(f"artifacts/tokenizers/{d}/{t}/tokenizer.json")]
    same_bytes += [Path(f"data/processed/{d}/{t}/{s}.bin") for s in ("train", "validation", "test")]
    problems = []
    for rel in same_bytes:
        if not (work / rel).is_file():
            problems.append(f"{rel}: missing")
        elif (work / rel).read_bytes() != (ref / rel).read_bytes():
            problems.append(f"{rel}: differs from the uninterrupted run's")
    try:
        if history(work / run / "metrics.jsonl") != history(ref / run / "metrics.jsonl"):
            problems.append(f"{run}/metrics.jsonl: rows differ from the uninterrupted run's")
        a, b = (
            torch.load(r / run / "checkpoints/best_model.pt", weights_only=True)
            for r in (ref, work)
        )
        if (
            a["step"] != b["step"]
            or a["model"].keys() != b["model"].keys()
            or not all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        ):
            problems.append(
                f"{run}/checkpoints/best_model.pt: weights differ (step {b['step']}, "
                f"reference {a['step']})"
            )
    except (OSError, ValueError, RuntimeError) as e:
        problems.append(f"{run}: {type(e).__name__}: {e}")
    return problems


# -- main -------------------------------------------------------------------------------------------


def run_trials(trials: int, seed: int, faults: tuple[str, ...], tmp: Path) -> list[Trial]:
    rng = random.Random(seed)
    ref = tmp / "reference"
    t0 = time.monotonic()
    jobs = reference_run(ref)
    print(
        f"reference run: {time.monotonic() - t0:.0f} s, {len(jobs)} jobs a fault may hit",
        flush=True,
    )
    data_jobs = [j for j in jobs if "train_model.py" not in j[0]]
    train_jobs = [j for j in jobs if "train_model.py" in j[0]]
    kinds = rng.sample(faults, len(faults))  # each kind once before any comes again
    done = []
    for i in range(trials):
        cmd, seconds = rng.choice(rng.choice([data_jobs, train_jobs]))
        # 0.8: a job runs longer or shorter than in the reference; a fault should still find it
        trial = Trial(fault=kinds[i % len(kinds)], job=cmd, delay=rng.uniform(0, 0.8 * seconds))
        work = tmp / f"trial{i}"
        t0 = time.monotonic()
        sid = inject(work, trial, ref)
        if sid is not None:
            recover(work, trial, sid)
            trial.problems += compare(ref, work)
        state = "missed" if sid is None else "LOST" if trial.problems else "recovered"
        print(
            f"trial {i}: {trial.fault} {trial.delay:.2f} s into {script(trial.job)}, hit "
            f"{script(trial.hit) or '-'}: {state} ({time.monotonic() - t0:.0f} s)",
            flush=True,
        )
        for p in trial.problems:
            print(f"    {p}", flush=True)
        if sid is not None:
            done.append(trial)
        if not trial.problems:
            shutil.rmtree(work, ignore_errors=True)
    return done


def script(cmd: str) -> str:
    """The workflow script and its wildcard in a job's command line, e.g. pack_tokens.py validation."""
    words = cmd.split()
    name = next((w.split("/")[-1] for w in words if w.startswith("workflow_scripts/")), "")
    out = next((words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--out", "--name")), "")
    return f"{name} {Path(out).stem}".strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS))
    parser.add_argument("--keep", type=Path, help="work here and keep the failed trials' copies")
    args = parser.parse_args(argv)
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="tinylm-faults-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        trials = run_trials(args.trials, args.seed, tuple(args.faults), tmp)
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    lost = [t for t in trials if t.problems]
    print(f"{len(trials)} faults, {len(trials) - len(lost)} recovered, {len(lost)} lost")
    if len(trials) < args.trials:
        print(f"({args.trials - len(trials)} trial(s) finished before their fault)")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
