"""Worker processes for the data steps: how many to use (the CPU budget), and an ordered map over them."""

from __future__ import annotations

import collections
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor

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


def _start_worker(initializer: Callable | None, initargs: tuple) -> None:
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
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_start_worker, initargs=(initializer, initargs)
    ) as ex:
        pending: collections.deque = collections.deque()
        try:
            for item in items:
                pending.append(ex.submit(fn, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
