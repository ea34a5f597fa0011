"""Where a model's evaluation pass goes: the compiled forward (no gradient) at the evaluation batch,
timed, then its CUDA kernels by total time.

    python3 dev/eval-profile.py [--models falcon baseline] [--batch 512] [--iters 20]

Each model is built from the config as the bench builds it, in eval mode, compiled with
`tinylm.step.compile_model` and run under bf16 autocast on random token rows of seq_len + 1, as
`python -m tinylm.bench` times the evaluation of 36,000 rows (71 such batches). Prints the compile
seconds, the ms per batch over `--iters` batches, and torch.profiler's kernel table (the 30 kernels
with the most CUDA time over 5 batches). The question for issue 24: what falcon's pass spends beyond
baseline's (its MoE routing, the experts on capacity-padded slots, the combine), to aim its
evaluation at 0.3 s per 36,000 rows (0.401 s on an H200, 2026-12-05).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))

from tinylm.config import GPTConfig  # noqa: E402
from tinylm.devices import allow_tf32  # noqa: E402
from tinylm.model import GPT  # noqa: E402
from tinylm.step import compile_model  # noqa: E402
from tinylm.workflow import model_params  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--models", nargs="+", default=["falcon", "baseline"])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    seq_len = config["packing"]["seq_len"]
    device = torch.device("cuda")
    allow_tf32()
    for name in args.models:
        mcfg = GPTConfig.from_dict(model_params(config, name))
        model = GPT(mcfg).to(device).eval()
        fn = compile_model(model, torch.bfloat16)
        rows = torch.randint(0, mcfg.vocab_size, (args.batch, seq_len + 1), device=device)
        x, y = rows[:, :-1], rows[:, 1:]
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            t0 = time.perf_counter()
            for _ in range(3):
                fn(x, y)
            torch.cuda.synchronize()
            print(f"{name}: compile + 3 batches {time.perf_counter() - t0:.1f} s", flush=True)
            t0 = time.perf_counter()
            for _ in range(args.iters):
                fn(x, y)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / args.iters * 1000
            print(f"{name}: {ms:.3f} ms per batch of {args.batch} rows", flush=True)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fn(x, y)
                torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90),
              flush=True)


if __name__ == "__main__":
    main()
