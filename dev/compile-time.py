"""Where a run's start-up goes on CUDA: the first compiled training steps and the first evaluation,
with torch's own table of compile phases (dynamo tracing, AOT autograd, inductor, Triton builds).

    python3 dev/compile-time.py --models baseline falcon      # in a fresh process, with empty caches:
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d) python3 dev/compile-time.py
    # cold, then warm: the same cache dirs twice (the second loads what the first saved)
    export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d)
    python3 dev/compile-time.py; python3 dev/compile-time.py

Each model is built as a training run builds it (tinylm.step.Stepper at the config's settings); the
script times its warm-up steps and CUDA-graph capture (train.compile's start-up), then one steady
step, then the first and a second evaluation of `--eval-rows` rows at the evaluation batch size,
and torch's cache counters (AOTAutograd: hit, miss, saved, bypass; inductor's FX graph cache).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))

from tinylm.config import TrainConfig  # noqa: E402
from tinylm.devices import allow_tf32  # noqa: E402
from tinylm.distributed import DistInfo  # noqa: E402
from tinylm.evaluate import evaluate_loss  # noqa: E402
from tinylm.model import GPT, GPTConfig  # noqa: E402
from tinylm.step import Stepper, make_optimizer  # noqa: E402
from tinylm.workflow import model_params, train_params  # noqa: E402


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(name: str, config: dict, eval_rows: int) -> None:
    """Build model `name` as a training run does, time its start-up, print the figures and torch's table."""
    device = torch.device("cuda")
    seq_len = config["packing"]["seq_len"]
    cfg = TrainConfig.from_dict({**train_params(config, name), "device": "cuda", "wandb": {}})
    mcfg = GPTConfig.from_dict(model_params(config, name))
    model = GPT(mcfg).to(device)
    n_rows = max(4096, eval_rows)
    rows = torch.randint(0, mcfg.vocab_size, (n_rows, seq_len + 1), dtype=torch.int32, device=device)
    stepper = Stepper(model, make_optimizer(model, cfg, device), cfg, device, DistInfo(), rows)
    idx = torch.randint(0, n_rows, (cfg.batch_size,), device=device)
    warm = [timed(lambda s=s: stepper.step(s, idx)) for s in range(Stepper.WARMUP_STEPS)]
    steady = timed(lambda: stepper.step(10, idx))
    val = rows[:eval_rows]

    def evaluate() -> None:
        evaluate_loss(stepper.compiled, val, batch_size=config["eval"]["batch_size"], device=device,
                      precision=cfg.precision)

    first_eval, second_eval = timed(evaluate), timed(evaluate)
    print(f"{name}: warm-up steps {' + '.join(f'{w:.2f}' for w in warm)} s (the first compiles; the "
          f"last captures), then {1000 * steady:.2f} ms/step; evaluation of {len(val)} rows: first "
          f"{first_eval:.2f} s, second {second_eval:.3f} s", flush=True)
    print(torch._dynamo.utils.compile_times(repr="str", aggregate=True), flush=True)
    caches = {k: v for group in ("aot_autograd", "inductor") for k, v in torch._dynamo.utils.counters[group].items()
              if "cache" in k}
    print(f"{name}: cache counters so far in this process {caches}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--models", nargs="+", default=["baseline"])
    ap.add_argument("--eval-rows", type=int, default=8192)
    args = ap.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    allow_tf32()
    for name in args.models:
        measure(name, config, args.eval_rows)


if __name__ == "__main__":
    main()
