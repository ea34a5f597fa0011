"""Nothing lost, nothing corrupted: one trainer per run directory, a trainer and data-preparation
workers that die with their job, temporary files cleaned up, the log of every attempt kept.

Jobs run in subprocesses (Linux /proc is read to find them); a stand-in `snakemake` starts a job
shell the way Snakemake does, so that killing either can be tested without a workflow.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from child_env import child_env

import tinylm
from tinylm import lifeline
from tinylm import step as step_mod
from tinylm.checkpoint import load_checkpoint, model_from_checkpoint
from tinylm.data import pack_split, train_tokenizer
from tinylm.errors import TrainingError
from tinylm.train import train

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

LIB = str(Path(tinylm.__file__).parents[1])
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]

# A trainer slowed to `sleep` seconds per step, so that it can be interrupted mid-run.
TRAINER = """
import json, sys, time
from tinylm import step
from tinylm.io import setup_logging
from tinylm.train import train

real, sleep = step.lr_at, float(sys.argv[2])
step.lr_at = lambda s, cfg: (time.sleep(sleep), real(s, cfg))[1]
setup_logging()
train(**json.loads(sys.argv[1]))
"""

# Snakemake runs a job as `bash -c "<command>"` and waits for it; `; true` keeps bash from
# replacing itself with the command, so there is a job shell between the two as with a rule's
# `set -euo pipefail; ...`.
FAKE_SNAKEMAKE = """
import subprocess, sys
sys.exit(subprocess.call(["bash", "-c", sys.argv[1] + "; true"]))
"""

# Packing or tokenizer training with 2 worker processes that blocks once every batch is handed out,
# the output's temporary file open and the workers started.
DATA_JOB = """
import sys, time
from tinylm.data import pack, tokenizer, workers

workers.PARALLEL_MIN_BYTES = 0
what, text, out = sys.argv[1:4]


def stalling(real):
    def batches(*args, **kwargs):
        yield from real(*args, **kwargs)
        time.sleep(600)
    return batches

if __name__ == "__main__":  # spawned workers import this file too
    pack.iter_story_batches = stalling(pack.iter_story_batches)
    tokenizer.iter_story_batches = stalling(tokenizer.iter_story_batches)
    if what == "pack-cli":  # as the workflow's scripts run it: Ctrl-C ends with one line
        import argparse
        from tinylm.cli import run_script
        run_script(lambda args: pack.pack_split(text, sys.argv[4], out, seq_len=16, encode_batch=8, workers=2),
                   argparse.ArgumentParser(), [])
    elif what == "pack":
        pack.pack_split(text, sys.argv[4], out, seq_len=16, encode_batch=8, workers=2)
    else:
        tokenizer.train_tokenizer(text, out, vocab_size=300, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
                                  min_frequency=2, workers=2)
"""


def proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on, or None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and (st := proc_stat(int(d))) and int(st[1]) == pid and st[0] != "Z":
            out.append(int(d))
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def maps(pid: int) -> str:
    """The files mapped into process `pid` ('' once it has gone)."""
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


def gone(pid: int) -> bool:
    """Exited (a zombie counts: the reaper of orphans here may never collect it)."""
    st = proc_stat(pid)
    return st is None or st[0] == "Z"


def wait_for(what, timeout: float, message: str):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if value := what():
            return value
        time.sleep(0.1)
    raise AssertionError(f"{message} within {timeout} s")


def rows(path: Path, kind: str | None = None) -> list[dict]:
    if not path.exists():
        return []
    out = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in out if kind is None or r["kind"] == kind]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """Synthetic stories -> a 512-token BPE -> packed rows of 17 tokens (train and validation)."""
    from tinylm.data import build_synthetic_corpus

    return build_synthetic_corpus(tmp_path_factory.mktemp("packed"), n_train=400, n_validation=40,
                                  vocab_size=512, seq_len=16)


@pytest.fixture()
def train_kwargs(packed, tiny_train_model, tiny_train_config):
    """train()'s arguments for a run in run_dir (tiny_train_config(**over))."""

    def kwargs(run_dir, **over) -> dict:
        return dict(model_config=tiny_train_model(), train_config=tiny_train_config(**over),
                    train_bin=str(packed["train"]), val_bin=str(packed["validation"]),
                    tokenizer_path=str(packed["tokenizer"]), run_dir=str(run_dir), eval_batch_size=16)

    return kwargs


