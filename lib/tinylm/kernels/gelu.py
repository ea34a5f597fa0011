"""The feed-forward's first layer and its GELU, with the bias gradient taken in the GELU backward.

The forward is the plain matmul and GELU; the backward is one kernel that writes the
pre-activation gradient and, from the same registers, per-block column sums for the bias gradient.
The plain path reads that (B*T, d_ff) gradient a second time for the bias sum.

Eligible (`gelu_fused`): kernels on, CUDA under bf16/fp16 autocast, fewer than 2**31 elements.
Otherwise gelu(linear(x)) runs as plain PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import autocast_low, tl, triton


def gelu_fused(x: torch.Tensor) -> bool:
    """Whether `linear_gelu` runs the GELU + bias-gradient backward kernel: CUDA under bf16/fp16 autocast."""
    return autocast_low(x) and x.numel() < 2**31


def linear_gelu(x: torch.Tensor, weight_FD: torch.Tensor, bias_F: torch.Tensor) -> torch.Tensor:
    """gelu(x @ weight.T + bias), exact (erf) GELU.

    Fused path: the same matmul (bias included, in the autocast dtype) with the bias detached, then
    `_GeluBiasGrad`, through which the bias gets its gradient instead.
    """
    if gelu_fused(x):
        return _GeluBiasGrad.apply(F.linear(x, weight_FD, bias_F.detach()), bias_F)
    return F.gelu(F.linear(x, weight_FD, bias_F))


class _GeluBiasGrad(torch.autograd.Function):
    """gelu(h) for h = x @ w.T + bias computed with the bias detached. Forward: plain torch (compiled,
    one pass). Backward: `_gelu_bwd`, one pass writing dh = da * gelu'(h) and the bias gradient
    (column sums of dh) that autograd would otherwise compute by reading dh again."""

    @staticmethod
    def forward(ctx, h_NF, bias_F):
        ctx.save_for_backward(h_NF)
        ctx.bias_dtype = bias_F.dtype
        return F.gelu(h_NF)

    @staticmethod
    def backward(ctx, da_NF):
        (h_NF,) = ctx.saved_tensors
        dh_NF, dbias_F = _gelu_bwd(da_NF, h_NF)
        return dh_NF, dbias_F.to(ctx.bias_dtype)


if triton is not None:

    @triton.jit
    def _gelu_bwd_kernel(DA, Hpre, DH, Partial, N, F: tl.constexpr, ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_C: tl.constexpr, STAGES: tl.constexpr):
        """Rows [r0, r0 + ROWS), BLOCK_R at a time, x columns [c0, c0 + BLOCK_C): dh = da * gelu'(h) and
        the column sums of dh over these rows (fp32, before rounding) into this program's line of Partial."""
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for i in tl.range(0, ROWS, BLOCK_R, num_stages=STAGES):
            rows = tl.program_id(1) * ROWS + i + tl.arange(0, BLOCK_R)
            m = (rows[:, None] < N) & (cols[None, :] < F)
            off = rows[:, None].to(tl.int64) * F + cols[None, :]
            x = tl.load(Hpre + off, mask=m, other=0.0).to(tl.float32)
            g = tl.load(DA + off, mask=m, other=0.0).to(tl.float32)
            # d/dx x * Phi(x) = Phi(x) + x * phi(x)
            cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
            pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
            dh = g * (cdf + x * pdf)
            tl.store(DH + off, dh.to(DH.dtype.element_ty), mask=m)
            acc += tl.sum(dh, 0)
        tl.store(Partial + tl.program_id(1) * F + cols, acc, mask=cols < F)

    # (rows per program, rows per step, columns, warps, pipeline stages): the fastest of
    # dev/gelu-bwd-sweep.py at 65,536 x 1,024 bf16 (figures: docs/performance.md, "Triton kernels").
    _GELU_TILES = (128, 64, 64, 4, 2)

    @torch.library.triton_op("tinylm::gelu_bwd", mutates_args={})
    def _gelu_bwd(da: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dh, column sums of dh in fp32) for gelu(h) given its gradient da; h and da are (..., F)."""
        da, h = da.contiguous(), h.contiguous()
        Fdim = h.shape[-1]
        N = h.numel() // Fdim
        rows, block_r, block_c, warps, stages = _GELU_TILES
        n_rows = triton.cdiv(N, rows)
        dh = torch.empty_like(h)
        partial = torch.empty((n_rows, Fdim), device=h.device, dtype=torch.float32)
        torch.library.wrap_triton(_gelu_bwd_kernel)[(triton.cdiv(Fdim, block_c), n_rows)](
            da, h, dh, partial, N, F=Fdim, ROWS=rows, BLOCK_R=block_r, BLOCK_C=block_c, STAGES=stages,
            num_warps=warps)
        return dh, partial.sum(0)
