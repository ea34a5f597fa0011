"""Where the training loop's periodic evaluation spends its time, per model, on CUDA.

    python3 dev/eval-in-loop.py --models baseline [--rows 8192] [--batch 512]

The loop evaluates `train.eval_rows` validation rows every `eval_every` steps with
`evaluate.evaluate_loss`, on the plain model unless train.compile_eval. This times that
call as the loop makes it (rows held on the device as int32, bf16 autocast): the first call of the
process, then the mean of the next five; then the same replayed from a CUDA graph (GraphedLoss, what
the loop runs since) and the compiled model's (compiling, then the mean of five).
It prints the eager call's kernels under torch.profiler (GPU time summed against the wall time, and
the largest kernels) and, for the first call, the Python functions that took its time (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))

from tinylm.devices import allow_tf32  # noqa: E402
from tinylm.evaluate import GraphedLoss, evaluate_loss  # noqa: E402
from tinylm.model import GPT, GPTConfig  # noqa: E402
from tinylm.step import compile_model  # noqa: E402
from tinylm.workflow import model_params  # noqa: E402


def timed(fn, n: int = 1) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--models", nargs="+", default=["baseline"])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--no-compiled", action="store_true", help="skip the compiled model's figures")
    args = ap.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    allow_tf32()
    dev = torch.device("cuda")
    seq_len = config["packing"]["seq_len"]
    for name in args.models:
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_dict({**model_params(config, name), "vocab_size": 8192})).to(dev)
        rows = torch.randint(0, 8192, (args.rows, seq_len + 1), device=dev, dtype=torch.int32)

        def run(m=model, rows=rows):
            return evaluate_loss(m, rows, batch_size=args.batch, device=dev, precision="bf16")

        prof = cProfile.Profile()
        prof.enable()
        first = timed(run)
        prof.disable()
        later = timed(run, 5)
        print(f"== {name}: eager evaluation of {args.rows} rows at batch {args.batch}: first call {first:.3f} s, "
              f"then {later * 1000:.1f} ms per call", flush=True)
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(18)
        print("\n".join(line[:150] for line in s.getvalue().splitlines()[6:30]), flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
            wall = timed(run)
        events = [e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu = sum(e.time_range.elapsed_us() for e in events) / 1000
        print(f"  profiled call: {wall * 1000:.1f} ms wall, {gpu:.1f} ms of GPU time in {len(events)} kernels",
              flush=True)
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70),
              flush=True)
        graphed = GraphedLoss(model)
        first = timed(lambda g=graphed: run(g))
        later = timed(lambda g=graphed: run(g), 5)
        print(f"== {name}: replayed from a CUDA graph (GraphedLoss): first call {first:.3f} s (warm-up and "
              f"recording), then {later * 1000:.1f} ms per call", flush=True)
        if not args.no_compiled:
            compiled = compile_model(model, torch.bfloat16)
            t = timed(lambda c=compiled: run(c))
            later = timed(lambda c=compiled: run(c), 5)
            print(f"== {name}: compiled: first call {t:.2f} s (compiling), then {later * 1000:.1f} ms per call",
                  flush=True)


if __name__ == "__main__":
    main()
