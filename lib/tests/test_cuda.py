"""The CUDA fast path (torch.compile + one CUDA graph per step) computes what the eager path does.

These run only where a GPU is (the device machine; CI has none): the CPU suite covers the same loop
eagerly. Run with `pytest lib/tests/test_cuda.py` on a GPU box.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._functorch.config
import torch._inductor.config
import yaml
from child_env import child_env

from tinylm.config import TrainConfig
from tinylm.distributed import DistInfo
from tinylm.evaluate import GraphedLoss, evaluate_loss
from tinylm.model import GPT, GPTConfig
from tinylm.step import RowSampler, Stepper, make_optimizer
from tinylm.workflow import model_params

CONFIG_YAML = Path(__file__).resolve().parents[2] / "config" / "config.yaml"

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
DENSE_FP32_RESIDUAL = dataclasses.replace(DENSE, fp32_residual=True)
MOE_PLAIN_BLOCKS = dataclasses.replace(MOE, moe_fused_blocks=False)  # MoE blocks as they ran until 2026-12-06
# Capacity for half the assignments: many are dropped every step, which exercises the dump rows
# (a compiled kernel once raced on a shared dump row and broke graphed MoE training).
MOE_DROPPING = GPTConfig(vocab_size=512, max_seq_len=64, d_model=64, n_layers=2, n_heads=4, d_ff=256, ffn="moe",
                         n_experts=8, top_k=2, d_ff_expert=128, capacity_factor=0.5)


# torch's cache settings as a process starts; step.compile_model changes them for the whole process.
TORCH_CACHE_SETTINGS = {(torch.compiler.config, "cache_key_tag"): torch.compiler.config.cache_key_tag,
                        (torch._functorch.config, "autograd_cache_allow_custom_autograd_functions"):
                            torch._functorch.config.autograd_cache_allow_custom_autograd_functions}


@pytest.fixture(autouse=True)
def compiled_means_compiled(monkeypatch):
    """Each test compiles from a clean slate, and a function that reaches dynamo's recompile limit is
    an error rather than a silent fall back to the plain code (which would make every "compiled
    matches plain" comparison below pass without testing anything). torch's cache settings start as
    in a fresh process: a test that calls torch.compile itself must not find the ones an earlier
    test's compile_model left (keyed for that test's autocast dtype, not its own)."""
    torch.compiler.reset()
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    for (config, name), value in TORCH_CACHE_SETTINGS.items():
        monkeypatch.setattr(config, name, value)


def poison_free_memory() -> None:
    """Fill memory the caching allocator will hand out again with NaN bytes (0xFF), so a kernel that
    reads a buffer nothing wrote gives NaN instead of whatever an earlier run left there."""
    big = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda").fill_(0xFF)
    small = [torch.empty(2**19, dtype=torch.uint8, device="cuda").fill_(0xFF) for _ in range(400)]
    del big, small


def losses(
    cfg: GPTConfig, compiled: bool, steps: int = 40, batch: int = 32, precision: str = "bf16", seq_len: int = 32
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
    rows = (start + stride * np.arange(seq_len + 1)) % cfg.vocab_size
    data = torch.from_numpy(rows.astype(np.int32)).to(device)
    stepper = Stepper(model, opt, tcfg, device, DistInfo(), data)
    idx = torch.from_numpy(RowSampler(256, batch, seed=3).indices(0, steps)).to(device)
    out = []
    for s in range(steps):
        stepper.step(s, idx[s])
        acc, _ = stepper.read_stats()
        out.append(acc[0].item())
    assert (stepper.graph is not None) == (compiled and precision != "fp16")  # the scaler is not graphed
    # The evaluation the training loop runs (the compiled model, fixed batches, the last one padded)
    # and the straightforward one (the plain model) on the trained weights.
    val = evaluate_loss(stepper.compiled, data, batch_size=96, device=device)["loss"]
    val_plain = evaluate_loss(model, data, batch_size=96, device=device)["loss"]
    return np.array(out), val, val_plain


@pytest.mark.parametrize("cfg", [DENSE, MOE, MOE_DROPPING], ids=["dense", "moe", "moe-dropping"])
def test_graphed_step_matches_eager_within_bf16_tolerance(cfg):
    eager, val_e, _ = losses(cfg, compiled=False)
    fast, val_f, val_f_plain = losses(cfg, compiled=True)
    assert eager[-1] < eager[0] - 0.5  # it learns
    np.testing.assert_allclose(fast, eager, rtol=2e-2, atol=2e-2)
    assert val_f == pytest.approx(val_e, rel=2e-2)
    assert val_f == pytest.approx(val_f_plain, rel=5e-3)  # same weights: compiled evaluation = plain


def test_fp32_eager_and_graphed_agree_closely():
    eager, _, _ = losses(DENSE, compiled=False, precision="fp32", steps=20)
    fast, _, _ = losses(DENSE, compiled=True, precision="fp32", steps=20)
    np.testing.assert_allclose(fast, eager, rtol=2e-3, atol=2e-3)


def test_one_process_trains_many_model_shapes_compiled():
    """A sweep from Python: five model shapes trained one after another in one process. Each run
    compiles GPT.forward twice (its step and its evaluation batch) and dynamo keeps eight versions of
    a function; before training runs started from a clean compile state, the fifth shape hit the
    limit and trained uncompiled (here, with the fixture's setting, an error)."""
    for n_layers in range(1, 6):
        cfg = GPTConfig(vocab_size=128, max_seq_len=32, d_model=32, n_layers=n_layers, n_heads=2, d_ff=64)
        fast, val, val_plain = losses(cfg, compiled=True, steps=8, batch=8, seq_len=16)
        assert np.isfinite(fast).all()
        assert val == pytest.approx(val_plain, rel=5e-3)


@pytest.mark.parametrize(
    "cfg,dtype,kernels_on,stream",
    [(DENSE, torch.bfloat16, True, torch.bfloat16), (DENSE_FP32_RESIDUAL, torch.bfloat16, True, torch.float32),
     (DENSE, torch.float16, True, torch.float32), (MOE, torch.bfloat16, True, torch.bfloat16),
     (MOE_PLAIN_BLOCKS, torch.bfloat16, True, torch.float32), (DENSE, torch.bfloat16, False, torch.float32)],
    ids=["dense-bf16", "fp32-residual", "fp16", "moe", "moe-plain-blocks", "no-kernels"],
)
def test_residual_stream_dtype_between_blocks(cfg, dtype, kernels_on, stream):
    """bf16 between blocks only on the fused path under bf16 autocast, MoE models included unless they
    keep the plain blocks they trained in before 2026-12-06."""
    from tinylm import kernels

    model = GPT(cfg).cuda()
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    idx = torch.randint(0, cfg.vocab_size, (2, 16), device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        if kernels_on:
            loss = model(idx, idx)["loss"]
        else:
            with kernels.disabled():
                loss = model(idx, idx)["loss"]
    loss.backward()
    assert seen == [stream] and torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


FALCON = GPTConfig.from_dict({**model_params(yaml.safe_load(CONFIG_YAML.read_text()), "falcon"), "vocab_size": 8192})


@pytest.mark.parametrize("attempt", [1, 2])
def test_falcon_size_graphed_training_learns_like_eager_on_stale_memory(attempt):
    """At falcon's real size (batch 64 x 128 tokens, 8 experts, drops), on poisoned memory, twice in one
    process: the scan + scatter routing this replaced learned when compiled the first time in a
    process and stayed at the uniform loss (ln 8192 = 9.01) the second time and when graphed."""
    poison_free_memory()
    eager, _, _ = losses(FALCON, compiled=False, steps=60, batch=64, seq_len=128)
    poison_free_memory()
    torch._dynamo.reset()
    fast, val, val_plain = losses(FALCON, compiled=True, steps=60, batch=64, seq_len=128)
    assert np.isfinite(fast).all()
    assert eager[-10:].mean() < eager[0] - 1.0  # it learns
    np.testing.assert_allclose(fast[-10:].mean(), eager[-10:].mean(), rtol=5e-2)
    # Evaluation as training runs it matches the plain model on the trained weights.
    assert val < eager[0] - 1.0 and val == pytest.approx(val_plain, rel=5e-3)


# --- tinylm.kernels against the plain PyTorch paths -------------------------------------------------


def _no_further_off(what, got, want, plain, atol):
    """got is no further from the fp32 reference `want` than twice the plain path's `plain`, plus atol."""
    err, plain_err = (got.float() - want).abs().max(), (plain.float() - want).abs().max()
    assert err <= 2 * plain_err + atol, (what, err, plain_err, want.abs().max())


def _grads_no_further_off(names, got, want, plain):
    """Each gradient as `_no_further_off`, with atol a thousandth of the reference's largest entry."""
    for name, g, w, p in zip(names, got, want, plain, strict=True):
        _no_further_off(name, g, w, p, 1e-3 * w.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,H,Dh", [(64, 128, 4, 64), (3, 37, 2, 16), (5, 128, 2, 128), (7, 100, 8, 32)])
def test_attention_kernel_matches_reference(B, T, H, Dh, dtype):
    """Output and qkv gradient against fp32 attention: no further off than SDPA in the same dtype."""
    from tinylm import kernels

    torch.manual_seed(0)
    qkv = torch.randn(B, T, 3 * H * Dh, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn(B, T, H * Dh, device="cuda", dtype=dtype)
    assert kernels.attention_fused(qkv, H)
    q32 = qkv.detach().float().requires_grad_(True)
    ref = kernels.reference_attention(q32, H)
    (ref_grad,) = torch.autograd.grad(ref, q32, g.float())
    for fn in (kernels.causal_attention, torch.compile(kernels.causal_attention, fullgraph=True)):
        out = fn(qkv, H)
        (grad,) = torch.autograd.grad(out, qkv, g)
        base = kernels.reference_attention(qkv, H)  # SDPA in dtype
        (base_grad,) = torch.autograd.grad(base, qkv, g)
        assert out.dtype == dtype and grad.dtype == dtype and out.shape == (B, T, H * Dh)
        _no_further_off("out", out, ref, base, 1e-3)
        _no_further_off("qkv grad", grad, ref_grad, base_grad, 1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,H,Dh", [(16, 128, 4, 64), (3, 37, 2, 16)])
def test_linear_attention_bias_gradient_comes_from_the_kernel(B, T, H, Dh, dtype, monkeypatch):
    """x, weight and bias gradients of the projection + attention against fp32: no further off than
    the plain layers under autocast (the bias's gradient is the kernel's sum over positions)."""
    from tinylm import kernels

    torch.manual_seed(0)
    # The compiled graph of this function is the same for both autocast dtypes (autocast is ambient),
    # and torch 2.11's compile caches handed the bf16 build to the fp16 run in this process (an fp16
    # output was bf16). A training run uses one precision; compile afresh for each dtype here.
    torch._dynamo.reset()
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    D = H * Dh
    x = torch.randn(B, T, D, device="cuda", requires_grad=True)
    w = (D**-0.5 * torch.randn(3 * D, D, device="cuda")).requires_grad_(True)
    b = (0.5 * torch.randn(3 * D, device="cuda")).requires_grad_(True)
    g = torch.randn(B, T, D, device="cuda")

    def plain(x, w, b):
        return kernels.reference_attention(torch.nn.functional.linear(x, w, b), H)

    ref = plain(x, w, b)
    ref_grads = torch.autograd.grad(ref, (x, w, b), g)
    for fn in (kernels.linear_causal_attention, torch.compile(kernels.linear_causal_attention, fullgraph=True)):
        with torch.autocast("cuda", dtype=dtype):
            out = fn(x, w, b, H)
            with kernels.disabled():
                base = plain(x, w, b)
        grads = torch.autograd.grad(out, (x, w, b), g.to(dtype))
        base_grads = torch.autograd.grad(base, (x, w, b), g.to(dtype))
        assert out.dtype == dtype and [t.dtype for t in grads] == [torch.float32] * 3, (fn, out.dtype, base.dtype)
        _no_further_off("out", out, ref, base, 1e-3)
        _grads_no_further_off("x w b".split(), grads, ref_grads, base_grads)


def _written_args(kernel, kwargs) -> list[str]:
    """The tensor arguments of a Triton kernel that inductor's analysis of its IR says it writes. In a
    compiled graph every written input is copied before each launch (functional semantics)."""
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    if hasattr(tkw, "identify_accessed_tensors"):  # newer torch
        return sorted(dep.name for dep in tkw.identify_accessed_tensors(kernel, kwargs, {}).read_writes.writes)
    return sorted(tkw.identify_mutated_tensors(kernel, kwargs, {}))


def test_compiled_graph_sees_kernels_write_only_their_outputs():
    """Had the attention backward's store addresses come from a helper that also took the qkv pointer,
    inductor would count qkv as written and copy all of it before every backward launch."""
    from tinylm.kernels import attention, loss, residual_norm
    from tinylm.kernels import gelu as gelu_op

    B, T, H, Dh = 2, 128, 4, 64
    qkv = torch.randn(B, T, 3 * H * Dh, device="cuda", dtype=torch.bfloat16)
    o = torch.empty(B, T, H * Dh, device="cuda", dtype=torch.bfloat16)
    lse = torch.empty(B, H, T, device="cuda")
    shape = dict(QK_SCALE=0.18, T=T, H=H, DH=Dh, BLOCK_T=T)
    assert _written_args(attention._attn_fwd_kernel, dict(QKV=qkv, Out=o, LSE=lse, **shape)) == ["LSE", "Out"]
    bwd = dict(QKV=qkv, DO=o.clone(), LSE=lse, DQKV=torch.empty_like(qkv), DBias=torch.empty(B, 3 * H * Dh,
               device="cuda"), SM_SCALE=0.125, **shape)
    assert _written_args(attention._attn_bwd_kernel, bwd) == ["DBias", "DQKV"]
    logits = torch.empty(8, 1000, device="cuda", dtype=torch.bfloat16)
    ce = dict(Logits=logits, Targets=torch.zeros(8, dtype=torch.long, device="cuda"), Loss=torch.empty(8, device="cuda"),
              Grad=logits.clone(), V=1000, BLOCK_V=1024, WRITE_GRAD=True, IGNORE_INDEX=loss.IGNORE)
    assert _written_args(loss._ce_kernel, ce) == ["Grad", "Loss"]
    assert _written_args(loss._ce_kernel, {**ce, "Grad": logits, "WRITE_GRAD": False}) == ["Loss"]
    h = torch.empty(64, 1024, device="cuda", dtype=torch.bfloat16)
    gelu = dict(DA=h, Hpre=h.clone(), DH=h.clone(), Partial=torch.empty(1, 1024, device="cuda"), N=64, F=1024,
                ROWS=64, BLOCK_R=32, BLOCK_C=64, STAGES=2)
    assert _written_args(gelu_op._gelu_bwd_kernel, gelu) == ["DH", "Partial"]
    x = torch.empty(64, 256, device="cuda")
    stats = dict(Mean=torch.empty(64, device="cuda"), Rstd=torch.empty(64, device="cuda"), N=64, D=256, BLOCK_N=16,
                 BLOCK_D=256)
    fwd = dict(X=x, R=h[:, :256].clone(), RB=x[2].clone(), W=x[0].clone(), B=x[1].clone(), Xs=x.clone(),
               Y=h[:, :256].clone(), EPS=1e-5, **stats)
    assert _written_args(residual_norm._add_norm_fwd_kernel, fwd) == ["Mean", "Rstd", "Xs", "Y"]
    bwd = dict(GX=x, GY=h[:, :256].clone(), Xs=x.clone(), W=x[0].clone(), G=x.clone(), GLow=h[:, :256].clone(),
               Part=torch.empty(4, 3 * 256, device="cuda"), HAS_GX=True, WRITE_LOW=True, ROWS=16, STAGES=2,
               **stats)
    assert _written_args(residual_norm._add_norm_bwd_kernel, bwd) == ["G", "GLow", "Part"]
    assert _written_args(residual_norm._add_norm_bwd_kernel, {**bwd, "WRITE_LOW": False}) == ["G", "Part"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,D,F_,keep", [(8192, 256, 1024, True), (1000, 96, 96, True), (37, 64, 64, False)])
def test_residual_layer_norm_matches_plain_layers(N, D, F_, keep, dtype):
    """Both outputs and every gradient (x, h, projection weight and bias, norm weight and bias) against
    fp32: no further off than the plain layers under autocast, whose normalized output is cast to the
    autocast dtype here as the next matmul would (the fused path hands it out in that dtype)."""
    from tinylm import kernels

    torch.manual_seed(0)
    x = torch.randn(N, D, device="cuda", requires_grad=True)
    h = torch.randn(N, F_, device="cuda", requires_grad=True)
    pw = (F_**-0.5 * torch.randn(D, F_, device="cuda")).requires_grad_(True)
    pb = (0.1 * torch.randn(D, device="cuda")).requires_grad_(True)
    nw = (1 + 0.1 * torch.randn(D, device="cuda")).requires_grad_(True)
    nb = (0.1 * torch.randn(D, device="cuda")).requires_grad_(True)
    named = list(zip("x h proj_w proj_b norm_w norm_b".split(), (x, h, pw, pb, nw, nb), strict=True))
    gx, gy = torch.randn(N, D, device="cuda"), torch.randn(N, D, device="cuda")

    def call(fn, x, h, cast=None):
        out = fn(x, h, pw, pb, nw, nb, 1e-5, keep_residual=keep)
        out = out if keep else (out,)
        return out if cast is None else (*out[:-1], out[-1].to(cast))

    def grads(outs):
        ups = (gx.to(outs[0].dtype), gy.to(outs[1].dtype)) if keep else (gy.to(outs[0].dtype),)
        return torch.autograd.grad(outs, [t for _, t in named], ups)

    ref = call(kernels.residual_layer_norm, x, h)
    ref_grads = grads(ref)
    for fn in (kernels.residual_layer_norm, torch.compile(kernels.residual_layer_norm, fullgraph=True)):
        with torch.autocast("cuda", dtype=dtype):
            assert kernels.residual_norm_fused(x)
            out = call(fn, x, h)
            with kernels.disabled():
                base = call(kernels.residual_layer_norm, x, h, cast=dtype)
        assert out[-1].dtype == dtype and (not keep or out[0].dtype == torch.float32)
        got, base_grads = grads(out), grads(base)
        for what, o, b_, r in zip(("residual", "normalized")[-len(out):], out, base, ref, strict=True):
            _no_further_off(what, o, r, b_, 1e-3)
        assert [g.dtype for g in got] == [torch.float32] * len(named)
        _grads_no_further_off([name for name, _ in named], got, ref_grads, base_grads)


@pytest.mark.parametrize("N,D,F_,keep", [(8192, 256, 1024, True), (1000, 96, 96, True), (37, 64, 64, False)])
def test_residual_layer_norm_keeps_a_bf16_stream(N, D, F_, keep):
    """A bf16 residual stream (what dense GPTs carry under bf16 autocast): both outputs and every
    gradient against fp32 math on the same values, no further off than the plain layers given the bf16
    stream; the stream and its gradient stay bf16, written once (the projection's input gradient is
    the same tensor)."""
    from tinylm import kernels

    torch.manual_seed(0)
    x = torch.randn(N, D, device="cuda").bfloat16().requires_grad_(True)
    x32 = x.detach().float().requires_grad_(True)
    h = torch.randn(N, F_, device="cuda", requires_grad=True)
    pw = (F_**-0.5 * torch.randn(D, F_, device="cuda")).requires_grad_(True)
    pb = (0.1 * torch.randn(D, device="cuda")).requires_grad_(True)
    nw = (1 + 0.1 * torch.randn(D, device="cuda")).requires_grad_(True)
    nb = (0.1 * torch.randn(D, device="cuda")).requires_grad_(True)
    names = "x h proj_w proj_b norm_w norm_b".split()
    gx, gy = torch.randn(N, D, device="cuda"), torch.randn(N, D, device="cuda")

    def call(fn, x, cast=None):
        out = fn(x, h, pw, pb, nw, nb, 1e-5, keep_residual=keep)
        out = out if keep else (out,)
        return out if cast is None else (*out[:-1], out[-1].to(cast))

    def grads(outs, x):
        ups = (gx.to(outs[0].dtype), gy.to(outs[1].dtype)) if keep else (gy.to(outs[0].dtype),)
        return torch.autograd.grad(outs, [x, h, pw, pb, nw, nb], ups)

    ref = call(kernels.residual_layer_norm, x32)
    ref_grads = grads(ref, x32)
    for fn in (kernels.residual_layer_norm, torch.compile(kernels.residual_layer_norm, fullgraph=True)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert kernels.residual_norm_fused(x)
            out = call(fn, x)
            with kernels.disabled():
                base = call(kernels.residual_layer_norm, x, cast=torch.bfloat16)
        assert [o.dtype for o in out] == [torch.bfloat16] * len(out)
        got, base_grads = grads(out, x), grads(base, x)
        for what, o, b_, r in zip(("residual", "normalized")[-len(out):], out, base, ref, strict=True):
            _no_further_off(what, o, r, b_, 1e-3)
        assert [g.dtype for g in got] == [torch.bfloat16] + [torch.float32] * 5
        _grads_no_further_off(names, got, ref_grads, base_grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,D,Fd", [(8192, 256, 1024), (1000, 64, 200), (3, 32, 96)])
def test_linear_gelu_matches_plain_layer(N, D, Fd, dtype):
    """Output and all three gradients against fp32: no further off than the plain layer under autocast."""
    from tinylm import kernels

    torch.manual_seed(0)
    x = torch.randn(N, D, device="cuda", requires_grad=True)
    w = (0.1 * torch.randn(Fd, D, device="cuda")).requires_grad_(True)
    b = (0.5 * torch.randn(Fd, device="cuda")).requires_grad_(True)
    g = torch.randn(N, Fd, device="cuda")
    ref = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b))
    ref_grads = torch.autograd.grad(ref, (x, w, b), g)

    def plain(x, w, b):
        return torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b))

    for fn in (kernels.linear_gelu, torch.compile(kernels.linear_gelu, fullgraph=True)):
        with torch.autocast("cuda", dtype=dtype):
            assert kernels.gelu_fused(x)
            out, base = fn(x, w, b), plain(x, w, b)
        grads = torch.autograd.grad(out, (x, w, b), g.to(dtype))
        base_grads = torch.autograd.grad(base, (x, w, b), g.to(dtype))
        assert out.dtype == dtype and [t.dtype for t in grads] == [torch.float32] * 3
        _no_further_off("out", out, ref, base, 1e-3)
        _grads_no_further_off("x w b".split(), grads, ref_grads, base_grads)


@pytest.mark.parametrize("T,K,S,D", [(65536, 2, 163840, 256), (1000, 1, 300, 96), (37, 3, 50, 8), (64, 2, 100, 4096)])
def test_moe_combine_kernel_matches_plain_path(T, K, S, D):
    """The kernel, eager and compiled, against the gather + bias + fp32 batched matmul, with dropped
    assignments."""
    from tinylm import kernels

    torch.manual_seed(0)
    E = 8
    y = torch.randn(S, D, device="cuda").to(torch.bfloat16)
    slot = torch.randint(0, S, (T, K), device="cuda")
    keep = torch.rand(T, K, device="cuda") > 0.2
    gate = torch.rand(T, K, device="cuda")
    bias = torch.randn(E, D, device="cuda")
    expert = torch.randint(0, E, (T, K), device="cuda")
    args = (y, slot, keep, gate, bias, expert)
    # the reference on the CPU: a TF32 setting left on by another test cannot round it
    ref = kernels.reference_combine(*(a.cpu() for a in args)).cuda()
    with torch.no_grad():
        assert kernels.combine_fused(y)
        for fn in (kernels.moe_combine, torch.compile(kernels.moe_combine, fullgraph=True)):
            out = fn(*args)
            assert out.dtype == torch.float32 and out.shape == (T, D)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # fp32 rounding of the sums' order
    with torch.enable_grad():
        assert not kernels.combine_fused(y)  # training keeps the elementwise combine


def test_moe_inference_with_combine_kernel_matches_plain_path(monkeypatch):
    """A falcon-shaped model's logits (eager and compiled, with the combine kernel) against the same
    model with only the combine on its plain path, and its evaluation loss against no kernels at all.

    Mean absolute logit differences in this model (CPU, fp32, measured when the test was written): a
    broken combine (zeros, dropped assignments kept, gates of 1, the first expert only) moves them by
    0.09-0.16; bf16 autocast against fp32 by 0.004. The loss alone barely moves (0.1-0.4%)."""
    import tinylm.kernels.combine
    from tinylm import kernels

    cfg = dataclasses.replace(MOE_DROPPING, d_model=256, n_heads=4, d_ff=1024, d_ff_expert=512, max_seq_len=128)
    torch.manual_seed(0)
    model = GPT(cfg).cuda().eval()
    idx = torch.randint(0, cfg.vocab_size, (16, 128), device="cuda")

    def logits(fn):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return fn(idx)["logits"].float()

    with monkeypatch.context() as m:
        m.setattr(tinylm.kernels.combine, "combine_fused", lambda y_SD: False)
        plain_combine = logits(model)
    with torch.no_grad():
        assert kernels.combine_fused(torch.empty(1, cfg.d_model, device="cuda"))  # the kernel runs below
    eager, compiled = logits(model), logits(torch.compile(model, dynamic=False))
    # a rounding difference can flip a routing choice (and the drops after it): a few tokens' logits
    assert (eager - plain_combine).abs().mean().item() < 0.01
    assert (compiled - plain_combine).abs().mean().item() < 0.03

    data = torch.randint(0, cfg.vocab_size, (1024, 129), dtype=torch.int32, device="cuda")
    with kernels.disabled():
        plain = evaluate_loss(model, data, batch_size=512, device=torch.device("cuda"))["loss"]
    eager = evaluate_loss(model, data, batch_size=512, device=torch.device("cuda"))["loss"]
    compiled = evaluate_loss(torch.compile(model, dynamic=False), data, batch_size=512,
                             device=torch.device("cuda"))["loss"]
    assert eager == pytest.approx(plain, rel=1e-3)
    assert compiled == pytest.approx(plain, rel=5e-3)


@pytest.mark.parametrize("V", [8192, 1000])
def test_linear_cross_entropy_matches_plain_loss_and_gradients(V):
    from tinylm import kernels

    torch.manual_seed(0)
    N, D = 4096, 64
    x = torch.randn(N, D, device="cuda", requires_grad=True)
    w = (0.1 * torch.randn(V, D, device="cuda")).requires_grad_(True)
    targets = torch.randint(0, V, (N,), device="cuda")
    targets[::5] = kernels.IGNORE
    ref = torch.nn.functional.cross_entropy(x @ w.t(), targets, ignore_index=kernels.IGNORE)
    ref_gx, ref_gw = torch.autograd.grad(3.0 * ref, (x, w))
    for fn in (kernels.linear_cross_entropy, torch.compile(kernels.linear_cross_entropy, fullgraph=True)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert kernels.cross_entropy_fused(x, w)
            loss = fn(x, w, targets)
            with torch.no_grad():
                loss_nograd = fn(x, w, targets)
        gx, gw = torch.autograd.grad(3.0 * loss, (x, w))
        assert loss.dtype == torch.float32 and gx.dtype == x.dtype and gw.dtype == w.dtype
        torch.testing.assert_close(loss, ref, rtol=5e-3, atol=0)
        torch.testing.assert_close(loss_nograd, loss)
        torch.testing.assert_close(gx, ref_gx, rtol=2e-2, atol=2e-2 * ref_gx.abs().max().item())
        torch.testing.assert_close(gw, ref_gw, rtol=2e-2, atol=2e-2 * ref_gw.abs().max().item())


@pytest.mark.parametrize(
    "cfg,precision", [(DENSE, "bf16"), (DENSE_FP32_RESIDUAL, "bf16"), (MOE, "bf16"), (DENSE, "fp16")],
    ids=["dense", "dense-fp32-residual", "moe", "dense-fp16"],
)
def test_graphed_training_with_kernels_matches_plain_path(cfg, precision):
    """The whole compiled step (graphed; fp16 runs with the gradient scaler, ungraphed) with the
    Triton kernels against the same step with the plain paths (for dense bf16 models that is also a
    bf16 residual stream against autocast's fp32 one)."""
    from tinylm import kernels

    fast, val, val_plain = losses(cfg, compiled=True, seq_len=64, precision=precision)
    torch._dynamo.reset()
    with kernels.disabled():
        plain, val_p, _ = losses(cfg, compiled=True, seq_len=64, precision=precision)
    torch._dynamo.reset()
    assert plain[-1] < plain[0] - 0.5
    np.testing.assert_allclose(fast, plain, rtol=2e-2, atol=2e-2)
    assert val == pytest.approx(val_p, rel=2e-2) and val == pytest.approx(val_plain, rel=5e-3)


def test_training_compiles_its_evaluation_only_when_asked(tiny_packed, tiny_tokenizer_dir, tiny_train_model,
                                                          tiny_train_config, tmp_path, monkeypatch):
    """train.compile_eval: false (the default) evaluates with the plain model replayed from a CUDA graph
    next to the compiled, graphed step; true with the compiled one. Both pick the same losses within
    bf16 tolerance."""
    import tinylm.train

    real, seen = tinylm.train.evaluate_loss, []

    def spy(model, *args, **kwargs):
        seen.append(type(model))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(tinylm.train, "evaluate_loss", spy)
    val = {}
    for compile_eval in (False, True):
        seen.clear()
        run_dir = tmp_path / f"compile_eval_{compile_eval}"
        summary = tinylm.train.train(
            model_config=tiny_train_model(), eval_batch_size=16, run_dir=run_dir,
            train_config=tiny_train_config(device="cuda", compile=True, compile_eval=compile_eval, max_steps=20),
            train_bin=tiny_packed["train"], val_bin=tiny_packed["validation"],
            tokenizer_path=tiny_tokenizer_dir / "tokenizer.json")  # fmt: skip
        # evaluations at steps 0, 10 and 20: the compiled model, or the plain one replayed from a CUDA graph
        assert seen == [torch._dynamo.eval_frame.OptimizedModule if compile_eval else GraphedLoss] * 3
        val[compile_eval] = summary["best_val_loss"]
    assert val[True] == pytest.approx(val[False], rel=5e-3)


COMPILE_ONE_STEP = """
import json, sys, torch
import torch._dynamo.utils
from tinylm.model import GPT, GPTConfig
from tinylm.step import compile_model
cfg = GPTConfig(**json.loads(sys.argv[1]))
dtype = getattr(torch, sys.argv[2]) if len(sys.argv) > 2 else torch.bfloat16
torch.manual_seed(0)
model = GPT(cfg).cuda()
fn = compile_model(model, dtype)
x = torch.randint(0, cfg.vocab_size, (8, 33), device="cuda")
with torch.autocast("cuda", dtype=dtype, cache_enabled=False):
    out = fn(x[:, :-1], x[:, 1:])
out["loss"].backward()
grad_norm = torch.stack([p.grad.float().norm() for p in model.parameters() if p.grad is not None]).norm().item()
print(json.dumps({"counters": dict(torch._dynamo.utils.counters["aot_autograd"]), "loss": out["loss"].item(),
                  "grad_norm": grad_norm}))
"""


COMPILE_LINEAR_GELU = """
import json, sys, torch
import torch._dynamo.utils
from tinylm import kernels
from tinylm.step import compile_model
dtype = getattr(torch, sys.argv[2])
class LinearGelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 256)
    def forward(self, x):
        return kernels.linear_gelu(x, self.fc.weight, self.fc.bias)
torch.manual_seed(0)
fn = compile_model(LinearGelu().cuda(), dtype)
x = torch.randn(128, 64, device="cuda", requires_grad=True)
with torch.autocast("cuda", dtype=dtype, cache_enabled=False):
    out = fn(x)
out.float().sum().backward()
print(json.dumps({"counters": dict(torch._dynamo.utils.counters["aot_autograd"]), "dtype": str(out.dtype)}))
"""


def compile_one_step_in_processes(cfg: GPTConfig | None, cache: Path, dtypes: list[str],
                                  script: str = COMPILE_ONE_STEP) -> list[dict]:
    """`script` in one process per autocast dtype, one after another on one pair of cache dirs."""
    import json
    import subprocess
    import sys

    env = child_env(TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), TRITON_CACHE_DIR=str(cache / "triton"))
    runs = []
    for dtype in dtypes:
        done = subprocess.run([sys.executable, "-c", script, json.dumps(cfg and dataclasses.asdict(cfg)), dtype],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return runs


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_a_second_process_loads_the_compiled_training_graph_from_the_cache(cfg, tmp_path):
    """The training graph holds custom autograd.Functions (the kernels, the MoE gathers); compile_model
    lets torch's AOTAutograd cache keep it, so a rerun with warm caches skips tracing it again, and
    the loaded graph gives the same loss and gradients."""
    runs = compile_one_step_in_processes(cfg, tmp_path, ["bfloat16", "bfloat16"])
    first, second = (r["counters"] for r in runs)
    assert "autograd_cache_bypass" not in first and first.get("autograd_cache_saved", 0) >= 1, first
    assert second.get("autograd_cache_hit", 0) >= 1 and "autograd_cache_miss" not in second, second
    # the loaded graph computes what the compiled one did (within rounding: the embedding's backward
    # may add in any order, and a reduction's tile may be timed afresh)
    assert runs[1]["loss"] == pytest.approx(runs[0]["loss"], rel=1e-4)
    assert runs[1]["grad_norm"] == pytest.approx(runs[0]["grad_norm"], rel=1e-4)


def test_a_graph_compiled_under_bf16_is_not_loaded_under_fp16(tmp_path):
    """torch 2.11's AOTAutograd cache key holds whether autocast is on, not its dtype: with custom
    autograd.Functions let into that cache, an fp16 process after a bf16 one could load the bf16
    graph and compute in bf16 (seen in one process on an H200: the linear + GELU kernel's fp16 test
    got the bf16 graph). compile_model keys the cache by the autocast dtype too. The compiled module
    is that kernel alone: a GPT's graph differs between the dtypes anyway, since its loss casts to
    the autocast dtype while tracing."""
    runs = compile_one_step_in_processes(None, tmp_path, ["bfloat16", "float16", "float16"], COMPILE_LINEAR_GELU)
    bf16, fp16, fp16_again = (r["counters"] for r in runs)
    assert bf16.get("autograd_cache_saved", 0) >= 1, bf16
    assert [r["dtype"] for r in runs] == ["torch.bfloat16", "torch.float16", "torch.float16"]
    assert fp16.get("autograd_cache_hit", 0) == 0 and fp16.get("autograd_cache_saved", 0) >= 1, fp16
    assert fp16_again.get("autograd_cache_hit", 0) >= 1, fp16_again  # fp16's own entry is still found


@pytest.mark.parametrize("cfg", [DENSE, MOE, MOE_DROPPING], ids=["dense", "moe", "moe-dropping"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_graphed_evaluation_matches_the_plain_model_and_follows_its_weights(cfg, precision):
    """GraphedLoss (the training loop's and the evaluate job's evaluation on CUDA) replays the plain
    model's kernels: the same loss as the plain model, the padded last batch included; after the
    weights change in place (as the optimizer changes them) it gives the new weights' loss, with the
    memory freed since its recording poisoned; a batch of another shape records a graph of its own."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    rows = torch.randint(0, cfg.vocab_size, (150, 33), device=device, dtype=torch.int32)  # 64 + 64 + 22 padded
    graphed = GraphedLoss(model)

    def both(batch):
        want = evaluate_loss(model, rows, batch_size=batch, device=device, precision=precision)["loss"]
        got = evaluate_loss(graphed, rows, batch_size=batch, device=device, precision=precision)["loss"]
        return got, want

    got, want = both(64)
    assert graphed.graph is not None and graphed.key[0] == (64, 32)
    assert got == pytest.approx(want, rel=1e-6)
    first_graph = graphed.graph
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    poison_free_memory()
    got2, want2 = both(64)
    assert graphed.graph is first_graph  # replayed, not recorded again
    assert abs(want2 - want) > 1e-3  # the weights moved the loss
    assert got2 == pytest.approx(want2, rel=1e-6)
    got3, want3 = both(48)  # another batch shape: recorded anew
    assert graphed.graph is not first_graph and graphed.key[0] == (48, 32)
    assert got3 == pytest.approx(want3, rel=1e-6)
    from tinylm import kernels

    with kernels.disabled():  # the plain ops instead of tinylm's kernels: recorded anew
        got4, want4 = both(48)
        assert graphed.key[-1] is False
    assert got4 == pytest.approx(want4, rel=1e-6)
    assert model.training  # evaluate_loss hands the model back in the mode it found it in


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_graphed_evaluation_on_a_gpu_that_is_not_the_current_one():
    """`tinylm evaluate --device cuda:1` evaluates on a GPU that is not the current one; the graph
    must be recorded on that GPU's streams, or it records nothing and every replay returns the
    recording batch's loss."""
    device = torch.device("cuda:1")
    assert torch.cuda.current_device() == 0
    torch.manual_seed(0)
    model = GPT(DENSE).to(device)
    rows = torch.randint(0, DENSE.vocab_size, (150, 33), device=device, dtype=torch.int32)
    want = evaluate_loss(model, rows, batch_size=64, device=device)["loss"]
    got = evaluate_loss(GraphedLoss(model), rows, batch_size=64, device=device)["loss"]
    assert got == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("precision, dropout", [("bf16", 0.0), ("fp16", 0.0), ("bf16", 0.1)],
                         ids=["bf16-graphed", "fp16-scaler", "bf16-dropout"])
def test_a_resumed_run_on_cuda_follows_the_uninterrupted_one(precision, dropout, tiny_packed, tiny_tokenizer_dir,
                                                             tiny_train_model, tiny_train_config, tmp_path,
                                                             monkeypatch):
    """As test_train's resume test on the CPU, through the CUDA path: a graphed step warmed up again after
    the resume; fp16's gradient scaler, whose scale a fresh one would have to find again by skipping
    steps; dropout, whose masks come from the CUDA generator's state in last.pt. Losses within 1e-3: a
    skipped step or other masks move them by more."""
    import json
    import os
    import signal

    import tinylm.step
    import tinylm.train
    from tinylm.runlog import EXIT_PREEMPTED

    def run(name: str, stop_during: int | None = None) -> list[dict]:
        real = tinylm.step.lr_at

        def lr_and_signal(step, cfg):
            if step == stop_during:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(step, cfg)

        with monkeypatch.context() as m:
            m.setattr(tinylm.step, "lr_at", lr_and_signal)
            tinylm.train.train(
                model_config=tiny_train_model(dropout=dropout), eval_batch_size=16, run_dir=tmp_path / name,
                train_config=tiny_train_config(device="cuda", compile=True, precision=precision, max_steps=30,
                                               log_every=1, eval_every=10, save_every=10),
                train_bin=tiny_packed["train"], val_bin=tiny_packed["validation"],
                tokenizer_path=tiny_tokenizer_dir / "tokenizer.json")  # fmt: skip
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]

    whole = run("whole")
    with pytest.raises(SystemExit) as stopped:
        run("resumed", stop_during=13)
    assert stopped.value.code == EXIT_PREEMPTED
    resumed = run("resumed")
    assert [s for s, _ in resumed] == [s for s, _ in whole] == list(range(1, 31))
    assert [v for _, v in resumed] == pytest.approx([v for _, v in whole], rel=1e-3)


@pytest.mark.parametrize("ffn, precision", [("dense", "fp32"), ("moe", "bf16")], ids=["dense-fp32", "moe-bf16"])
def test_the_evaluate_job_gives_the_loss_that_picked_the_best_weights(ffn, precision, tiny_packed,
                                                                       tiny_tokenizer_dir, tiny_train_model,
                                                                       tiny_train_config, tmp_path):
    """The evaluate job runs in a process of its own, as the workflow runs it. On the whole validation
    split at the training's evaluation batch, it must give the loss that the training's evaluation gave
    the weights it kept: the same arithmetic, including the products torch runs in fp32 (all of an
    fp32 run's, an MoE router's under bf16), which training lets use TF32."""
    import json
    import subprocess
    import sys

    import tinylm
    import tinylm.train

    extra = {"ffn": "moe", "n_experts": 4, "top_k": 2, "d_ff_expert": 32} if ffn == "moe" else {}
    run_dir = tmp_path / "run"
    summary = tinylm.train.train(
        model_config=tiny_train_model(**extra), eval_batch_size=16, run_dir=run_dir,
        train_config=tiny_train_config(device="cuda", compile=False, precision=precision, max_steps=20,
                                       eval_rows=None),
        train_bin=tiny_packed["train"], val_bin=tiny_packed["validation"],
        tokenizer_path=tiny_tokenizer_dir / "tokenizer.json")  # fmt: skip
    out = tmp_path / "metrics.json"
    params = {"batch_size": 16, "device": "cuda", "precision": precision, "cuda_graph": False, "max_new_tokens": 4}
    script = Path(tinylm.__file__).parents[2] / "workflow_scripts" / "evaluate_model.py"
    done = subprocess.run(
        [sys.executable, str(script), "--name", "run", "--checkpoint", str(run_dir / "checkpoints" / "best_model.pt"),
         "--tokenizer", str(tiny_tokenizer_dir / "tokenizer.json"), "--val-bin", str(tiny_packed["validation"]),
         "--test-bin", str(tiny_packed["test"]), "--out", str(out), "--params", json.dumps(params)],
        env=child_env(), capture_output=True, text=True,
        timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(out.read_text())["val_loss"] == pytest.approx(summary["best_val_loss"], rel=1e-6)
