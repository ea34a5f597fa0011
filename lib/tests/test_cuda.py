"""The CUDA fast path (torch.compile + one CUDA graph per step) computes what the eager path does.

These run only where a GPU is (the device machine; CI has none): the CPU suite covers the same loop
eagerly. Run with `pytest lib/tests/test_cuda.py` on a GPU box.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinylm.distributed import DistInfo
from tinylm.evaluate import evaluate_loss
from tinylm.model import GPT, GPTConfig
from tinylm.train import RowSampler, TrainConfig, _Stepper, make_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DENSE = GPTConfig(vocab_size=512, max_seq_len=64, d_model=64, n_layers=2, n_heads=4, d_ff=256)
MOE = GPTConfig(
    vocab_size=512,
    max_seq_len=64,
    d_model=64,
    n_layers=2,
    n_heads=4,
    d_ff=256,
    ffn="moe",
    n_experts=4,
    top_k=2,
    d_ff_expert=128,
)
# Capacity for half the assignments: many are dropped every step, which exercises the dump rows
# (a compiled kernel once raced on a shared dump row and broke graphed MoE training).
MOE_DROPPING = GPTConfig(vocab_size=512, max_seq_len=64, d_model=64, n_layers=2, n_heads=4, d_ff=256, ffn="moe",
                         n_experts=8, top_k=2, d_ff_expert=128, capacity_factor=0.5)


def losses(
    cfg: GPTConfig, compiled: bool, steps: int = 40, batch: int = 32, precision: str = "bf16"
):
    device = torch.device("cuda")
    tcfg = TrainConfig(
        device="cuda",
        precision=precision,
        compile=compiled,
        batch_size=batch,
        max_steps=steps,
        lr=1e-3,
        warmup_steps=5,
    )
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = make_optimizer(model, tcfg, device)
    gen = np.random.default_rng(1)
    # Learnable rows: arithmetic sequences mod vocab (random start, stride 1-3), predictable from context.
    start, stride = gen.integers(0, cfg.vocab_size, (256, 1)), gen.integers(1, 4, (256, 1))
    rows = (start + stride * np.arange(33)) % cfg.vocab_size
    data = torch.from_numpy(rows.astype(np.int32)).to(device)
    stepper = _Stepper(model, opt, tcfg, device, DistInfo(), data)
    idx = torch.from_numpy(RowSampler(256, batch, seed=3).indices(0, steps)).to(device)
    out = []
    for s in range(steps):
        stepper.step(s, idx[s])
        acc, _ = stepper.read_stats()
        out.append(acc[0].item())
    assert (stepper.graph is not None) == (compiled and cfg.ffn == "dense")  # MoE trains eagerly
    val = evaluate_loss(stepper.compiled, data[:64], batch_size=16, device=device)["loss"]
    return np.array(out), val


@pytest.mark.parametrize("cfg", [DENSE, MOE, MOE_DROPPING], ids=["dense", "moe", "moe-dropping"])
def test_graphed_step_matches_eager_within_bf16_tolerance(cfg):
    eager, val_e = losses(cfg, compiled=False)
    fast, val_f = losses(cfg, compiled=True)
    assert eager[-1] < eager[0] - 0.5  # it learns
    np.testing.assert_allclose(fast, eager, rtol=2e-2, atol=2e-2)
    assert val_f == pytest.approx(val_e, rel=2e-2)


def test_fp32_eager_and_graphed_agree_closely():
    eager, _ = losses(DENSE, compiled=False, precision="fp32", steps=20)
    fast, _ = losses(DENSE, compiled=True, precision="fp32", steps=20)
    np.testing.assert_allclose(fast, eager, rtol=2e-3, atol=2e-3)