@pytest.fixture(scope="module")
def uninterrupted(packed, tiny_train_model, tiny_train_config, tmp_path_factory):
    """The run directory of train_kwargs(run_dir) run without interruption."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(model_config=tiny_train_model(), train_config=tiny_train_config(), train_bin=packed["train"],
          val_bin=packed["validation"], tokenizer_path=packed["tokenizer"], run_dir=run_dir, eval_batch_size=16)
    return run_dir


@pytest.fixture()
def jobs():
    """Start commands in their own process group; whatever is left is killed at the end."""
    started: list[subprocess.Popen] = []

    def start(argv: list[str], log: Path) -> subprocess.Popen:
        with open(log, "wb") as f:
            p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
        started.append(p)
        return p

    yield start
    for p in started:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def trainer_argv(tmp_path: Path, kwargs: dict, sleep: float) -> list[str]:
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    return [sys.executable, str(script), json.dumps(kwargs), str(sleep)]


def assert_same_weights(a_path: Path, b_path: Path) -> None:
    a, _ = model_from_checkpoint(a_path)
    b, _ = model_from_checkpoint(b_path)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


# --- one writer per run directory ----------------------------------------------------------------


def test_a_second_trainer_on_a_run_directory_refuses_at_once(train_kwargs, jobs, tmp_path):
    run_dir = tmp_path / "run"
    first = jobs(trainer_argv(tmp_path, train_kwargs(run_dir), sleep=0.2), tmp_path / "first.log")
    wait_for(lambda: rows(run_dir / "metrics.jsonl", "train"), 120, "the first trainer logged no step")
    t0 = time.monotonic()
    with pytest.raises(TrainingError) as err:
        train(**train_kwargs(run_dir))
    assert time.monotonic() - t0 < 10
    message = str(err.value)
    assert f"pid {first.pid} on {socket.gethostname()}" in message
    assert "wait for it" in message.lower() and f"kill {first.pid}" in message
    assert first.wait(120) == 0, (tmp_path / "first.log").read_text()
    history = rows(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in history if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 30
    assert [r["kind"] for r in history].count("done") == 1 and history[-1]["kind"] == "done"
    train(**train_kwargs(run_dir, max_steps=5))  # released once the first finished


# --- a trainer dies with its job -----------------------------------------------------------------


@pytest.mark.parametrize("victim", ["job shell", "snakemake"])
def test_trainer_stops_when_its_job_goes_away_and_resumes_exactly(victim, train_kwargs, jobs, tmp_path,
                                                                  uninterrupted):
    run_dir = tmp_path / "run"
    fake = tmp_path / "bin" / "snakemake"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\n{FAKE_SNAKEMAKE}")
    fake.chmod(0o755)
    command = " ".join(f"'{a}'" for a in trainer_argv(tmp_path, train_kwargs(run_dir), sleep=0.5))
    snakemake = jobs([str(fake), f"{command} 2> {tmp_path / 'train.log'}"], tmp_path / "snakemake.log")
    wait_for(lambda: rows(run_dir / "metrics.jsonl", "train"), 120, "the trainer logged no step")
    [shell] = children(snakemake.pid)
    [trainer] = children(shell)
    assert "trainer.py" in cmdline(trainer)

    os.kill(shell if victim == "job shell" else snakemake.pid, signal.SIGKILL)
    wait_for(lambda: gone(trainer), 10, f"the trainer ran on after its {victim} was killed")
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    stopped = rows(run_dir / "metrics.jsonl", "stopped")
    assert len(stopped) == 1 and stopped[0]["step"] == last["step"] < 30, (tmp_path / "train.log").read_text()

    resumed = train(**train_kwargs(run_dir))
    assert resumed["final_step"] == rows(uninterrupted / "metrics.jsonl", "done")[0]["final_step"] == 30
    assert_same_weights(uninterrupted / "checkpoints" / "best_model.pt", run_dir / "checkpoints" / "best_model.pt")
    a, b = rows(uninterrupted / "metrics.jsonl", "train"), rows(run_dir / "metrics.jsonl", "train")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-6)


def test_a_job_that_ends_while_its_trainer_starts_stops_the_trainer(train_kwargs, jobs, tmp_path):
    """The trainer looked for its job only once it had imported torch and begun train(): a Snakemake
    killed in those seconds had already left its job shell to init, so the trainer found no job to
    watch and trained on to the end, an orphan holding the run."""
    run_dir = tmp_path / "run"
    kwargs = train_kwargs(run_dir, max_steps=100_000, eval_every=50_000, save_every=50_000)
    fake = tmp_path / "bin" / "snakemake"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\n{FAKE_SNAKEMAKE}")
    fake.chmod(0o755)
    script = Path(LIB).parent / "workflow_scripts" / "train_model.py"
    params = {"model": kwargs["model_config"], "train": kwargs["train_config"], "eval_batch_size": 16}
    argv = [sys.executable, str(script), "--name", "run", "--train-bin", kwargs["train_bin"], "--val-bin",
            kwargs["val_bin"], "--tokenizer", kwargs["tokenizer_path"], "--best",
            str(run_dir / "checkpoints" / "best_model.pt"), "--history", str(run_dir / "metrics.jsonl"),
            "--config", str(run_dir / "config.json"), "--run-dir", str(run_dir), "--params", json.dumps(params)]
    command = " ".join(f"'{a}'" for a in argv)
    snakemake = jobs([str(fake), f"{command} 2> {tmp_path / 'train.log'}"], tmp_path / "snakemake.log")
    shell = wait_for(lambda: children(snakemake.pid), 30, "no job shell")[0]
    trainer = wait_for(lambda: [p for p in children(shell) if "train_model.py" in cmdline(p)], 30, "no trainer")[0]
    # Once torch's library is mapped, the import has begun and goes on for a second or more: the kill
    # lands inside it (not in the instant before the script's first line, which nothing can notice).
    wait_for(lambda: "libtorch" in maps(trainer), 60, "the trainer did not import torch")
    os.kill(snakemake.pid, signal.SIGKILL)  # while the trainer imports torch
    assert not rows(run_dir / "metrics.jsonl"), "the trainer started training before the kill"
    wait_for(lambda: gone(trainer), 60, "the trainer ran on after its snakemake was killed")
    assert not rows(run_dir / "metrics.jsonl", "done")


def test_a_stop_signal_while_the_run_writes_its_results_lets_it_finish(train_kwargs, jobs, tmp_path):
    """The stop signals were obeyed only until the last step: one arriving while the finished run wrote
    best_model.pt killed the trainer, with no last.pt saved and its results unwritten, so that the
    whole tail of the run (all of it, for a run shorter than save_every) was trained again."""
    run_dir = tmp_path / "run"
    script = tmp_path / "trainer.py"
    script.write_text("""
