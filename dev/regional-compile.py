"""Compiling one transformer block instead of the whole model: the first step's seconds on empty compile
caches against the steady ms/step, for the training step as the loop runs it.

    python3 dev/regional-compile.py --models baseline falcon [--batch 64 512] [--steps 200]

Ways of building the step, each in a fresh process on empty TORCHINDUCTOR_CACHE_DIR and
TRITON_CACHE_DIR (what a first run on a machine meets):

    whole     `tinylm.step.compile_model`, the training default: the whole model, one graph
    regional  each Block compiled by itself (`Block.compile`): the blocks share their code, so dynamo
              traces one block (and the last one, which returns only the norm) instead of all of them;
              embeddings, the stats and the output layer + loss run eagerly
    nested    the whole model, one graph, with `Block.forward` marked as a nested compile region
              (`torch.compiler.nested_compile_region`): the compiler traces and compiles one block and
              calls that code for every layer, inside the one graph
    none      no compiler (as dev/graph-only-step.py)

In each the Stepper captures the step in a CUDA graph after its warm-up steps. Prints, per model,
batch and way, the warm-up + capture seconds (the first step compiles) and the ms/step of `--steps`
graphed steps. The default 20,000-step baseline run pays the first figure once and the second 20,000
times. `--device cpu` checks the regional model's loss and gradients against the plain model's on the
CPU (no timing) and exits. Figures (H200, docs/performance.md, 2026-12-05): baseline's first steps
20.18 s whole, 17.65 s nested, at the same ms/step; falcon nested fails in torch 2.11's dynamo.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))

import tinylm.step as step  # noqa: E402
from tinylm.config import GPTConfig, TrainConfig  # noqa: E402
from tinylm.devices import allow_tf32  # noqa: E402
from tinylm.distributed import DistInfo  # noqa: E402
from tinylm.model import GPT, Block  # noqa: E402
from tinylm.workflow import model_params, train_params  # noqa: E402

WAYS = ("whole", "regional", "nested", "none")


def compile_blocks(model: torch.nn.Module, autocast_dtype: torch.dtype | None) -> torch.nn.Module:
    """The model with each transformer block compiled in place; the rest stays eager."""
    torch.compiler.reset()
    step.allow_cached_training_graphs(autocast_dtype)
    for block in model.blocks:
        block.compile(dynamic=False)
    return model


def measure(name: str, config: dict, way: str, batch: int, steps: int) -> dict:
    if way == "regional":
        step.compile_model = compile_blocks
    elif way == "nested":
        Block.forward = torch.compiler.nested_compile_region(Block.forward)
    elif way == "none":
        step.compile_model = lambda model, autocast_dtype: model
    device = torch.device("cuda")
    seq_len = config["packing"]["seq_len"]
    mcfg = GPTConfig.from_dict(model_params(config, name))
    rows = torch.randint(0, mcfg.vocab_size, (8192, seq_len + 1), dtype=torch.int32, device=device)
    cfg = TrainConfig.from_dict({**train_params(config, name), "device": "cuda", "wandb": {}, "batch_size": batch})
    model = GPT(mcfg).to(device)
    stepper = step.Stepper(model, step.make_optimizer(model, cfg, device), cfg, device, DistInfo(), rows)
    idx = torch.randint(0, len(rows), (batch,), device=device)

    def seconds(first: int, n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for s in range(first, first + n):
            stepper.step(s, idx)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    start = seconds(0, step.Stepper.WARMUP_STEPS + 1)
    ms = 1000 * seconds(10, steps) / steps
    graphs = counters["stats"]["unique_graphs"]  # what dynamo traced: the model, or a block or two
    return {"model": name, "way": way, "batch": batch, "first_sec": start, "ms_per_step": ms,
            "tokens_per_sec": batch * seq_len / ms * 1000, "graphs": graphs}


def check_on_cpu(name: str, config: dict) -> None:
    """Loss and gradients of the model with compiled blocks against the plain model's, on the CPU."""
    mcfg = GPTConfig.from_dict({**model_params(config, name), "n_layers": 2})
    torch.manual_seed(0)
    plain = GPT(mcfg)
    regional = GPT(mcfg)
    regional.load_state_dict(plain.state_dict())
    compile_blocks(regional, None)
    x = torch.randint(0, mcfg.vocab_size, (2, 16))
    losses = []
    for m in (plain, regional):
        loss = m(x[:, :-1], x[:, 1:])["loss"]
        loss.backward()
        losses.append(loss.item())
    a, b = (dict(m.named_parameters()) for m in (plain, regional))
    worst = max((a[k].grad - b[k].grad).abs().max().item() for k in a if a[k].grad is not None)
    print(f"{name}: 2 compiled blocks on the CPU, loss {losses[1]:.6f} against {losses[0]:.6f}, largest "
          f"gradient difference {worst:.2e}, {counters['stats']['unique_graphs']} graphs traced", flush=True)
    assert abs(losses[1] - losses[0]) < 1e-5 and worst < 1e-4, (losses, worst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--models", nargs="+", default=["baseline", "falcon"])
    ap.add_argument("--batch", type=int, nargs="+", default=[64])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--one", nargs=3, metavar=("MODEL", "WAY", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    allow_tf32()
    if args.device == "cpu":
        for name in args.models:
            check_on_cpu(name, config)
        return
    if args.one:  # the child process: one measurement, one JSON line
        name, way, batch = args.one
        print(json.dumps(measure(name, config, way, int(batch), args.steps)), flush=True)
        return
    # One untimed child first: the first process to import the compiler also reads it from disk.
    subprocess.run([sys.executable, "-c", "import torch._inductor.compile_fx, triton"], timeout=300)
    for name in args.models:
        for batch in args.batch:
            for way in args.ways:
                with tempfile.TemporaryDirectory() as caches:
                    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{caches}/inductor",
                           "TRITON_CACHE_DIR": f"{caches}/triton"}
                    out = subprocess.run([sys.executable, __file__, "--config", args.config, "--steps",
                                          str(args.steps), "--one", name, way, str(batch)],
                                         capture_output=True, text=True, env=env, timeout=600)
                lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
                if out.returncode or not lines:
                    print(f"{name} batch {batch} {way}: failed ({out.returncode})\n{out.stderr[-2000:]}", flush=True)
                    continue
                r = json.loads(lines[-1])
                print(f"{name} batch {batch} {way:8s}: first steps {r['first_sec']:6.2f} s, then "
                      f"{r['ms_per_step']:.3f} ms/step ({r['tokens_per_sec'] / 1e6:.3f}M tokens/s), "
                      f"{r['graphs']} graphs traced", flush=True)


if __name__ == "__main__":
    main()
