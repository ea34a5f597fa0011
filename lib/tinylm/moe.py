"""Mixture-of-Experts feed-forward: top-k routing with per-expert capacity, in fixed shapes.

Shape suffixes:
  T  tokens in this call (the caller's B * T positions, flattened in order b * T + t)
  D  d_model
  E  experts
  K  top_k: experts per token
  C  capacity: slots per expert
  P  E * C + 1 slots: slot e * C + c is position c of expert e; the last (zeros) is read by dropped ones
  F  d_ff_expert: hidden width of one expert

Routing (documented here, tested against a per-token reference in lib/tests/test_moe.py):
  1. router logits_TE = x_TD @ W_router (no bias), in fp32; probs_TE = softmax over experts.
  2. Each token takes its top-k experts; their probabilities are renormalized to sum to 1 (gate_TK).
  3. capacity C = ceil(capacity_factor * T * K / E), at most T; without drop_tokens C = T.
  4. A token's position in an expert's queue is the number of earlier tokens (in flattened order)
     assigned to that expert. Assignments at position >= C are dropped: they contribute nothing,
     and a token whose every assignment is dropped gets a zero feed-forward output (the residual
     stream carries it on). Its k experts are distinct, so a token never competes with itself.
  5. Kept assignments are copied into their slots (x_ECD), run through all experts at once with
     batched matmuls, and gathered back per token, summed weighted by the gate.
Losses and statistics (tensors, no host synchronization):
  balance_loss = E * sum_e(importance_e * load_e), importance = probs summed over tokens and load =
                 kept assignments per expert, each normalized to sum to 1 (Switch Transformer)
  z_loss       = mean over tokens of logsumexp(logits_TE)^2 (ST-MoE)
  dropped_frac = dropped assignments / (T * K);  expert_load = load (E,)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Routing(NamedTuple):
    logits_TE: torch.Tensor  # router logits, fp32
    probs_TE: torch.Tensor  # softmax of the logits
    gate_TK: torch.Tensor  # renormalized weights of each token's top-k experts
    expert_TK: torch.Tensor  # which experts
    keep_TK: torch.Tensor  # bool: the assignment fits in its expert's capacity
    slot_TK: torch.Tensor  # e * C + position if kept, else E * C (the dump slot)
    capacity: int


class MoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        E, D, F_ = cfg.n_experts, cfg.d_model, cfg.expert_hidden
        self.n_experts, self.top_k = E, cfg.top_k
        self.capacity_factor, self.drop_tokens = cfg.capacity_factor, cfg.drop_tokens
        self.router = nn.Linear(D, E, bias=False)
        # Each expert is Linear(D, F) + GELU + Linear(F, D) with biases, stacked over experts.
        self.w1 = nn.Parameter(torch.empty(E, D, F_))  # w1_EDF
        self.b1 = nn.Parameter(torch.zeros(E, F_))  # b1_EF
        self.w2 = nn.Parameter(torch.empty(E, F_, D))  # w2_EFD (residual projection: scaled init)
        self.b2 = nn.Parameter(torch.zeros(E, D))  # b2_ED
        nn.init.normal_(self.w1, 0.0, 0.02)
        nn.init.normal_(self.w2, 0.0, 0.02)

    def capacity(self, n_tokens: int, drop_tokens: bool = True) -> int:
        if not (self.drop_tokens and drop_tokens):
            return n_tokens
        c = math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)
        return min(c, n_tokens)  # a queue never holds more than every token

    def route(self, x_TD: torch.Tensor, drop_tokens: bool = True) -> Routing:
        """Steps 1-4 of the module docstring."""
        T, E, K = x_TD.shape[0], self.n_experts, self.top_k
        with torch.autocast(x_TD.device.type, enabled=False):  # routing decisions in fp32
            logits_TE = F.linear(x_TD.float(), self.router.weight.float())
        probs_TE = logits_TE.softmax(dim=-1)
        gate_TK, expert_TK = probs_TE.topk(K, dim=-1)
        gate_TK = gate_TK / gate_TK.sum(dim=-1, keepdim=True)
        C = self.capacity(T, drop_tokens)
        # Queues are scanned along tokens as rows of [E, T]: a scan down [T, E] has only E lanes.
        assigned_ET = F.one_hot(expert_TK, E).sum(dim=1).t().to(torch.int32).contiguous()
        earlier_ET = assigned_ET.cumsum(dim=1, dtype=torch.int32) - assigned_ET
        pos_TK = earlier_ET.t().gather(1, expert_TK)  # earlier tokens in each chosen expert's queue
        keep_TK = pos_TK < C
        slot_TK = torch.where(keep_TK, expert_TK * C + pos_TK, E * C)
        return Routing(logits_TE, probs_TE, gate_TK, expert_TK, keep_TK, slot_TK, C)

    def forward(self, x_BTD: torch.Tensor, drop_tokens: bool = True) -> tuple[torch.Tensor, dict]:
        """Returns (y_BTD, stats); drop_tokens=False routes without capacity limits (used for decoding)."""
        D, E = x_BTD.shape[-1], self.n_experts
        x_TD = x_BTD.reshape(-1, D)
        T = x_TD.shape[0]
        r = self.route(x_TD, drop_tokens)
        C = r.capacity

        # Dispatch: copy each token into its k slots. Every dropped copy gets a dump row of its own
        # (E*C + its assignment index), never read: the scatter then has no duplicate indices, whose
        # racing writes a compiled kernel may order against the zero fill of the same buffer (seen
        # on an H100: compiled+graphed falcon steps diverged from eager, differently on every run).
        # Unfilled slots stay zero. (Scattering copies rather than gathering by a slot -> token
        # table keeps the backward a plain gather.)
        n_assign = T * self.top_k
        dump_TK = E * C + torch.arange(n_assign, device=x_TD.device).view(T, self.top_k)
        dispatch_TK = torch.where(r.keep_TK, r.slot_TK, dump_TK)
        x_TKD = x_TD.unsqueeze(1).expand(T, self.top_k, D)
        x_PD = x_TD.new_zeros(E * C + n_assign, D).index_put((dispatch_TK.flatten(),), x_TKD.reshape(-1, D))
        x_ECD = x_PD[: E * C].view(E, C, D)

        h_ECF = F.gelu(torch.baddbmm(self.b1.unsqueeze(1), x_ECD, self.w1))
        y_ECD = torch.baddbmm(self.b2.unsqueeze(1), h_ECF, self.w2)

        # Combine: each token gathers its k slots (dropped ones read the zero row E*C) and sums them
        # weighted by the gate. Kept slots are distinct, so the backward scatter is deterministic.
        y_PD = torch.cat([y_ECD.reshape(E * C, D), y_ECD.new_zeros(1, D)])
        y_TKD = y_PD.gather(0, r.slot_TK.view(-1, 1).expand(-1, D)).view(T, self.top_k, D)
        y_TD = (y_TKD * (r.gate_TK * r.keep_TK).unsqueeze(-1)).sum(dim=1)

        load_E = (F.one_hot(r.expert_TK, E) * r.keep_TK.unsqueeze(-1)).sum(dim=(0, 1)).float()
        kept = load_E.sum()
        importance_E = r.probs_TE.sum(dim=0)
        load_frac_E = load_E / kept.clamp_min(1.0)
        stats = {
            "balance_loss": E * (importance_E / importance_E.sum() * load_frac_E).sum(),
            "z_loss": torch.logsumexp(r.logits_TE, dim=-1).square().mean(),
            "dropped_frac": 1.0 - kept / (T * self.top_k),
            "expert_load": load_frac_E,
        }
        return y_TD.to(x_BTD.dtype).view_as(x_BTD), stats