import json, os, signal, sys
from tinylm import runlog
from tinylm.io import setup_logging
from tinylm.train import train

real = runlog.RunFiles.save_best

def save_best(self, checkpoint):
    os.kill(os.getpid(), signal.SIGTERM)  # a time limit, as the results are written
    return real(self, checkpoint)

runlog.RunFiles.save_best = save_best
setup_logging()
train(**json.loads(sys.argv[1]))
""")
    trainer = jobs([sys.executable, str(script), json.dumps(train_kwargs(run_dir, save_every=1000))],
                   tmp_path / "train.log")
    assert trainer.wait(120) == 0, (tmp_path / "train.log").read_text()
    assert (run_dir / "checkpoints" / "best_model.pt").exists() and rows(run_dir / "metrics.jsonl", "done")


def test_a_lost_terminal_stops_the_trainer_resumably(train_kwargs, jobs, tmp_path, uninterrupted):
    """A lost SSH session without tmux hangs up the terminal: SIGHUP reaches its foreground process
    group, Snakemake, the job shell and the trainer alike. The trainer died of it at once, without
    last.pt or a `stopped` row, losing the steps since its last save."""
    run_dir = tmp_path / "run"
    fake = tmp_path / "bin" / "snakemake"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\n{FAKE_SNAKEMAKE}")
    fake.chmod(0o755)
    kwargs = train_kwargs(run_dir, save_every=1000)
    command = " ".join(f"'{a}'" for a in trainer_argv(tmp_path, kwargs, sleep=0.5))
    snakemake = jobs([str(fake), f"{command} 2> {tmp_path / 'train.log'}"], tmp_path / "snakemake.log")
    wait_for(lambda: rows(run_dir / "metrics.jsonl", "train"), 120, "the trainer logged no step")
    [shell] = children(snakemake.pid)
    [trainer] = children(shell)
    os.killpg(snakemake.pid, signal.SIGHUP)  # its group: Snakemake and its jobs, as a hangup signals them
    wait_for(lambda: gone(trainer), 10, "the trainer ran on after the hangup")
    log = (tmp_path / "train.log").read_text()
    assert (run_dir / "checkpoints" / "last.pt").exists(), log
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    [stopped] = rows(run_dir / "metrics.jsonl", "stopped")
    # the hangup, or the SIGTERM the job shell's end sends it (tinylm.lifeline), whichever came last
    assert stopped["step"] == last["step"] and stopped["signal"] in ("SIGHUP", "SIGTERM"), log
    assert train(**kwargs)["final_step"] == 30
    assert_same_weights(uninterrupted / "checkpoints" / "best_model.pt", run_dir / "checkpoints" / "best_model.pt")


def test_a_trainer_under_nohup_keeps_ignoring_hangups():
    """nohup sets SIGHUP to be ignored so that the trainer outlives its terminal; a run keeps that."""
    from tinylm.runlog import StopFlag

    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with StopFlag():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old)


def test_a_trainer_outside_snakemake_outlives_its_shell(train_kwargs, jobs, tmp_path):
    """Started by hand (nohup, setsid), a trainer is nobody's job: its shell may go away."""
    run_dir = tmp_path / "run"
    command = " ".join(f"'{a}'" for a in trainer_argv(tmp_path, train_kwargs(run_dir), sleep=0.5))
    shell = jobs(["bash", "-c", f"{command} 2> {tmp_path / 'train.log'}; true"], tmp_path / "shell.log")
    wait_for(lambda: rows(run_dir / "metrics.jsonl", "train"), 120, "the trainer logged no step")
    [trainer] = children(shell.pid)
    os.kill(shell.pid, signal.SIGKILL)
    time.sleep(3 * lifeline.POLL_SEC)
    assert not gone(trainer) and not rows(run_dir / "metrics.jsonl", "stopped"), (tmp_path / "train.log").read_text()


