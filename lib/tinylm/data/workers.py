"""Worker processes for the data steps: how many to use (the CPU budget), and an ordered map over them.

Workers die with their parent: the kernel kills them when it exits, however it ends, and SIGTERM
to the parent ends them at once and raises SystemExit in it, so that its `with` blocks run (temporary
output files are removed) before it exits. Ctrl-C, which a terminal sends to the whole process group,
reaches only the parent: workers start with SIGINT blocked (each printed a KeyboardInterrupt
traceback of its own), and the parent's KeyboardInterrupt ends them as an error does.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor

from ..lifeline import die_with_parent

log = logging.getLogger("tinylm.data")

PARALLEL_MIN_BYTES = 32 << 20  # below this, starting worker processes costs more than it saves


def cpu_budget() -> int:
    """Worker processes to use: the rule's RAYON_NUM_THREADS (Snakemake threads), at most the CPUs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        asked = int(os.environ.get("RAYON_NUM_THREADS", "0"))
    except ValueError:
        asked = 0
    return max(1, min(asked, cpus) if asked > 0 else cpus)


def n_workers(workers: int | None, nbytes: int) -> int:
    """Worker processes for `nbytes` of text: `workers` (default `cpu_budget()`), 1 for small inputs."""
    if nbytes < PARALLEL_MIN_BYTES:
        return 1
    return cpu_budget() if workers is None else max(1, workers)


def _start_worker(initializer: Callable | None, initargs: tuple, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    # One process per core already: the tokenizer's own thread pool would only oversubscribe.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if initializer is not None:
        initializer(*initargs)


def parallel_map(
    fn: Callable,
    items: Iterable,
    *,
    workers: int,
    initializer: Callable | None = None,
    initargs: tuple = (),
) -> Iterator:
    """fn over items in `workers` processes, results in order, at most 2 items per worker in flight.

    workers <= 1 runs everything in this process (tests, small files).
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, items)
        return
    # spawn: a forked child of a process whose tokenizer already used its thread pool would hang
    # or lose parallelism; spawned workers start clean.
    ctx = multiprocessing.get_context("spawn")
    ex = ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_start_worker, initargs=(initializer, initargs, os.getpid())
    )
    old_handler = _end_on_sigterm(ex)
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(_submit(ex, fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BaseException:  # an error, a signal, or the consumer gave up: the rest is not wanted
        _end_workers(ex)
        raise
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        ex.shutdown(wait=True, cancel_futures=True)


def _submit(ex: ProcessPoolExecutor, fn: Callable, item):
    """ex.submit(fn, item), never interrupted by Ctrl-C half-way; a Ctrl-C meanwhile is raised after it.

    The call may start a worker process, which then waits for what this process writes to it: stopped
    in between, the worker read nothing and printed an EOFError traceback. So, meanwhile, SIGINT is
    blocked in this thread (a worker started now inherits the mask, so Ctrl-C never reaches it) and,
    in the main thread, Python's handler only notes it: another thread (the tokenizer's own) may take
    the signal, and Python would raise it in the main thread at once. parallel_map is called from the
    main thread, whose KeyboardInterrupt ends the workers."""
    # A handler not installed from Python (getsignal: None) could not be put back: it is left alone.
    main = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not None
    noted: list[int] = []
    handler = signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum)) if main else None
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if hasattr(signal, "pthread_sigmask") else None
    try:
        return ex.submit(fn, item)
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if main:
            signal.signal(signal.SIGINT, handler)
            if noted and callable(handler):
                handler(signal.SIGINT, None)  # Python's default: KeyboardInterrupt
            elif noted and handler == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)


def _end_on_sigterm(ex: ProcessPoolExecutor):
    """Make SIGTERM end the workers and raise SystemExit here; return the handler it replaces."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_sigterm(signum, frame):
        log.warning("received SIGTERM: ending the worker processes; nothing is written")
        _end_workers(ex)
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, on_sigterm)


def _end_workers(ex: ProcessPoolExecutor) -> None:
    # Python < 3.14 has no public way to stop workers in the middle of a task.
    procs = list((getattr(ex, "_processes", None) or {}).values())
    ex.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.terminate()
    for p in procs:
        p.join(5)
