"""Causal attention read straight from the fused q, k, v projection, and its plain reference.

At tinylm's sizes (seq_len <= 128, head size 64) a whole head's queries, keys and values fit in one
thread block, so one program per (row, head) computes the masked softmax and the output in
registers, reading q, k, v from the fused qkv projection's output and writing the output in the
(B, T, D) layout the output projection reads. The backward program, taking the queries in two
halves, recomputes the probabilities from the saved log-sum-exp and writes dq, dk, dv into the qkv
layout: no head transposes or concatenation either way. The math is flash attention's (scores and
softmax in fp32, both products with bf16/fp16 inputs and fp32 accumulation). The backward also sums
dq, dk, dv over positions: the projection bias's gradient, without reading dqkv again.

Eligible (`attention_fused`): kernels on, CUDA, bf16/fp16, T <= MAX_T, a head size in HEAD_SIZES.
Otherwise `reference_attention` (scaled_dot_product_attention) runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import LOW, enabled, tl, triton

MAX_T = 128
HEAD_SIZES = (16, 32, 64, 128)


def attention_fused(qkv_BT3D: torch.Tensor, n_heads: int) -> bool:
    """Whether `causal_attention` runs the Triton kernels for this input."""
    return _attention_ok(qkv_BT3D.is_cuda, qkv_BT3D.dtype, qkv_BT3D.shape, n_heads)


def _attention_ok(is_cuda: bool, dtype: torch.dtype, shape_BT3D, n_heads: int) -> bool:
    if not enabled() or triton is None or not is_cuda or dtype not in LOW:
        return False
    B, T, D3 = shape_BT3D
    return T <= MAX_T and (D3 // 3) // n_heads in HEAD_SIZES and B * T * D3 < 2**31


def causal_attention(qkv_BT3D: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Causal attention of the fused projection output [q | k | v] (B, T, 3D); returns (B, T, D)."""
    if attention_fused(qkv_BT3D, n_heads):
        return _attn_fwd(qkv_BT3D, None, n_heads)[0]
    return reference_attention(qkv_BT3D, n_heads)


def linear_causal_attention(x_BTD: torch.Tensor, weight_3DD: torch.Tensor, bias_3D: torch.Tensor,
                            n_heads: int) -> torch.Tensor:
    """causal_attention(x @ weight.T + bias): the attention of a layer's fused q, k, v projection.

    Fused path: the same matmul (bias included) with the bias detached; the bias gets its gradient from
    the attention backward kernel, which sums dq, dk, dv over each (row, head)'s positions while they
    are in registers. The plain path reads the whole (B, T, 3D) gradient a second time for that sum.
    """
    B, T, _ = x_BTD.shape
    low = torch.get_autocast_dtype("cuda") if x_BTD.is_cuda and torch.is_autocast_enabled("cuda") else x_BTD.dtype
    if _attention_ok(x_BTD.is_cuda, low, (B, T, weight_3DD.shape[0]), n_heads):
        return _attn_fwd(F.linear(x_BTD, weight_3DD, bias_3D.detach()), bias_3D, n_heads)[0]
    return reference_attention(F.linear(x_BTD, weight_3DD, bias_3D), n_heads)