# --- data-preparation workers die with their job, their temporary files go too -------------------


@pytest.mark.parametrize("what, sig", [("pack", signal.SIGTERM), ("pack", signal.SIGKILL),
                                       ("tokenizer", signal.SIGTERM)])
def test_data_workers_die_with_their_parent_and_temp_files_go(what, sig, jobs, tmp_path, tiny_raw,
                                                               tiny_tokenizer_dir):
    text = tiny_raw[0] / "train.txt"
    tok = tiny_tokenizer_dir / "tokenizer.json"
    out_dir = tmp_path / "out"
    out = out_dir / ("train.bin" if what == "pack" else "")
    script = tmp_path / "data_job.py"
    script.write_text(DATA_JOB)
    job = jobs([sys.executable, str(script), what, str(text), str(out), str(tok)], tmp_path / "job.log")

    def workers_started():
        return [p for p in children(job.pid) if "spawn_main" in cmdline(p)]

    workers = wait_for(workers_started, 120, "no worker process started")
    if what == "pack":
        wait_for(lambda: out_dir.exists() and [p for p in out_dir.iterdir() if p.name.startswith(".")], 30,
                 "no temporary output file")
    time.sleep(1.0)  # the workers are up and running
    descendants = children(job.pid)
    assert set(workers) <= set(descendants) and job.poll() is None, (tmp_path / "job.log").read_text()
    job.send_signal(sig)
    job.wait(30)
    for pid in descendants:
        wait_for(lambda pid=pid: gone(pid), 10, f"process {pid} ({cmdline(pid)}) outlived its parent")
    if sig == signal.SIGTERM:  # the parent stopped cleanly: it removed its own temporary files
        assert not out_dir.exists() or not list(out_dir.iterdir()), (tmp_path / "job.log").read_text()

    if what == "pack":
        pack_split(text, tok, out, seq_len=16)
        assert sorted(p.name for p in out_dir.iterdir()) == ["train.bin", "train.meta.json"]
    else:
        train_tokenizer(text, out_dir, vocab_size=300, special_tokens=SPECIALS, min_frequency=2)
        assert sorted(p.name for p in out_dir.iterdir()) == ["tokenizer.json", "tokenizer_meta.json"]


