"""Triton kernels for the places where a tiny GPT's training step moves the most memory.

Used on CUDA with bf16/fp16 activations; everywhere else (CPU, fp32, shapes out of range) the same
functions run the plain PyTorch path, which is what the tests compare the kernels with.

- `causal_attention` / `linear_causal_attention`: at tinylm's sizes (seq_len <= 128, head size 64)
  a whole head's queries, keys and values fit in one thread block, so one program per (row, head)
  computes the masked softmax and the output in registers, reading q, k, v from the fused qkv
  projection's output and writing the output in the (B, T, D) layout the output projection reads.
  The backward program, taking the queries in two halves, recomputes the probabilities from the saved
  log-sum-exp and writes dq, dk, dv into the qkv layout: no head transposes or concatenation either
  way. The math is flash attention's (scores and softmax in fp32, both products with bf16/fp16 inputs
  and fp32 accumulation). The backward also sums dq, dk, dv over positions: the projection bias's
  gradient, without reading dqkv again.
- `linear_cross_entropy`: the output layer and the mean cross-entropy in one autograd node. One
  kernel reads each row of logits once and writes the row's loss and softmax minus the target
  indicator; the backward is then two matrix multiplies scaled by grad / (counted rows). The plain
  path reads the logits three times and writes a logits-sized gradient (and a zero-filled buffer) in
  the backward.
- `residual_layer_norm`: a branch's output projection, the residual add and the LayerNorm after it.
  One kernel writes the new residual stream (in the stream's dtype: fp32 under autocast, bf16 in
  dense GPTs under bf16) and its normalized copy in the autocast dtype; the backward kernel writes the
  stream's gradient and, for an fp32 stream, its bf16/fp16 copy for the projection's backward, and
  sums the norm's weight and bias gradients and the projection's bias gradient over its rows, where
  the compiled plain layers run the LayerNorm backward, a cast and three reductions.
- `linear_gelu`: the feed-forward's first layer and its GELU. The backward is one kernel that writes
  the pre-activation gradient and, from the same registers, per-block column sums for the bias
  gradient; the plain path reads that (B*T, d_ff) gradient a second time for the bias sum.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the fallback paths need no Triton
    triton = None

IGNORE = -100  # F.cross_entropy's ignore_index: padded evaluation rows
MAX_T = 128
HEAD_SIZES = (16, 32, 64, 128)
MAX_VOCAB = 32768  # one row of logits per program
MAX_NORM_D = 4096  # one row of the residual stream per program row
_LOW = (torch.bfloat16, torch.float16)
_enabled = True


def set_enabled(flag: bool) -> None:
    """Turn the Triton kernels on or off for this process (off: the plain PyTorch paths everywhere)."""
    global _enabled
    _enabled = bool(flag)


@contextlib.contextmanager
def disabled():
    """The plain PyTorch paths inside this block (what the tests compare the kernels with)."""
    before = _enabled
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(before)


def attention_fused(qkv_BT3D: torch.Tensor, n_heads: int) -> bool:
    """Whether `causal_attention` runs the Triton kernels for this input."""
    return _attention_ok(qkv_BT3D.is_cuda, qkv_BT3D.dtype, qkv_BT3D.shape, n_heads)


def _attention_ok(is_cuda: bool, dtype: torch.dtype, shape_BT3D, n_heads: int) -> bool:
    if not _enabled or triton is None or not is_cuda or dtype not in _LOW:
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


def _autocast_low(x: torch.Tensor) -> bool:
    """Kernels on, Triton present, and x on CUDA under bf16/fp16 autocast."""
    return (
        _enabled
        and triton is not None
        and x.is_cuda
        and torch.is_autocast_enabled("cuda")
        and torch.get_autocast_dtype("cuda") in _LOW
    )


def cross_entropy_fused(x_ND: torch.Tensor, weight_VD: torch.Tensor) -> bool:
    """Whether `linear_cross_entropy` runs the Triton kernel: CUDA under bf16/fp16 autocast."""
    return _autocast_low(x_ND) and weight_VD.shape[0] <= MAX_VOCAB


def gelu_fused(x: torch.Tensor) -> bool:
    """Whether `linear_gelu` runs the GELU + bias-gradient backward kernel: CUDA under bf16/fp16 autocast."""
    return _autocast_low(x) and x.numel() < 2**31


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


def residual_norm_fused(x: torch.Tensor) -> bool:
    """Whether `residual_layer_norm` runs the Triton kernels: CUDA under bf16/fp16 autocast."""
    return _autocast_low(x) and x.shape[-1] <= MAX_NORM_D and x.numel() < 2**31


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
        # The bias is added in the kernel (cuBLAS's bias epilogue cost 3-4 us per call).
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
    output projection at 65,536 rows, cuBLAS takes 0.088 ms for dy^T @ x and 0.075 ms for x^T @ dy
    (H100; baseline's batch-512 step 11.54 -> 11.52 ms)."""

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


