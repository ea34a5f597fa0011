"""How many CUDA kernels one compiled training step launches, and their GPU time, per model.

    python3 dev/kernel-count.py --models baseline falcon [--batch 64]

Each model is built as a training run builds it and runs compiled steps without the CUDA graph (a
graph replay hides its kernels from the profiler), three untimed, then five under torch.profiler
(`tinylm.bench.profiled_steps`, which `python -m tinylm.bench --profile` tabulates). Prints the
kernels per step, their summed time per step (profiler annotations, copies and memsets left out),
the most frequent kernels, and those taking the most time. Set against the graphed step's ms/step (`python -m tinylm.bench`),
the difference is the time between kernels.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))

from tinylm.bench import profiled_steps  # noqa: E402
from tinylm.devices import allow_tf32  # noqa: E402
from tinylm.workflow import model_params, train_params  # noqa: E402

STEPS = 5


def count(name: str, config: dict, batch: int, top: int) -> None:
    prof = profiled_steps(model_params(config, name), train_params(config, name), batch,
                          config["packing"]["seq_len"], torch.device("cuda"), STEPS)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not any(skip in e.name for skip in ("Optimizer", "Memcpy", "Memset"))]
    n, us = collections.Counter(), collections.Counter()
    for e in kernels:
        key = re.sub(r"_\d+$", "", e.name)[:60]  # inductor numbers its kernels: count them as one kind
        n[key] += 1
        us[key] += e.time_range.elapsed_us()
    print(f"== {name}, batch {batch}: {len(kernels) / STEPS:.0f} kernels per step, "
          f"{sum(us.values()) / STEPS / 1000:.3f} ms of kernel time per step")
    for key, k in n.most_common(top):
        print(f"  {k / STEPS:5.0f} x {us[key] / k:7.2f} us  {key}")
    print("  most time:")
    for key, t in us.most_common(top):
        print(f"  {t / STEPS:8.1f} us per step  {n[key] / STEPS:4.0f} x  {key}")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--models", nargs="+", default=["baseline", "falcon"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--top", type=int, default=22)
    args = ap.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    allow_tf32()
    for name in args.models:
        count(name, config, args.batch, args.top)


if __name__ == "__main__":
    main()
