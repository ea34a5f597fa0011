"""The output layer and the mean cross-entropy as one autograd node, and the plain reference loss.

One kernel reads each row of logits once and writes the row's loss and softmax minus the target
indicator; the backward is then two matrix multiplies scaled by grad / (counted rows). The plain
path reads the logits three times and writes a logits-sized gradient (and a zero-filled buffer) in
the backward.

Eligible (`cross_entropy_fused`): kernels on, CUDA under bf16/fp16 autocast, vocabulary <= MAX_VOCAB.
Otherwise `reference_cross_entropy` of the plain logits runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import autocast_low, tl, triton

IGNORE = -100  # F.cross_entropy's ignore_index: padded evaluation rows
MAX_VOCAB = 32768  # one row of logits per program


def cross_entropy_fused(x_ND: torch.Tensor, weight_VD: torch.Tensor) -> bool:
    """Whether `linear_cross_entropy` runs the Triton kernel: CUDA under bf16/fp16 autocast."""
    return autocast_low(x_ND) and weight_VD.shape[0] <= MAX_VOCAB


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
    def _ce_kernel(Logits, Targets, Loss, Grad, V: tl.constexpr, BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr,
                   IGNORE_INDEX: tl.constexpr):
        """One row: loss = logsumexp - logit[target]; with WRITE_GRAD, grad = softmax - indicator (0 if
        ignored) into Grad's row. Not in place: writing the gradient over the logits it reads, the same
        kernel ran slower inside a compiled graph than called eagerly; into its own buffer it runs as
        fast in both (docs/performance.md, "Triton kernels")."""
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
        # 64 logits per thread: at 8,192 logits 4 warps beat 8 and 16, with the gradient and without
        # (docs/performance.md, "Triton kernels").
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
        # pass over the product. In fp16, w * scale would fall into subnormals.
        # (w * scale stays bf16: a 0-dim fp32 scale does not promote it.)
        dx = grad @ (w * scale) if w.dtype == torch.bfloat16 else (grad @ w) * scale
        return dx, (grad.t() @ x) * scale, None, None

    _linear_ce.register_autograd(_ce_backward, setup_context=_ce_setup_context)
