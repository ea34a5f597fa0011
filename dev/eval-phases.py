"""Where an evaluation job's time goes on CUDA, phase by phase, for one model of the config: the
imports, building the model, the first batch (eager warm-up that builds the Triton kernels, then the
CUDA-graph capture of `evaluate.GraphedLoss`), the validation and test passes at the study's sizes,
and the samples (`generate_ids`, six prompts of 64 new tokens), as rule evaluate_model runs them.
Random weights and random tokens: the times, not the losses, are the point.

    python3 dev/eval-phases.py baseline          # run twice: empty Triton cache, then a warm one
    TRITON_CACHE_DIR=$(mktemp -d) python3 dev/eval-phases.py falcon

Figures: docs/performance.md, "One H100, 2026-12-06 (third session)".
"""

import sys
import time

T0 = time.perf_counter()
_last = [T0]


def mark(what: str) -> None:
    now = time.perf_counter()
    print(f"  {what:<40} {now - _last[0]:7.2f} s", flush=True)
    _last[0] = now


import torch  # noqa: E402

mark("import torch")
import yaml  # noqa: E402

from tinylm.model import GPT, GPTConfig  # noqa: E402

mark("import tinylm.model")
from tinylm.evaluate import GraphedLoss, evaluate_loss  # noqa: E402
from tinylm.generate import generate_ids  # noqa: E402

mark("import evaluate, generate")


def main(name: str, config: str = "config/config.yaml") -> None:
    cfg = yaml.safe_load(open(config))
    m = {k: v for k, v in cfg["models"][name].items() if k != "train"}
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_dict({**m, "vocab_size": 8192})).cuda().eval()
    torch.cuda.synchronize()
    mark("model to cuda")
    fwd = GraphedLoss(model)
    val = torch.randint(0, 8192, (21990, 129), dtype=torch.int32).numpy()  # the study's split sizes
    test = torch.randint(0, 8192, (5000, 129), dtype=torch.int32).numpy()
    kw = dict(batch_size=512, device="cuda", precision="bf16")
    evaluate_loss(fwd, val[:512], **kw)
    torch.cuda.synchronize()
    mark("first batch (warm-up + capture)")
    evaluate_loss(fwd, val, **kw)
    mark("validation 21,990 rows")
    evaluate_loss(fwd, test, **kw)
    mark("test 5,000 rows")
    for p in range(6):
        g = torch.Generator().manual_seed(42)
        list(generate_ids(model, [1, 5, 9], max_new_tokens=64, temperature=0.1, top_k=5, generator=g, window=128))
        if p == 0:
            mark("generation, first prompt")
    mark("generation, 5 more prompts")
    print(f"  {'total':<40} {time.perf_counter() - T0:7.2f} s")


if __name__ == "__main__":
    main(*sys.argv[1:])