def linear_cross_entropy(x_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """Mean over counted rows (target != IGNORE) of cross_entropy(x @ weight.T, targets).

    The fused path computes the logits in the autocast dtype (as autocast's linear would) and never
    returns them. An all-IGNORE input gives 0 / 0 = nan, as F.cross_entropy does.
    """
    if cross_entropy_fused(x_ND, weight_VD):
        dt = torch.get_autocast_dtype("cuda")
        with torch.autocast("cuda", enabled=False):
            return _linear_ce(x_ND.to(dt), weight_VD.to(dt), targets_N, torch.is_grad_enabled())[0]
    return reference_cross_entropy(F.linear(x_ND, weight_VD), targets_N)


def reference_cross_entropy(logits_NV: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(logits.float(), targets, ignore_index=IGNORE).

    Compiled, it is written as logsumexp minus the target's logit picked by an indicator, so that its
    backward is one elementwise pass (softmax minus the indicator) instead of a zero-filled
    logits-sized buffer and a scatter. Eager, the indicator would be a logits-sized tensor: the library
    call is used.
    """
    if not torch.compiler.is_compiling():
        return F.cross_entropy(logits_NV.float(), targets_N, ignore_index=IGNORE)
    logits_NV = logits_NV.float()
    valid_N = targets_N != IGNORE
    hit_NV = targets_N.unsqueeze(1) == torch.arange(logits_NV.shape[1], device=logits_NV.device)
    nll_N = logits_NV.logsumexp(dim=-1) - torch.where(hit_NV, logits_NV, 0.0).sum(dim=-1)
    return torch.where(valid_N, nll_N, 0.0).sum() / valid_N.sum()


if triton is not None:

    @triton.jit
    def _head_offsets(T: tl.constexpr, H: tl.constexpr, DH: tl.constexpr, BLOCK_T: tl.constexpr):
        """This program's (row, head): the offsets of its q tile in the (B, T, 3D) projection output (k
        and v follow at + D, + 2D), the matching offsets in a (B, T, D) tensor, the positions, their mask.

        Offsets only, no pointers: inductor decides which tensors a kernel writes by tracing each store's
        address back to the kernel's arguments, and it counts every argument of a helper call that an
        address came from. Had this helper taken the qkv pointer (it once loaded the tiles), the
        backward's stores into dqkv would have marked qkv as written, and the compiled graph copied the
        whole qkv tensor before every backward launch (0.06 ms per layer at batch 512).
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
        backward. H100, batch 512, head size 64: 0.121 ms against 0.177 ms for the earlier kernel (one
        128-row tile at 8 warps, delta from O); head size 128 (condor): 0.211 ms at 8 warps against
        0.160 (docs/performance.md).
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

    @triton.jit
    def _ce_kernel(Logits, Targets, Loss, Grad, V: tl.constexpr, BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr,
                   IGNORE_INDEX: tl.constexpr):
        """One row: loss = logsumexp - logit[target]; with WRITE_GRAD, grad = softmax - indicator (0 if
        ignored) into Grad's row. Not in place: writing the gradient over the logits it reads, the same
        kernel took 0.98 ms inside a compiled graph against 0.78 called eagerly (H100, 65,536 x 8,192
        bf16); into its own buffer it takes 0.775 ms in both."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_V)
        in_V = cols < V
        off = row * V + cols
        x = tl.load(Logits + off, mask=in_V, other=float("-inf")).to(tl.float32)
        target = tl.load(Targets + row)
        m = tl.max(x, 0)
        e = tl.exp(x - m)
        total = tl.sum(e, 0)
        hit = cols == target
        counted = target != IGNORE_INDEX
        nll = m + tl.log(total) - tl.sum(tl.where(hit, x, 0.0), 0)
        tl.store(Loss + row, tl.where(counted, nll, 0.0))
        if WRITE_GRAD:
            g = e / total - tl.where(hit, 1.0, 0.0)
            g = tl.where(counted, g, 0.0)
            tl.store(Grad + off, g.to(Grad.dtype.element_ty), mask=in_V)

    def _ce_warps(block_v: int) -> int:
        # 64 logits per thread. H100, 65,536 x 8,192 bf16 logits: with the gradient (own buffer) 4 warps
        # 0.730 ms (8: 0.758, 16: 0.944; a 1 GiB -> 1 GiB copy takes 0.715); loss only 4 warps 0.371 ms
        # (8: 0.405, 16: 0.500). Written in place, 4 warps took 0.767 (8: 0.89, 16: 0.87, 32: 0.99).
        return max(4, block_v // 2048)

    @torch.library.triton_op("tinylm::linear_ce", mutates_args={})
    def _linear_ce(
        x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, want_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (mean loss, softmax - indicator (empty without want_grad), number of counted rows)."""
        N, V = x.shape[0], w.shape[0]
        logits = torch.mm(x, w.t())
        loss_rows = torch.empty(N, device=x.device, dtype=torch.float32)
        grad = torch.empty_like(logits) if want_grad else logits.new_empty(0)
        block_v = triton.next_power_of_2(V)
        torch.library.wrap_triton(_ce_kernel)[(N,)](
            logits, targets.contiguous(), loss_rows, grad if want_grad else logits, V=V, BLOCK_V=block_v,
            WRITE_GRAD=want_grad, IGNORE_INDEX=IGNORE, num_warps=_ce_warps(block_v))
        counted = (targets != IGNORE).sum().to(torch.float32)
        return loss_rows.sum() / counted, grad, counted

    def _ce_setup_context(ctx, inputs, output):
        x, w, _, _ = inputs
        _, grad, counted = output
        ctx.save_for_backward(x, w, grad, counted)
        ctx.mark_non_differentiable(grad, counted)

    def _ce_backward(ctx, dloss, dgrad, dcounted):
        x, w, grad, counted = ctx.saved_tensors
        scale = dloss / counted
        # bf16 has fp32's exponent range: scaling the (V, D) weight instead of the (N, D) product saves a
        # pass over the product (0.03 ms at batch 512). In fp16, w * scale would fall into subnormals.
        # (w * scale stays bf16: a 0-dim fp32 scale does not promote it.)
        dx = grad @ (w * scale) if w.dtype == torch.bfloat16 else (grad @ w) * scale
        return dx, (grad.t() @ x) * scale, None, None

    _linear_ce.register_autograd(_ce_backward, setup_context=_ce_setup_context)

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

    # (rows per program, rows per step, columns, warps, pipeline stages). H100, 65,536 x 1,024 bf16
    # (docs/gelu-bwd-sweep.py): 128 rows in steps of 64, 64 columns, 4 warps, 2 stages 0.151 ms for the
    # kernel; one 64 x 64 tile per program at 8 warps (the previous configuration) 0.157 ms; the op with
    # the partial-sum reduction 0.169 ms then; a same-sized copy 0.094 ms.
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
    # stages of the row loop). H100, 65,536 x 256 (docs/norm-sweep.py): forward 0.072 ms at 4 to 32
    # rows with 2 or 4 warps (the 192 MB it moves take as long in a copy); backward kernel 0.108 ms at
    # 128 rows in steps of 8, 2 warps, 2 stages, against 0.114 ms for 64 rows unpipelined (earlier:
    # 0.149-0.166 ms with the reductions at 16 to 64 rows, and one step of 8 rows per program wrote a
    # partial line per 8 rows and took 0.108 + 0.05 ms for the larger reductions).
    _NORM_FWD_TILES = (8, 2)
    _NORM_BWD_TILES = (128, 8, 2, 2)

    def _norm_bwd_rows(n_rows: int) -> int:
        """Rows per backward program: the most (up to _NORM_BWD_TILES[0]) that still leaves 256 programs.
        Baseline's step on the H100: batch 512 (65,536 rows) 11.55 -> 11.50 ms with 128 rows instead of
        64; at batch 64 (8,192 rows) 128 rows left 64 programs and took 2.44 ms, 64 rows 2.23, 32 rows 2.20."""
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
        # one whole tensor, one reduction for the three sums (three took 0.08 ms more per step at batch 512).
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
