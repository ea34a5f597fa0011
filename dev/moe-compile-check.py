"""Does a compiled inference graph of a trained MoE model agree with the plain model? (CUDA only)

    PYTHONPATH=lib python dev/moe-compile-check.py --train-bin data/processed/tinystories/bpe8192/train.bin \
        --val-bin data/processed/tinystories/bpe8192/validation.bin [--model falcon] [--steps 800]

Trains the model with the training loop's compiled, CUDA-graphed step, then evaluates the same
weights four ways: the plain model and torch.compile(dynamic=False), each at batch 512 and 64. On an
H100 with torch 2.11, before the MoE combine became a matmul without autograd (moe.py), the compiled
numbers came out 0.6-2.6 nats above the plain ones for falcon and changed from call to call
(docs/performance.md, finding 3). Training evaluates every model compiled, so this is the regression
check for that: exit status 0 when all four agree within --rtol, 1 otherwise.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from tinylm.config import TrainConfig
from tinylm.data.pack import open_packed
from tinylm.distributed import DistInfo
from tinylm.evaluate import evaluate_loss
from tinylm.model import GPT, GPTConfig
from tinylm.step import RowSampler, Stepper, make_optimizer
from tinylm.workflow import model_params, train_params

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--train-bin", required=True)
ap.add_argument("--val-bin", required=True)
ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "config" / "config.yaml"))
ap.add_argument("--model", default="falcon")
ap.add_argument("--steps", type=int, default=800)
ap.add_argument("--rows", type=int, default=2048, help="validation rows evaluated")
ap.add_argument("--rtol", type=float, default=5e-3)
args = ap.parse_args()
if not torch.cuda.is_available():
    sys.exit("needs a CUDA GPU")

dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = True
config = yaml.safe_load(Path(args.config).read_text())
train = torch.from_numpy(np.asarray(open_packed(args.train_bin), dtype=np.int32)).to(dev)
val = torch.from_numpy(np.asarray(open_packed(args.val_bin)[: args.rows], dtype=np.int32)).to(dev)
cfg = GPTConfig.from_dict(model_params(config, args.model))
tcfg = TrainConfig.from_dict({**train_params(config, args.model), "device": "cuda", "max_steps": args.steps,
                              "wandb": {}})
torch.manual_seed(tcfg.seed)
model = GPT(cfg).to(dev)
stepper = Stepper(model, make_optimizer(model, tcfg, dev), tcfg, dev, DistInfo(), train)
idx = torch.from_numpy(RowSampler(len(train), tcfg.batch_size, tcfg.seed).indices(0, args.steps)).to(dev)
for s in range(args.steps):
    stepper.step(s, idx[s])
compiled = torch.compile(model, dynamic=False)
worst = 0.0
for bs in (512, 64):
    plain = evaluate_loss(model, val, batch_size=bs, device=dev)["loss"]
    comp = evaluate_loss(compiled, val, batch_size=bs, device=dev)["loss"]
    worst = max(worst, abs(comp - plain) / plain)
    print(f"{args.model}, {args.steps} steps, batch {bs}: plain {plain:.4f}, compiled {comp:.4f}")
print("agree" if worst <= args.rtol else f"DISAGREE (relative difference {worst:.3g} > {args.rtol})")
sys.exit(0 if worst <= args.rtol else 1)
