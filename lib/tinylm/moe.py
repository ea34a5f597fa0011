"""Mixture-of-Experts feed-forward: top-k routing with per-expert capacity, in fixed shapes.

Shape suffixes:
  T  tokens in this call (the caller's B * T positions, flattened in order b * T + t)
  D  d_model
  E  experts
  K  top_k: experts per token
  C  capacity: slots per expert
  A  T * K assignments, a = t * K + k
  F  d_ff_expert: hidden width of one expert

Routing (documented here, tested against a per-token reference in lib/tests/test_moe.py):
  1. router logits_TE = x_TD @ W_router (no bias), in fp32; probs_TE = softmax over experts.
  2. Each token takes its top-k experts; with k > 1 their probabilities are renormalized to sum to 1
     (gate_TK). With k = 1 the gate is the probability itself (Switch Transformer): renormalized it
     would be 1 for every token, and the router would learn nothing from the language-model loss.
  3. capacity C = ceil(capacity_factor * T * K / E), at most T; without drop_tokens C = T.
  4. A token's position in an expert's queue is the number of earlier tokens (in flattened order)
     assigned to that expert. Assignments at position >= C are dropped: they contribute nothing,
     and a token whose every assignment is dropped gets a zero feed-forward output (the residual
     stream carries it on). Its k experts are distinct, so a token never competes with itself.
  5. Kept assignments fill the slots x_ECD (slot e, c: position c of expert e's queue; unfilled slots
     are zero), all experts run at once as batched matmuls, and each token gathers its kept slots
     back, summed weighted by the gate.
Queues without a sort or a scatter: one running count along the assignments per expert,
cum_EA[e, a] = assignments to expert e among a' <= a (flattened order), gives an assignment's queue
position (cum_EA at its own expert, minus one), the queue lengths (the last column), and the slots:
slot (e, c) holds the first assignment whose count for e reaches c + 1, a binary search in the
sorted row cum_EA[e] (searchsorted). Dispatch and combine are then gathers, and so are their
backwards (MaskedGather): the routing holds the map both ways (slot -> token and token -> its K slots),
so no gradient needs a scatter-add, whose atomic adds also summed in a varying order. An earlier version
took the same queues from stable argsorts of the assignments by expert: the same slots, but its radix
sorts took about 15% of falcon's GPU time on an H200. On an H200 (torch 2.11, tinylm.bench), falcon went
from 3.48 to 3.20 ms/step at batch 64 with the gather backward, and to 3.09 with top-k as rounds of max
(top_k) instead of torch.topk (docs/performance.md).
Why gathers: an earlier dispatch scattered token copies into a fresh zero buffer (dropped copies into
spare rows, sliced off). Compiled for an H100, it trained wrongly when CUDA-graphed or compiled a
second time in a process (loss stuck near uniform), while eager and CPU-compiled runs were right; the
gathers train like eager there (docs/performance.md).
The combine's weighted sum over k has two forms with the same math. With autograd on (training) it
is elementwise, which the compiler fuses with the gathers into the next kernels. Without autograd
(evaluation, decoding) it must not be fused: in inference graphs compiled for an H100, the gathers
fused into the following residual-add + LayerNorm kernel gave wrong losses that changed from call to
call (docs/performance.md, finding 3). There it is `kernels.moe_combine`, which also adds the experts'
output bias to the kept rows it reads: on CUDA one Triton kernel (gather, add the bias, weight, sum in
fp32), elsewhere a gather and bias in fp32 and a batched matmul gate_T1K @ y_TKD; the compiler fuses
across neither, and compiled evaluation matches the plain model.
Losses and statistics (tensors, no host synchronization):
  balance_loss = E * sum_e(importance_e * load_e), importance = probs summed over tokens and load =
                 assignments routed to each expert, kept or dropped, each normalized to sum to 1
                 (Switch Transformer, whose load is counted before the capacity drops anything: an
                 overloaded expert's whole excess is penalized)
  z_loss       = mean over tokens of logsumexp(logits_TE)^2 (ST-MoE)
  dropped_frac = dropped assignments / (T * K);  expert_load = load (E,), the router's demand
                 (what each expert keeps is min(load, capacity); dropped_frac says how much it drops)
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import moe_combine


class Routing(NamedTuple):
    logits_TE: torch.Tensor  # router logits, fp32
    probs_TE: torch.Tensor  # softmax of the logits
    gate_TK: torch.Tensor  # weights of each token's top-k experts (renormalized over them if k > 1)
    expert_TK: torch.Tensor  # which experts
    keep_TK: torch.Tensor  # bool: the assignment fits in its expert's capacity
    slot_TK: torch.Tensor  # e * C + position if kept, else 0 (masked by keep_TK)
    count_E: torch.Tensor  # assignments per expert, kept or not
    assign_EC: torch.Tensor  # the assignment a = t * K + k in slot (e, c); an arbitrary valid one where unfilled
    token_EC: torch.Tensor  # the token in slot (e, c), assign_EC // K
    filled_EC: torch.Tensor  # bool: expert e's queue reaches position c
    capacity: int


SCAN_CHUNK = 4096


def running_count(hit_EA: torch.Tensor) -> torch.Tensor:
    """cumsum of the bool hit_EA along A (int32), in chunks of SCAN_CHUNK plus a scan of chunk totals.

    The same numbers as one cumsum; compiled for a GPU, one long row is scanned by one program, so at
    batch 512 (A = 131,072, E = 8 rows) a plain cumsum ran on 8 programs and cost more than it saved.
    """
    E, A = hit_EA.shape
    if A <= SCAN_CHUNK:
        return hit_EA.cumsum(dim=1, dtype=torch.int32)
    pad = -A % SCAN_CHUNK
    within = F.pad(hit_EA.to(torch.int32), (0, pad)).view(E, -1, SCAN_CHUNK).cumsum(dim=2, dtype=torch.int32)
    totals = within[:, :, -1]
    before = totals.cumsum(dim=1, dtype=torch.int32) - totals
    # The sum is built in its final (E, A) shape, not viewed into it: torch 2.11's compiler cannot
    # hand searchsorted a view of an unmaterialised buffer (InductorError "NotImplementedError: View").
    chunk_A = torch.arange(A, device=hit_EA.device) // SCAN_CHUNK
    return within.view(E, -1)[:, :A] + before[:, chunk_A]


def top_k(p_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """p_TE.topk(k, dim=-1) as k rounds of max (ties: the lower expert first). With a handful of
    experts the compiler fuses these reductions with the softmax; topk ran as two library kernels
    (a radix select and a sort) per layer."""
    experts_E = torch.arange(p_TE.shape[-1], device=p_TE.device)
    values, indices = [], []
    for _ in range(k):
        v_T, i_T = p_TE.max(dim=-1)
        values.append(v_T)
        indices.append(i_T)
        p_TE = torch.where(experts_E == i_T.unsqueeze(-1), -math.inf, p_TE)
    return torch.stack(values, dim=-1), torch.stack(indices, dim=-1)


class MaskedGather(torch.autograd.Function):
    """out_ND[i] = src_MD[index_N[i]] where mask_N[i], else 0; its backward a gather too.

    The routing gives both directions of the token-slot map, so the gradient needs no scatter-add:
    src row j was read by out rows inverse_MJ[j, :] (those where inverse_mask_MJ), and its gradient is
    their sum. Dispatch: src = tokens, out = slots, inverse = each token's K slots. Combine: src =
    slots, out = assignments, inverse = each slot's one assignment."""

    @staticmethod
    def forward(src_MD, index_N, mask_N, inverse_MJ, inverse_mask_MJ):
        return torch.where(mask_N.unsqueeze(-1), src_MD[index_N], 0.0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[3], inputs[4])

    @staticmethod
    def backward(ctx, grad_ND):
        inverse_MJ, inverse_mask_MJ = ctx.saved_tensors
        acc = torch.promote_types(grad_ND.dtype, torch.float32)  # bf16 sums in fp32, fp64 stays fp64
        picked_MJD = torch.where(inverse_mask_MJ.unsqueeze(-1), grad_ND[inverse_MJ].to(acc), 0.0)
        return picked_MJD.sum(dim=1).to(grad_ND.dtype), None, None, None, None


class MoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        E, D, F_ = cfg.n_experts, cfg.d_model, cfg.expert_hidden
        self.n_experts, self.top_k = E, cfg.top_k
        self.capacity_factor, self.drop_tokens = cfg.capacity_factor, cfg.drop_tokens
        # the factor as written (1.1, not the float just above it), as whole numbers the compiler traces
        self._factor = Fraction(repr(cfg.capacity_factor)).as_integer_ratio()
        self.router = nn.Linear(D, E, bias=False)
        # Each expert is Linear(D, F) + GELU + Linear(F, D) with biases, stacked over experts.
        self.w1 = nn.Parameter(torch.empty(E, D, F_))  # w1_EDF
        self.b1 = nn.Parameter(torch.zeros(E, F_))  # b1_EF
        self.w2 = nn.Parameter(torch.empty(E, F_, D))  # w2_EFD (residual projection: scaled init)
        self.b2 = nn.Parameter(torch.zeros(E, D))  # b2_ED
        nn.init.normal_(self.w1, 0.0, 0.02)
        nn.init.normal_(self.w2, 0.0, 0.02)

    out_proj = None  # slot interface (see model.MLP): the block adds this module's output as it is
    # Biases, though 2-d (one row per expert): AdamW leaves them undecayed, as it does the dense MLP's (step.py).
    no_weight_decay = ("b1", "b2")

    def capacity(self, n_tokens: int, drop_tokens: bool = True) -> int:
        if not (self.drop_tokens and drop_tokens):
            return n_tokens
        # exact: in floats 1.1 * 50 * 2 / 10 is 11.000000000000002, whose ceiling is one slot too many
        num, den = self._factor
        c = -(-num * n_tokens * self.top_k // (den * self.n_experts))
        return min(c, n_tokens)  # a queue never holds more than every token

    def route(self, x_TD: torch.Tensor, drop_tokens: bool = True) -> Routing:
        """Steps 1-4 of the module docstring, and which token fills each slot of step 5."""
        T, E, K = x_TD.shape[0], self.n_experts, self.top_k
        with torch.autocast(x_TD.device.type, enabled=False):  # routing decisions in fp32
            logits_TE = F.linear(x_TD.float(), self.router.weight.float())
        probs_TE = logits_TE.softmax(dim=-1)
        gate_TK, expert_TK = top_k(probs_TE, K)
        if K > 1:
            gate_TK = gate_TK / gate_TK.sum(dim=-1, keepdim=True)
        C = self.capacity(T, drop_tokens)
        A = T * K
        expert_A = expert_TK.flatten()
        experts_E = torch.arange(E, device=x_TD.device)
        cum_EA = running_count(expert_A == experts_E.unsqueeze(1))
        count_E = cum_EA[:, -1]
        pos_TK = (cum_EA.gather(0, expert_A.unsqueeze(0)) - 1).view(T, K)  # earlier ones in its queue
        keep_TK = pos_TK < C
        slot_TK = torch.where(keep_TK, expert_TK * C + pos_TK, 0)
        # Slot (e, c) takes the first assignment whose running count for e reaches c + 1 (A if none).
        rank_EC = torch.arange(1, C + 1, device=x_TD.device, dtype=torch.int32).repeat(E, 1)
        first_EC = torch.searchsorted(cum_EA, rank_EC)
        filled_EC = first_EC < A
        assign_EC = first_EC.clamp(max=A - 1)
        return Routing(logits_TE, probs_TE, gate_TK, expert_TK, keep_TK, slot_TK, count_E, assign_EC, assign_EC // K,
                       filled_EC, C)

    def forward(self, x_BTD: torch.Tensor, drop_tokens: bool = True) -> tuple[torch.Tensor, dict]:
        """Returns (y_BTD, stats); drop_tokens=False routes without capacity limits (used for decoding)."""
        D, E = x_BTD.shape[-1], self.n_experts
        x_TD = x_BTD.reshape(-1, D)
        T = x_TD.shape[0]
        r = self.route(x_TD, drop_tokens)
        C = r.capacity

        # Dispatch: slot (e, c) holds queue position c of expert e, if its queue is that long.
        x_ECD = MaskedGather.apply(x_TD, r.token_EC.flatten(), r.filled_EC.flatten(), r.slot_TK, r.keep_TK)
        x_ECD = x_ECD.view(E, C, D)

        # Products, then their biases: baddbmm on CUDA first copies the broadcast bias into its whole
        # output (one activation-sized copy per call that the compiler leaves to aten, 10% of falcon's
        # step at batch 512); an added bias fuses with the GELU and with the combine instead.
        a_ECF = torch.bmm(x_ECD, self.w1)
        h_ECF = F.gelu(a_ECF + self.b1.unsqueeze(1).to(a_ECF.dtype))
        y_ECD = torch.bmm(h_ECF, self.w2)

        # Combine: each token gathers its kept slots and sums them weighted by the gate. In training a
        # dropped assignment reads slot 0 and is masked to zero; moe_combine does not read it.
        if torch.is_grad_enabled():
            y_ECD = y_ECD + self.b2.unsqueeze(1).to(y_ECD.dtype)
            y_TKD = MaskedGather.apply(y_ECD.reshape(E * C, D), r.slot_TK.flatten(), r.keep_TK.flatten(),
                                       r.assign_EC.view(-1, 1), r.filled_EC.view(-1, 1)).view(T, self.top_k, D)
            y_TD = (y_TKD * r.gate_TK.unsqueeze(-1)).sum(dim=1)
        else:  # inference: one kernel on CUDA, a matmul elsewhere; a fusion boundary (module docstring).
            # It adds the bias to the kept rows it reads, in fp32, instead of a pass over every slot.
            y_TD = moe_combine(y_ECD.reshape(E * C, D), r.slot_TK, r.keep_TK, r.gate_TK, self.b2, r.expert_TK)

        A = T * self.top_k
        load_frac_E = r.count_E.float() / A  # routed assignments, kept or dropped (module docstring)
        kept = r.count_E.clamp(max=C).sum().float()  # an expert keeps the first C of its queue
        importance_E = r.probs_TE.sum(dim=0)
        stats = {
            "balance_loss": E * (importance_E / importance_E.sum() * load_frac_E).sum(),
            "z_loss": torch.logsumexp(r.logits_TE, dim=-1).square().mean(),
            "dropped_frac": 1.0 - kept / A,
            "expert_load": load_frac_E,
        }
        return y_TD.to(x_BTD.dtype).view_as(x_BTD), stats
