"""A branch's output projection, the residual add and the LayerNorm after it, fused.

One kernel writes the new residual stream (in the stream's dtype: fp32 under autocast, bf16 on a
GPT's bf16 stream, `GPT._bf16_residual`) and its normalized copy in the autocast dtype; the backward
kernel writes the stream's gradient and, for an fp32 stream, its bf16/fp16 copy for the projection's
backward, and sums the norm's weight and bias gradients and the projection's bias gradient over its
rows, where the compiled plain layers run the LayerNorm backward, a cast and three reductions.

Eligible (`residual_norm_fused`): kernels on, CUDA under bf16/fp16 autocast, d_model <= MAX_NORM_D,
fewer than 2**31 elements. Otherwise the plain linear, add and layer_norm run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import autocast_low, tl, triton

MAX_NORM_D = 4096  # one row of the residual stream per program row


def residual_norm_fused(x: torch.Tensor) -> bool:
    """Whether `residual_layer_norm` runs the Triton kernels: CUDA under bf16/fp16 autocast."""
    return autocast_low(x) and x.shape[-1] <= MAX_NORM_D and x.numel() < 2**31


def residual_layer_norm(x: torch.Tensor, h: torch.Tensor, proj_w: torch.Tensor, proj_b: torch.Tensor,
                        norm_w: torch.Tensor, norm_b: torch.Tensor, eps: float, keep_residual: bool = True):
    """A branch's output projection, the residual add and the LayerNorm after it: x + r and
    layer_norm(x + r) for r = h @ proj_w.T + proj_b. Returns (x + r, normalized), or only the normalized
    tensor when keep_residual is False (the last norm of the trunk).

    Fused path (`_add_norm_fwd`, `_add_norm_bwd`): the projection's matmul without its bias, then one
    kernel each way. The forward adds the bias and the residual and writes the new residual stream and
    its normalized copy in the autocast dtype (what the next matmul reads); the sum is computed in fp32
    and stored in the stream's dtype (x's and r's promoted). The backward writes the residual stream's
    gradient in that dtype and, when it is not r's, from the same registers its copy in r's dtype (the
    projection's backward reads that), and per-block column sums for the norm's weight and bias and for
    the projection's bias. The plain path runs the LayerNorm backward, a cast and three reductions over
    the same rows.
    """
    if residual_norm_fused(x):
        # The bias is added in the kernel: cuBLAS's bias epilogue costs more (docs/performance.md).
        r = _linear_tall_grad(h, proj_w) if proj_w.shape[1] > proj_w.shape[0] else F.linear(h, proj_w)
        with torch.autocast("cuda", enabled=False):
            xs, y, _, _ = _add_norm_fwd(x, r, proj_b, norm_w, norm_b, eps, r.dtype, keep_residual)
        return (xs, y) if keep_residual else y
    x = x + F.linear(h, proj_w, proj_b)
    y = F.layer_norm(x, (x.shape[-1],), norm_w, norm_b, eps)
    return (x, y) if keep_residual else y


def _linear_tall_grad(x: torch.Tensor, weight_OK: torch.Tensor) -> torch.Tensor:
    """x @ weight.T under CUDA autocast, without a bias, for a weight wider than tall (K > O): its
    gradient is computed as the tall (K, O) product x^T @ dy and handed out transposed."""
    low = torch.get_autocast_dtype("cuda")
    return _LinearTallGrad.apply(x.to(low), weight_OK.to(low))


class _LinearTallGrad(torch.autograd.Function):
    """F.linear(x, w) without a bias; the weight gradient is (x^T @ dy)^T. For the MLP's (256 x 1024)
    output projection cuBLAS computes the tall x^T @ dy faster than dy^T @ x (docs/performance.md)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx = dy @ w if ctx.needs_input_grad[0] else None
        dw = (x.reshape(-1, x.shape[-1]).t() @ dy.reshape(-1, dy.shape[-1])).t() if ctx.needs_input_grad[1] else None
        return dx, dw


if triton is not None:

    @triton.jit
    def _row_block(row0, cols, in_D, N, D: tl.constexpr, BLOCK_N: tl.constexpr):
        """Rows [row0, row0 + BLOCK_N) of an (N, D) tensor at columns `cols`: the rows, offsets, mask."""
        rows = row0 + tl.arange(0, BLOCK_N)
        off = rows[:, None].to(tl.int64) * D + cols[None, :]
        return rows, off, (rows[:, None] < N) & in_D[None, :]

    @triton.jit
    def _add_norm_fwd_kernel(X, R, RB, W, B, Xs, Y, Mean, Rstd, N, D: tl.constexpr, EPS: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rows [r0, r0 + BLOCK_N): s = x + (r + rb) in fp32 (rounded to Xs's dtype, as the plain add's
        result is), y = (s - mean) * rstd * w + b in fp32, rounded to Y's dtype; mean and rstd kept for
        the backward. rb is the branch projection's bias, which the matmul leaves out."""
        cols = tl.arange(0, BLOCK_D)
        in_D = cols < D
        rows, off, m = _row_block(tl.program_id(0) * BLOCK_N, cols, in_D, N, D, BLOCK_N)
        rb = tl.load(RB + cols, mask=in_D, other=0.0).to(tl.float32)
        s = tl.load(X + off, mask=m, other=0.0).to(tl.float32) + (
            tl.load(R + off, mask=m, other=0.0).to(tl.float32) + rb[None, :])
        s = s.to(Xs.dtype.element_ty)
        tl.store(Xs + off, s, mask=m)
        s = s.to(tl.float32)
        mean = tl.sum(s, 1) / D
        d = tl.where(m, s - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / D + EPS)
        w = tl.load(W + cols, mask=in_D, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=in_D, other=0.0).to(tl.float32)
        y = d * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(Y + off, y.to(Y.dtype.element_ty), mask=m)
        tl.store(Mean + rows, mean, mask=rows < N)
        tl.store(Rstd + rows, rstd, mask=rows < N)

    @triton.jit
    def _add_norm_bwd_kernel(GX, GY, Xs, W, Mean, Rstd, G, GLow, Part, N, D: tl.constexpr,
                             HAS_GX: tl.constexpr, WRITE_LOW: tl.constexpr, ROWS: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr):
        """Rows [r0, r0 + ROWS), BLOCK_N at a time: g = gx + layer_norm's input gradient (computed in
        fp32, stored in G's dtype), its copy in GLow's dtype (WRITE_LOW; not when G is already in it),
        and the column sums over these rows of gy * xhat, gy and g (the norm's weight and bias gradients
        and the residual branch's bias gradient) into this program's line of Part, side by side (3 * D
        columns)."""
        cols = tl.arange(0, BLOCK_D)
        in_D = cols < D
        w = tl.load(W + cols, mask=in_D, other=0.0).to(tl.float32)[None, :]
        sum_w = tl.zeros((BLOCK_D,), dtype=tl.float32)
        sum_b = tl.zeros((BLOCK_D,), dtype=tl.float32)
        sum_g = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for i in tl.range(0, ROWS, BLOCK_N, num_stages=STAGES):
            rows, off, m = _row_block(tl.program_id(0) * ROWS + i, cols, in_D, N, D, BLOCK_N)
            mean = tl.load(Mean + rows, mask=rows < N, other=0.0)
            rstd = tl.load(Rstd + rows, mask=rows < N, other=0.0)
            xs = tl.load(Xs + off, mask=m, other=0.0).to(tl.float32)
            xhat = tl.where(m, (xs - mean[:, None]) * rstd[:, None], 0.0)
            gy = tl.load(GY + off, mask=m, other=0.0).to(tl.float32)
            gyw = gy * w
            c1 = tl.sum(xhat * gyw, 1) / D
            c2 = tl.sum(gyw, 1) / D
            g = (gyw - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            if HAS_GX:
                g = g + tl.load(GX + off, mask=m, other=0.0).to(tl.float32)
            g = tl.where(m, g, 0.0)
            tl.store(G + off, g.to(G.dtype.element_ty), mask=m)
            if WRITE_LOW:
                tl.store(GLow + off, g.to(GLow.dtype.element_ty), mask=m)
            sum_w += tl.sum(gy * xhat, 0)
            sum_b += tl.sum(gy, 0)
            sum_g += tl.sum(g, 0)
        line = tl.program_id(0) * (3 * D) + cols
        tl.store(Part + line, sum_w, mask=in_D)
        tl.store(Part + line + D, sum_b, mask=in_D)
        tl.store(Part + line + 2 * D, sum_g, mask=in_D)

    # Forward (rows per program, warps); backward (most rows per program, rows per step, warps, pipeline
    # stages of the row loop): the fastest of dev/norm-sweep.py at 65,536 x 256 (figures:
    # docs/performance.md, "Triton kernels").
    _NORM_FWD_TILES = (8, 2)
    _NORM_BWD_TILES = (128, 8, 2, 2)

    def _norm_bwd_rows(n_rows: int) -> int:
        """Rows per backward program: the most (up to _NORM_BWD_TILES[0]) that still leaves 256 programs;
        at batch 64, 128 rows a program left too few programs (docs/performance.md)."""
        rows = _NORM_BWD_TILES[0]
        while rows > _NORM_BWD_TILES[1] and n_rows < 256 * rows:
            rows //= 2
        return rows

    @torch.library.triton_op("tinylm::add_norm_fwd", mutates_args={})
    def _add_norm_fwd(
        x: torch.Tensor, r: torch.Tensor, r_bias: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float,
        out_dtype: torch.dtype, keep_residual: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x + r + r_bias, its LayerNorm in out_dtype, mean, rstd): r is the branch's projection without
        its bias r_bias."""
        x, r = x.contiguous(), r.contiguous()
        D = x.shape[-1]
        N = x.numel() // D
        xs = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(x.dtype, r.dtype))
        y = torch.empty(x.shape, device=x.device, dtype=out_dtype)
        mean = torch.empty(N, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        bn, nw = _NORM_FWD_TILES
        torch.library.wrap_triton(_add_norm_fwd_kernel)[(triton.cdiv(N, bn),)](
            x, r, r_bias, w, b, xs, y, mean, rstd, N, D=D, EPS=eps, BLOCK_N=bn, BLOCK_D=triton.next_power_of_2(D),
            num_warps=nw)
        return xs, y, mean, rstd

    @torch.library.triton_op("tinylm::add_norm_bwd", mutates_args={})
    def _add_norm_bwd(
        gx: torch.Tensor | None, gy: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, mean: torch.Tensor,
        rstd: torch.Tensor, low_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(residual gradient g in the stream's dtype, g in low_dtype (empty when the stream is in
        low_dtype: g is that copy), the weight, bias and branch-bias gradients side by side (fp32, 3 * D))
        of `_add_norm_fwd`, given the gradients of its two outputs (gx None: unused)."""
        gy = gy.contiguous()
        gx = None if gx is None else gx.contiguous()
        D = xs.shape[-1]
        N = xs.numel() // D
        _, bn, nw, stages = _NORM_BWD_TILES
        rows = _norm_bwd_rows(N)
        n_progs = triton.cdiv(N, rows)
        g = torch.empty(xs.shape, device=xs.device, dtype=xs.dtype)  # the stream's gradient in its dtype
        write_low = xs.dtype != low_dtype
        g_low = torch.empty(xs.shape if write_low else 0, device=xs.device, dtype=low_dtype)
        # one whole tensor, one reduction for the three sums (three reductions were slower).
        # The kernel must not write into views: the compiled graph copies those in and out.
        part = torch.empty((n_progs, 3 * D), device=xs.device, dtype=torch.float32)
        torch.library.wrap_triton(_add_norm_bwd_kernel)[(n_progs,)](
            gy if gx is None else gx, gy, xs, w, mean, rstd, g, g_low if write_low else g, part, N, D=D,
            HAS_GX=gx is not None, WRITE_LOW=write_low, ROWS=rows, BLOCK_N=bn,
            BLOCK_D=triton.next_power_of_2(D), STAGES=stages, num_warps=nw)
        return g, g_low, part.sum(0)

    def _add_norm_setup_context(ctx, inputs, output):
        x, r, r_bias, w, b, eps, out_dtype, keep_residual = inputs
        xs, _, mean, rstd = output
        ctx.save_for_backward(xs, w, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd, *(() if keep_residual else (xs,)))
        ctx.keep_residual = keep_residual
        ctx.dtypes = (x.dtype, r.dtype, r_bias.dtype, w.dtype, b.dtype)

    def _add_norm_backward(ctx, gx, gy, dmean, drstd):
        xs, w, mean, rstd = ctx.saved_tensors
        x_dt, r_dt, rb_dt, w_dt, b_dt = ctx.dtypes
        g, g_r, sums = _add_norm_bwd(gx if ctx.keep_residual else None, gy, xs, w, mean, rstd, r_dt)
        if xs.dtype == r_dt:  # a stream in r's dtype (bf16): g is r's gradient too
            g_r = g
        dw, db, dr_bias = sums.view(3, -1).unbind(0)
        return g.to(x_dt), g_r, dr_bias.to(rb_dt), dw.to(w_dt), db.to(b_dt), None, None, None

    _add_norm_fwd.register_autograd(_add_norm_backward, setup_context=_add_norm_setup_context)
