"""Train falcon's size compiled and CUDA-graphed several times in one process, against eager, and say
which attempts did not learn and what torch's compile caches did in each.

    PYTHONPATH=lib:lib/tests python3 dev/falcon-graph-check.py [--attempts N] [--steps 60] [--tag NAME]

Each attempt is what `test_falcon_size_graphed_training_learns_like_eager_on_stale_memory` in
lib/tests/test_cuda.py runs (its `losses` helper, batch 64 x 128 tokens, free GPU memory poisoned
with NaN bytes first, a clean compile state): one eager run first, then N compiled runs. One line
per run, starting RESULT, gives the mean training loss of the last 10 steps, the loss at a few
steps, the evaluation (compiled and plain) and torch's cache counters for that compile (AOTAutograd
cache hits, misses and bypasses; inductor's FX graph cache hits and misses), so a failing attempt can
be matched to whether it loaded its graphs from the cache. Start several copies at once to run them
under contention for the GPU and the CPU, as `pytest -n 8` does. Exit status 1 if any compiled run
ended more than 5% above the eager one. Figures: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import test_cuda  # lib/tests/test_cuda.py: its helper is the test's own training run
import torch
import torch._dynamo.config
from torch._dynamo.utils import counters

CACHE_COUNTERS = [("aot_autograd", "autograd_cache_hit"), ("aot_autograd", "autograd_cache_miss"),
                  ("aot_autograd", "autograd_cache_bypass"), ("inductor", "fxgraph_cache_hit"),
                  ("inductor", "fxgraph_cache_miss")]


def run(compiled: bool, steps: int) -> dict:
    test_cuda.poison_free_memory()
    torch.compiler.reset()
    counters.clear()
    t0 = time.perf_counter()
    curve, val, val_plain = test_cuda.losses(test_cuda.FALCON, compiled=compiled, steps=steps, batch=64, seq_len=128)
    at = sorted({0, 5, 10, 20, 30, 40, steps - 1})
    return {"compiled": compiled, "last10": round(float(curve[-10:].mean()), 4), "seconds": round(time.perf_counter() - t0, 1),
            "at": {s: round(float(curve[s]), 3) for s in at}, "val": round(val, 4), "val_plain": round(val_plain, 4),
            "cache": {f"{a}.{b}": counters[a][b] for a, b in CACHE_COUNTERS}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--attempts", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--tag", default="run")
    args = ap.parse_args()
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    eager = run(False, args.steps)
    print("RESULT", json.dumps({"tag": args.tag, "attempt": "eager", **eager}), flush=True)
    bad = 0
    for attempt in range(1, args.attempts + 1):
        fast = run(True, args.steps)
        ok = bool(np.isfinite(fast["last10"])) and fast["last10"] <= 1.05 * eager["last10"]
        bad += not ok
        print("RESULT", json.dumps({"tag": args.tag, "attempt": attempt, "ok": ok, **fast}), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
