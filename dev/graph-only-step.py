"""The training step captured in a CUDA graph without torch.compile: what a run would gain and lose by
skipping the compiler (no compile time; unfused eager ops between tinylm's Triton kernels).

    python3 dev/graph-only-step.py --models baseline falcon

Each model is built as a training run builds it (tinylm.step.Stepper at the config's settings, at
batch 64 and 512), with `tinylm.step.compile_model` swapped for the identity, so the Stepper captures
the eager step after its warm-up steps. Prints the warm-up + capture seconds and the ms/step of 200
graphed steps, then the plain model's evaluation of 8,192 rows (first and second pass).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))

import tinylm.step as step  # noqa: E402
from tinylm.config import GPTConfig, TrainConfig  # noqa: E402
from tinylm.devices import allow_tf32  # noqa: E402
from tinylm.distributed import DistInfo  # noqa: E402
from tinylm.evaluate import evaluate_loss  # noqa: E402
from tinylm.model import GPT  # noqa: E402
from tinylm.workflow import model_params, train_params  # noqa: E402


def seconds(fn, *args) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(*args)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def run(stepper, idx, first: int, n: int) -> None:
    for s in range(first, first + n):
        stepper.step(s, idx)


def measure(name: str, config: dict, steps: int) -> None:
    device = torch.device("cuda")
    seq_len = config["packing"]["seq_len"]
    mcfg = GPTConfig.from_dict(model_params(config, name))
    rows = torch.randint(0, mcfg.vocab_size, (8192, seq_len + 1), dtype=torch.int32, device=device)
    for batch in (64, 512):
        cfg = TrainConfig.from_dict({**train_params(config, name), "device": "cuda", "wandb": {},
                                     "batch_size": batch})
        model = GPT(mcfg).to(device)
        stepper = step.Stepper(model, step.make_optimizer(model, cfg, device), cfg, device, DistInfo(), rows)
        idx = torch.randint(0, len(rows), (batch,), device=device)

        start = seconds(run, stepper, idx, 0, step.Stepper.WARMUP_STEPS + 1)
        ms = 1000 * seconds(run, stepper, idx, 10, steps) / steps
        print(f"{name} batch {batch}: warm-up + capture {start:.2f} s, then {ms:.3f} ms/step "
              f"({batch * seq_len / ms / 1000:.3f}M tokens/s)", flush=True)
    evaluation = dict(batch_size=config["eval"]["batch_size"], device=device, precision=cfg.precision)
    first, second = (seconds(lambda: evaluate_loss(model, rows, **evaluation)) for _ in range(2))
    print(f"{name}: plain evaluation of {len(rows)} rows: first {first:.3f} s, second {second:.3f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--models", nargs="+", default=["baseline"])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    allow_tf32()
    step.compile_model = lambda model, autocast_dtype: model  # the Stepper still graphs the step when train.compile is on
    for name in args.models:
        measure(name, config, args.steps)


if __name__ == "__main__":
    main()
