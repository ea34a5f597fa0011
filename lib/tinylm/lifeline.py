"""Processes that die with their job: a trainer stops when the Snakemake job that started it is gone,
and worker processes end with their parent.

A trainer's job is the chain of processes above it, up to the Snakemake process that runs the job:
trainer -> job shell -> snakemake, or trainer -> torchrun -> job shell -> snakemake (at most 3
levels). The training script notes that chain first (note_job), before the seconds it spends
importing torch; `Lifeline` takes it with each process's start time and polls it; when one has
gone, it sends this process SIGTERM, the stop signal a run already obeys (last.pt, a `stopped` row,
exit 75), so that a later run resumes exactly. The job's shell may also ask the kernel for the same
SIGTERM the moment it dies (PR_SET_PDEATHSIG).

On SLURM the chain stops below `slurmstepd`: Snakemake's own process is on the submit host, never
an ancestor, and its death must not end a job the cluster keeps running; a job-step `snakemake` on
the compute node, when there is one, belongs to the job and is watched like the job shell.

A trainer with no Snakemake process (and no slurmstepd) above it was started by hand, perhaps with
nohup: nothing is watched, and it may outlive its shell. Without /proc (macOS) nothing is watched.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("tinylm.train")

POLL_SEC = 1.0
MAX_LEVELS = 3  # trainer -> torchrun -> job shell -> snakemake
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Proc:
    """One process as /proc/<pid>/stat shows it; (pid, start) names it even after pid reuse."""

    pid: int
    ppid: int
    start: int  # clock ticks after boot (field 22)
    threads: int
    zombie: bool
    comm: str

    @classmethod
    def read(cls, pid: int) -> Proc | None:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except (OSError, ValueError):
            return None
        rest = text[text.rindex(")") + 2 :].split()  # fields 3 on; the name in ( ) may hold spaces
        return cls(pid=pid, ppid=int(rest[1]), start=int(rest[19]), threads=int(rest[17]),
                   zombie=rest[0] in "ZX", comm=text[text.index("(") + 1 : text.rindex(")")])

    def alive(self) -> bool:
        now = Proc.read(self.pid)
        return now is not None and now.start == self.start and not now.zombie

    def describe(self) -> str:
        return f"{self.comm} (pid {self.pid})"


def runs_snakemake(pid: int) -> bool:
    """Whether the command line of `pid` is snakemake (its script, or python -m snakemake)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:3]
    except OSError:
        return False
    # a shell's `-c "...snakemake..."` string is no program name: it holds spaces
    return any(a and b" " not in a and os.path.basename(a) == b"snakemake" for a in argv)


def job_chain() -> list[Proc]:
    """The processes this one's job consists of, parent first; [] when it is not a Snakemake or
    SLURM job (see the module docstring)."""
    chain: list[Proc] = []
    pid = os.getppid()
    while pid > 1 and len(chain) < MAX_LEVELS:
        proc = Proc.read(pid)
        if proc is None:
            return []
        if proc.comm == "slurmstepd":  # the job's root: nothing above belongs to it
            return chain
        chain.append(proc)
        if runs_snakemake(pid):
            return chain
        pid = proc.ppid
    return []


_noted: list[Proc] | None = None


def note_job() -> None:
    """Find this process's job now, for the Lifeline entered later: a script calls it first, before
    its slow imports (torch takes seconds), so that a job that ends meanwhile, its processes left to
    init, is still known and noticed."""
    global _noted
    _noted = job_chain()


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel for `sig` when the parent thread exits (Linux); whether that took."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(parent_pid: int) -> None:
    """For a worker process: be killed when `parent_pid` exits, or exit now if it already has."""
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the request was in place
        os._exit(1)


class Lifeline:
    """While entered, a thread that sends this process SIGTERM once a process of its job has gone."""

    def __init__(self, poll_sec: float = POLL_SEC):
        self.poll_sec = poll_sec
        self.chain = _noted if _noted is not None else job_chain()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Lifeline:
        if not self.chain:
            return self
        parent = self.chain[0]
        # The kernel knows at once, but only of the parent thread's exit: for a one-thread parent (a
        # shell) that is the process's. Snakemake and torchrun run threads, and the poll covers them.
        if parent.threads == 1 and set_parent_death_signal(signal.SIGTERM) and not parent.alive():
            os.kill(os.getpid(), signal.SIGTERM)
        self._thread = threading.Thread(target=self._watch, name="lifeline", daemon=True)
        self._thread.start()
        log.debug("watching %s", " <- ".join(p.describe() for p in self.chain))
        return self

    def _watch(self) -> None:
        while not self._done.wait(self.poll_sec):
            for proc in self.chain:
                if not proc.alive():
                    log.warning("%s of this job has ended: stopping as on SIGTERM", proc.describe())
                    os.kill(os.getpid(), signal.SIGTERM)
                    return

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            set_parent_death_signal(0)  # this process may live on (a test, a notebook)