@pytest.mark.parametrize("when", ["starting", "running"])
def test_ctrl_c_stops_a_data_job_and_its_workers_with_one_line(when, jobs, tmp_path, tiny_raw, tiny_tokenizer_dir):
    """Ctrl-C in a terminal signals the whole process group, the workers too: each printed its own
    KeyboardInterrupt traceback, interleaved, while the job itself ends with one line."""
    out_dir = tmp_path / "out"
    script = tmp_path / "data_job.py"
    script.write_text(DATA_JOB)
    log = tmp_path / "job.log"
    job = jobs([sys.executable, str(script), "pack-cli", str(tiny_raw[0] / "train.txt"), str(out_dir / "train.bin"),
                str(tiny_tokenizer_dir / "tokenizer.json")], log)
    workers = wait_for(lambda: [p for p in children(job.pid) if "spawn_main" in cmdline(p)], 120,
                       "no worker process started")
    for pid in workers:  # each worker started with SIGINT blocked (signal 2: bit 1 of the mask)
        blocked = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigBlk"))
        assert int(blocked.split()[1], 16) & (1 << (signal.SIGINT - 1)), (pid, blocked)
    if when == "running":
        wait_for(lambda: out_dir.exists() and list(out_dir.iterdir()), 30, "no temporary output file")
        time.sleep(1.0)
    descendants = children(job.pid)
    os.killpg(job.pid, signal.SIGINT)  # as the terminal sends it
    assert job.wait(30) == -signal.SIGINT
    for pid in descendants:
        wait_for(lambda pid=pid: gone(pid), 10, f"process {pid} ({cmdline(pid)}) outlived its parent")
    text = log.read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text and "leaked" not in text, text
    assert text.strip().splitlines()[-1].startswith("interrupted"), text
    assert not out_dir.exists() or not list(out_dir.iterdir()), text


def test_ctrl_c_during_a_submit_is_raised_after_it():
    """Submitting can start a worker process, and the worker then waits for what its parent writes to
    it. Ctrl-C in between, taken by another thread (the tokenizer's own threads do not block SIGINT),
    raised KeyboardInterrupt in the middle of the start: the worker read nothing and printed an
    EOFError traceback beside the job's one line (test_ctrl_c_stops_a_data_job...[starting], now and
    then). The submit now finishes first."""
    import threading

    from tinylm.data.workers import _submit

    go, sent = threading.Event(), threading.Event()

    def other_thread():  # started before the submit, so SIGINT is not blocked in it
        go.wait(10)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        sent.set()

    steps = []

    class Executor:
        def submit(self, fn, item):
            go.set()
            sent.wait(10)
            for i in range(100_000):  # bytecode boundaries, where Python raises a pending signal
                steps.append(i)
            return "future"

    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=other_thread, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            _submit(Executor(), None, None)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert len(steps) == 100_000


def test_a_submit_under_a_sigint_handler_set_outside_python_leaves_it(monkeypatch):
    """Where the SIGINT handler was not installed from Python (an embedding program's), signal.signal
    and getsignal give None for it, and None cannot be installed again: restoring it after the submit
    raised TypeError. The submit now leaves such a handler alone (the blocked signal still waits)."""
    from tinylm.data.workers import _submit

    real_signal, real_getsignal, before = signal.signal, signal.getsignal, signal.getsignal(signal.SIGINT)
    replaced = []

    def signal_(signum, handler):
        old = real_signal(signum, handler)
        if signum == signal.SIGINT and not replaced:
            replaced.append(handler)
            return None  # as for a handler Python did not install
        return old

    monkeypatch.setattr(signal, "signal", signal_)
    monkeypatch.setattr(signal, "getsignal", lambda signum: None if signum == signal.SIGINT else real_getsignal(signum))

    class Executor:
        def submit(self, fn, item):
            return "future"

    try:
        assert _submit(Executor(), None, None) == "future"
    finally:
        real_signal(signal.SIGINT, before)
    assert replaced == []  # left alone


