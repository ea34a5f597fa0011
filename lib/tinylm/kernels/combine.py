"""The MoE combine without autograd (evaluation, decoding): each token's kept expert outputs, gathered
and summed weighted by the gate, in one kernel.

out_TD[t] = sum over k of gate_TK[t, k] * (y_SD[slot_TK[t, k]] + bias_ED[expert_TK[t, k]]) where
keep_TK[t, k], in fp32.

The experts' output bias is added here, to each kept row as it is read, not to every slot before: as
its own pass over the capacity-padded slots (bf16, 163,840 x 256 at falcon's evaluation batch) it took
55 us per layer on an H100, and falcon's evaluation of 36,000 rows went from 0.445 to 0.423 s without
it (docs/performance.md, "One H100, 2026-12-06 (eighth session)").

The plain path gathers the slots and adds the bias (one kernel), then sums them as a batched matmul
in fp32, which cuBLAS runs as a batched matrix-vector product: at falcon's evaluation batch (65,536
tokens, d_model 256) 0.21 ms per layer on an H200, about a fifth of the evaluation pass. The matmul
is there as a kernel boundary: compiled inference graphs that fused the gathers into the next residual
add and LayerNorm gave wrong losses (docs/performance.md, "Compiled MoE on the H100", finding 3). The kernel
is a boundary too (the compiler does not fuse into a user Triton kernel), reads each kept row once and
writes the sum.

Eligible (`combine_fused`): kernels on, Triton present, CUDA tensors, autograd off (training keeps the
elementwise combine, which the compiler fuses with the gathers), d_model <= MAX_COMBINE_D.
"""

from __future__ import annotations

import torch

from .common import enabled, tl, triton

MAX_COMBINE_D = 4096  # one row of d_model per program row


def combine_fused(y_SD: torch.Tensor) -> bool:
    """Whether `moe_combine` runs the Triton kernel."""
    return (enabled() and triton is not None and y_SD.is_cuda and not torch.is_grad_enabled()
            and y_SD.shape[-1] <= MAX_COMBINE_D)


def reference_combine(y_SD: torch.Tensor, slot_TK: torch.Tensor, keep_TK: torch.Tensor, gate_TK: torch.Tensor,
                      bias_ED: torch.Tensor, expert_TK: torch.Tensor) -> torch.Tensor:
    """The plain path: gather and add the bias in fp32 (a dropped assignment reads zeros), then the
    gate-weighted sum as a batched matmul in fp32 (a fusion boundary for the compiler, module docstring)."""
    with torch.autocast(y_SD.device.type, enabled=False):
        y_TKD = torch.where(keep_TK.unsqueeze(-1), y_SD[slot_TK].float() + bias_ED[expert_TK].float(), 0.0)
        return torch.bmm(gate_TK.float().unsqueeze(1), y_TKD).squeeze(1)


def moe_combine(y_SD: torch.Tensor, slot_TK: torch.Tensor, keep_TK: torch.Tensor, gate_TK: torch.Tensor,
                bias_ED: torch.Tensor, expert_TK: torch.Tensor) -> torch.Tensor:
    """fp32 (T, D): the gate-weighted sum of each token's kept slots of y_SD (slots, D), each plus its
    expert's row of bias_ED (experts, D); slot_TK indexes y_SD's rows, expert_TK bias_ED's, keep_TK
    (bool) says which assignments count, gate_TK their weights."""
    if combine_fused(y_SD):
        return _combine(y_SD, slot_TK, keep_TK, gate_TK, bias_ED, expert_TK)
    return reference_combine(y_SD, slot_TK, keep_TK, gate_TK, bias_ED, expert_TK)


if triton is not None:

    @triton.jit
    def _combine_kernel(Y, Slot, Keep, Gate, Bias, Expert, Out, T, D: tl.constexpr, K: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """Tokens [t0, t0 + BLOCK_T): for each of the K assignments, load the gate and, where kept, the
        slot's row and its expert's bias row; accumulate in fp32 and store the sum."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_D)
        rmask = rows < T
        cmask = cols < D
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for k in tl.static_range(K):
            at = rows.to(tl.int64) * K + k
            slot = tl.load(Slot + at, mask=rmask, other=0).to(tl.int64)
            keep = tl.load(Keep + at, mask=rmask, other=False)
            gate = tl.load(Gate + at, mask=rmask, other=0.0).to(tl.float32)
            m = keep[:, None] & cmask[None, :]
            expert = tl.load(Expert + at, mask=rmask, other=0).to(tl.int64)
            y = tl.load(Y + slot[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
            b = tl.load(Bias + expert[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
            acc += gate[:, None] * (y + b)
        out = rows[:, None].to(tl.int64) * D + cols[None, :]
        tl.store(Out + out, acc, mask=rmask[:, None] & cmask[None, :])

    # At most this many tokens per program, so many that a program's fp32 sums stay near 8,192 values
    # (32 rows at d_model 256, 2 at 4096), and its warps. Not swept: the kernel only moves memory (the
    # evaluation figures with it: docs/performance.md, "One H200, 2026-12-04 (night)").
    _COMBINE_TILES = (32, 4)
    _COMBINE_SUMS = 8192

    @torch.library.triton_op("tinylm::moe_combine", mutates_args={})
    def _combine(y_SD: torch.Tensor, slot_TK: torch.Tensor, keep_TK: torch.Tensor, gate_TK: torch.Tensor,
                 bias_ED: torch.Tensor, expert_TK: torch.Tensor) -> torch.Tensor:
        y_SD, slot_TK, gate_TK = y_SD.contiguous(), slot_TK.contiguous(), gate_TK.contiguous()
        keep_TK, bias_ED, expert_TK = keep_TK.contiguous(), bias_ED.contiguous(), expert_TK.contiguous()
        T, K = slot_TK.shape
        D = y_SD.shape[-1]
        out = torch.empty((T, D), device=y_SD.device, dtype=torch.float32)
        most_t, warps = _COMBINE_TILES
        block_d = triton.next_power_of_2(D)
        block_t = min(most_t, _COMBINE_SUMS // block_d)
        torch.library.wrap_triton(_combine_kernel)[(triton.cdiv(T, block_t),)](
            y_SD, slot_TK, keep_TK, gate_TK, bias_ED, expert_TK, out, T, D=D, K=K, BLOCK_T=block_t, BLOCK_D=block_d,
            num_warps=warps)
        return out