def split_heads(qkv_BT3D: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of the fused projection output (B, T, 3D), each as (B, H, T, Dh) views."""
    B, T, D3 = qkv_BT3D.shape
    D = D3 // 3
    return tuple(t.view(B, T, n_heads, D // n_heads).transpose(1, 2) for t in qkv_BT3D.split(D, dim=2))


def reference_attention(qkv_BT3D: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The same through scaled_dot_product_attention."""
    B, T, D3 = qkv_BT3D.shape
    y = F.scaled_dot_product_attention(*split_heads(qkv_BT3D, n_heads), is_causal=True)
    return y.transpose(1, 2).reshape(B, T, D3 // 3)


if triton is not None:

    @triton.jit
    def _head_offsets(T: tl.constexpr, H: tl.constexpr, DH: tl.constexpr, BLOCK_T: tl.constexpr):
        """This program's (row, head): the offsets of its q tile in the (B, T, 3D) projection output (k
        and v follow at + D, + 2D), the matching offsets in a (B, T, D) tensor, the positions, their mask.

        Offsets only, no pointers: inductor decides which tensors a kernel writes by tracing each store's
        address back to the kernel's arguments, and it counts every argument of a helper call that an
        address came from. Had this helper taken the qkv pointer (it once loaded the tiles), the
        backward's stores into dqkv would have marked qkv as written, and the compiled graph copied the
        whole qkv tensor before every backward launch (docs/performance.md, "Triton kernels").
        """
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        D: tl.constexpr = H * DH
        t = tl.arange(0, BLOCK_T)
        d = tl.arange(0, DH)
        in_T = t[:, None] < T
        qkv_off = b * (T * 3 * D) + t[:, None] * (3 * D) + h * DH + d[None, :]
        out_off = b * (T * D) + t[:, None] * D + h * DH + d[None, :]
        return qkv_off, out_off, t, in_T

    @triton.jit
    def _qkv_tiles(QKV, qkv_off, in_T, D: tl.constexpr):
        """The q, k, v tiles at `qkv_off` (loads only: no store address may come from this call)."""
        q = tl.load(QKV + qkv_off, mask=in_T, other=0.0)
        k = tl.load(QKV + qkv_off + D, mask=in_T, other=0.0)
        v = tl.load(QKV + qkv_off + 2 * D, mask=in_T, other=0.0)
        return q, k, v

    @triton.jit
    def _attn_fwd_kernel(QKV, Out, LSE, QK_SCALE: tl.constexpr, T: tl.constexpr, H: tl.constexpr,
                         DH: tl.constexpr, BLOCK_T: tl.constexpr):
        """One (row, head): O = softmax(causal(Q K^T) * scale) V and the base-2 log-sum-exp per query."""
        D: tl.constexpr = H * DH
        qkv_off, out_off, t, in_T = _head_offsets(T, H, DH, BLOCK_T)
        q, k, v = _qkv_tiles(QKV, qkv_off, in_T, D)
        # QK_SCALE = log2(e) / sqrt(DH): the softmax runs in base 2. The scales are compile-time
        # constants: passed as Python floats, inductor would type them fp64 and the softmax math with them.
        s = tl.dot(q, tl.trans(k)) * QK_SCALE
        s = tl.where(t[:, None] >= t[None, :], s, float("-inf"))
        m = tl.max(s, 1)
        p = tl.exp2(s - m[:, None])
        ell = tl.sum(p, 1)
        o = tl.dot(p.to(v.dtype), v) / ell[:, None]
        tl.store(Out + out_off, o.to(Out.dtype.element_ty), mask=in_T)
        tl.store(LSE + tl.program_id(0) * BLOCK_T + t, m + tl.log2(ell))

    @triton.jit
    def _attn_bwd_kernel(QKV, DO, LSE, DQKV, DBias, QK_SCALE: tl.constexpr, SM_SCALE: tl.constexpr,
                         T: tl.constexpr, H: tl.constexpr, DH: tl.constexpr, BLOCK_T: tl.constexpr):
        """One (row, head): dq, dk, dv from the recomputed probabilities (flash attention's backward),
        and their sums over the row's positions (fp32, before rounding) into the row's line of DBias.

        The queries go in two halves of HALF rows: the first sees key block 0 only (the masked
        upper-right quarter is skipped), the second key blocks 0 and 1; dk and dv of key block 0 add up
        over both. With tiles half as tall the program runs at 4 warps, so two programs share an SM and
        one's loads overlap the other's arithmetic (some registers spill to local memory). delta =
        rowsum(dO * O) is taken as rowsum(P * dP), the same sum, so O is neither read nor kept for the
        backward. Faster than one 128-row tile at 8 warps for heads of 64, slower for condor's heads of
        128 (docs/performance.md, "Triton kernels").
        """
        HALF: tl.constexpr = BLOCK_T // 2
        D: tl.constexpr = H * DH
        qkv0, out0, t, in0 = _head_offsets(T, H, DH, HALF)
        qkv1, out1, in1 = qkv0 + HALF * (3 * D), out0 + HALF * D, (t + HALF)[:, None] < T
        lse_row = LSE + tl.program_id(0) * BLOCK_T
        bias_off = (tl.program_id(0) // H) * (3 * D) + (tl.program_id(0) % H) * DH + tl.arange(0, DH)
        causal = t[:, None] >= t[None, :]
        # queries of the first half: keys of the first half
        q0, k0, v0 = _qkv_tiles(QKV, qkv0, in0, D)
        do0 = tl.load(DO + out0, mask=in0, other=0.0)
        p00 = tl.where(causal, tl.exp2(tl.dot(q0, tl.trans(k0)) * QK_SCALE - tl.load(lse_row + t)[:, None]), 0.0)
        dp00 = tl.dot(do0, tl.trans(v0))
        ds00 = (p00 * (dp00 - tl.sum(p00 * dp00, 1)[:, None])).to(q0.dtype)
        dv0 = tl.dot(tl.trans(p00.to(do0.dtype)), do0)
        dk0 = tl.dot(tl.trans(ds00), q0)
        dq0 = tl.dot(ds00, k0) * SM_SCALE
        tl.store(DQKV + qkv0, dq0.to(DQKV.dtype.element_ty), mask=in0)
        sum_q = tl.sum(dq0, 0)
        # queries of the second half: all keys of the first half, causal over the second
        q1, k1, v1 = _qkv_tiles(QKV, qkv1, in1, D)
        do1 = tl.load(DO + out1, mask=in1, other=0.0)
        lse1 = tl.load(lse_row + HALF + t)
        p10 = tl.exp2(tl.dot(q1, tl.trans(k0)) * QK_SCALE - lse1[:, None])
        p11 = tl.where(causal, tl.exp2(tl.dot(q1, tl.trans(k1)) * QK_SCALE - lse1[:, None]), 0.0)
        dp10 = tl.dot(do1, tl.trans(v0))
        dp11 = tl.dot(do1, tl.trans(v1))
        delta1 = tl.sum(p10 * dp10, 1) + tl.sum(p11 * dp11, 1)
        ds10 = (p10 * (dp10 - delta1[:, None])).to(q1.dtype)
        ds11 = (p11 * (dp11 - delta1[:, None])).to(q1.dtype)
        dv0 += tl.dot(tl.trans(p10.to(do1.dtype)), do1)
        dv1 = tl.dot(tl.trans(p11.to(do1.dtype)), do1)
        dk0 = (dk0 + tl.dot(tl.trans(ds10), q1)) * SM_SCALE
        dk1 = tl.dot(tl.trans(ds11), q1) * SM_SCALE
        dq1 = (tl.dot(ds10, k0) + tl.dot(ds11, k1)) * SM_SCALE
        tl.store(DQKV + qkv1, dq1.to(DQKV.dtype.element_ty), mask=in1)
        tl.store(DBias + bias_off, sum_q + tl.sum(dq1, 0))  # rows past T hold zeros
        tl.store(DQKV + qkv0 + D, dk0.to(DQKV.dtype.element_ty), mask=in0)
        tl.store(DQKV + qkv1 + D, dk1.to(DQKV.dtype.element_ty), mask=in1)
        tl.store(DBias + bias_off + D, tl.sum(dk0, 0) + tl.sum(dk1, 0))
        tl.store(DQKV + qkv0 + 2 * D, dv0.to(DQKV.dtype.element_ty), mask=in0)
        tl.store(DQKV + qkv1 + 2 * D, dv1.to(DQKV.dtype.element_ty), mask=in1)
        tl.store(DBias + bias_off + 2 * D, tl.sum(dv0, 0) + tl.sum(dv1, 0))

    def _block_t(T: int) -> int:
        return max(32, triton.next_power_of_2(T))  # the backward's halves are >= 16 rows (tl.dot's minimum)

    def _num_warps(block_t: int) -> int:
        return 8 if block_t >= 128 else 4

    def _bwd_warps(head_size: int) -> int:
        return 4 if head_size <= 64 else 8

    @torch.library.triton_op("tinylm::causal_attn_fwd", mutates_args={})
    def _attn_fwd(qkv: torch.Tensor, bias: torch.Tensor | None, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, log-sum-exp). `bias`, if given, is the projection's bias that qkv already holds
        (added with the bias detached): it is not read here, and gets its gradient in the backward."""
        qkv = qkv.contiguous()
        B, T, D3 = qkv.shape
        D = D3 // 3
        Dh = D // n_heads
        bt = _block_t(T)
        o = qkv.new_empty((B, T, D))
        lse = torch.empty((B, n_heads, bt), device=qkv.device, dtype=torch.float32)
        torch.library.wrap_triton(_attn_fwd_kernel)[(B * n_heads,)](
            qkv, o, lse, QK_SCALE=math.log2(math.e) / math.sqrt(Dh), T=T, H=n_heads, DH=Dh, BLOCK_T=bt,
            num_warps=_num_warps(bt))
        return o, lse

    @torch.library.triton_op("tinylm::causal_attn_bwd", mutates_args={})
    def _attn_bwd(
        do: torch.Tensor, qkv: torch.Tensor, lse: torch.Tensor, n_heads: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(dqkv, its sum over rows and positions in fp32: the gradient of a bias added to qkv)."""
        qkv, do = qkv.contiguous(), do.contiguous()
        B, T, D3 = qkv.shape
        D = D3 // 3
        Dh = D // n_heads
        bt = _block_t(T)
        dqkv = torch.empty_like(qkv)
        partial = torch.empty((B, D3), device=qkv.device, dtype=torch.float32)
        torch.library.wrap_triton(_attn_bwd_kernel)[(B * n_heads,)](
            qkv, do, lse, dqkv, partial, QK_SCALE=math.log2(math.e) / math.sqrt(Dh), SM_SCALE=1.0 / math.sqrt(Dh),
            T=T, H=n_heads, DH=Dh, BLOCK_T=bt, num_warps=_bwd_warps(Dh))
        return dqkv, partial.sum(0)

    def _attn_setup_context(ctx, inputs, output):
        qkv, bias, n_heads = inputs
        _, lse = output
        ctx.save_for_backward(qkv, lse)
        ctx.n_heads = n_heads
        ctx.bias_dtype = None if bias is None else bias.dtype

    def _attn_backward(ctx, do, dlse):
        qkv, lse = ctx.saved_tensors
        dqkv, dbias = _attn_bwd(do, qkv, lse, ctx.n_heads)
        return dqkv, None if ctx.bias_dtype is None else dbias.to(ctx.bias_dtype), None

    _attn_fwd.register_autograd(_attn_backward, setup_context=_attn_setup_context)