def test_a_rerun_removes_stale_temp_files_of_its_output_only(tmp_path):
    from tinylm.io import atomic_open

    killed = (  # what a killed writer leaves behind: its temporary files
        "import os, signal, sys\n"
        "from tinylm.io import atomic_open\n"
        "with atomic_open(sys.argv[1]) as a, atomic_open(sys.argv[2]) as b:\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    subprocess.run([sys.executable, "-c", killed, str(a), str(b)], env=child_env())
    stale = sorted(p.name for p in tmp_path.iterdir())
    assert len(stale) == 2 and all(".a.txt." in n or ".b.txt." in n for n in stale)
    with atomic_open(a) as f:
        f.write("whole")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert a.read_text() == "whole" and len(left) == 2 and ".b.txt." in left[0]  # b's rerun removes its own


def test_a_write_leaves_the_temp_file_of_a_live_writer_of_the_same_output(tmp_path):
    """Only a writer that is gone leaves stale temporary files: one still writing (here this process)
    keeps its own, and finishes."""
    from tinylm.io import atomic_open

    out = tmp_path / "a.txt"
    with atomic_open(out) as outer:
        outer.write("outer")
        with atomic_open(out) as inner:
            inner.write("inner")
        assert [p.name for p in tmp_path.iterdir() if p.name != "a.txt"] == [Path(outer.name).name]
    assert out.read_text() == "outer" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_temp_file_of_a_killed_writer_whose_pid_came_back_is_removed(tmp_path):
    """In a container (its own pid namespace) a restarted job's process gets the pid its killed
    predecessor had: the predecessor's temporary file (the size of a last.pt) then looked like a live
    writer's, this very process's, and was kept for every attempt after. This process knows the
    temporary files it is writing: one named with its pid that is not among them is stale."""
    from tinylm.io import TMP_PREFIX, atomic_open

    out = tmp_path / "last.pt"
    left = tmp_path / f"{TMP_PREFIX}{os.getpid()}.last.pt.abcd_123.tmp"  # the predecessor's, same pid
    left.write_bytes(b"half a checkpoint")
    with atomic_open(out, "wb") as f:
        f.write(b"whole")
    assert out.read_bytes() == b"whole" and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_overlapping_writes_of_one_file_in_one_process_keep_each_others_temp_files(tmp_path):
    """A second write of a file starts while a first is under way (the first's temporary file is live
    and kept); a third, later, must keep it too."""
    from tinylm.io import atomic_path

    out = tmp_path / "last.pt"
    with atomic_path(out) as first:
        first.write_bytes(b"first")
        for data in (b"second", b"third"):
            with atomic_path(out) as later:
                later.write_bytes(data)
        assert first.read_bytes() == b"first"
    assert out.read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_an_atomic_write_gives_the_file_the_mode_of_any_new_file(tmp_path):
    """mkstemp makes a 0600 file; the output is renamed from it, and must be readable as any other."""
    from tinylm.io import atomic_open

    umask = os.umask(0)
    os.umask(umask)
    with atomic_open(tmp_path / "a.txt") as f:
        f.write("x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask


# --- the log of every attempt is kept -------------------------------------------------------------


def test_each_attempt_keeps_its_own_log(train_kwargs, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    run_dir = tmp_path / "run"
    real = step_mod.lr_at

    def lr_and_signal(step, cfg):
        if step == 13:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, cfg)

    with monkeypatch.context() as m:
        m.setattr(step_mod, "lr_at", lr_and_signal)
        with pytest.raises(SystemExit):
            train(**train_kwargs(run_dir, max_steps=20))
    train(**train_kwargs(run_dir, max_steps=20))
    logs = run_dir / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["attempt-1.log", "attempt-2.log"]
    first, second = ((logs / f"attempt-{n}.log").read_text() for n in (1, 2))
    assert "received SIGTERM at step" in first and "resumed from" not in first
    assert "resumed from" in second and "done: 20 steps" in second
