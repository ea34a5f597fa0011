"""One GPT for every variant: decoder-only, pre-LayerNorm, learned positions, tied embeddings.

The feed-forward of each block is a slot filled by config: a dense GELU MLP (`ffn: dense`) or a
Mixture of Experts (`ffn: moe`, see moe.py). Training calls `forward(idx, targets)`, which returns
the losses and, for MoE models, routing statistics as tensors, with no host synchronization, so the
whole step can be torch.compile'd (fullgraph) and captured in a CUDA graph.

Each residual add is one call with the LayerNorm that follows it (`Block`): the attention's and the
MLP's output projections are applied there, so that on CUDA the add, the norm and their backward,
with the projection's bias gradient, are one kernel each way.

On CUDA under bf16/fp16 autocast, attention, the residual add + LayerNorm, the output layer + loss and
the backward of the MLP's bias + GELU run as Triton kernels (tinylm.kernels); elsewhere the same functions
run the plain PyTorch path. On that fused path under bf16, models also keep the residual stream between
blocks in bf16 rather than autocast's fp32 (`GPT._bf16_residual`; `fp32_residual: true` turns it off).

Generation calls `decode(idx, cache)`: the same layers, with keys and values kept in a KVCache so
each new token costs one position. Decoding never drops MoE assignments (see `GPT.decode`).

Shape letters: B batch, T sequence positions, D d_model, H heads, Dh head size, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import FFN_TYPES, MOE_KEYS, GPTConfig  # noqa: F401  (re-exported: tinylm.model.GPTConfig)
from .kernels import (
    linear_causal_attention,
    linear_cross_entropy,
    linear_gelu,
    residual_layer_norm,
    residual_norm_fused,
    split_heads,
)
from .moe import MoE


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention up to its output projection `proj`, which the block applies
    together with the residual add (forward returns the heads' outputs side by side, (B, T, D))."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.n_heads, self.layer, self.dropout = cfg.n_heads, layer, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)  # residual projection (scaled init)

    def forward(self, x_BTD: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, D = x_BTD.shape
        p = self.dropout if self.training else 0.0
        if cache is None and p == 0.0:  # training and evaluation: fused kernels on CUDA
            return linear_causal_attention(x_BTD, self.qkv.weight, self.qkv.bias, self.n_heads)
        qkv_BT3D = self.qkv(x_BTD)
        q, k, v = split_heads(qkv_BT3D, self.n_heads)  # (B, H, T, Dh)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            start = cache.pos
            k, v = cache.update(self.layer, k, v)  # (B, H, start + T, Dh)
            if T == 1:  # the newest position sees everything cached
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
            else:  # query i sits at position start + i and sees keys 0..start + i
                q_pos = torch.arange(start, start + T, device=x_BTD.device)
                mask_TS = torch.arange(start + T, device=x_BTD.device) <= q_pos[:, None]
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_TS, dropout_p=p)
        return y.transpose(1, 2).reshape(B, T, D)


class MLP(nn.Module):
    """Dense feed-forward up to its output projection `proj`, which the block applies together with
    the residual add. Slot interface shared with MoE: forward(x, drop_tokens) -> (h, stats), and
    `out_proj`, the linear layer the block applies to h (None: h is added as it is)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)  # residual projection (scaled init)

    @property
    def out_proj(self) -> nn.Linear:
        return self.proj

    def forward(self, x_BTD: torch.Tensor, drop_tokens: bool = True) -> tuple[torch.Tensor, dict]:
        return linear_gelu(x_BTD, self.fc.weight, self.fc.bias), {}


class Block(nn.Module):
    """x + attn(ln1(x)), then + ffn(ln2(.)), with each residual add fused with the LayerNorm after it.

    forward takes the residual stream x and y = ln1(x) and returns the stream leaving the block and
    `next_norm` of it (the next block's ln1, or the final norm): the norm after a block's last add
    belongs to what comes next. The branches' output projections are applied inside the add
    (`residual_layer_norm` in dense blocks), so on CUDA their bias gradients come from the add's
    backward kernel.
    """

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg, layer)
        self.attn_drop = nn.Dropout(cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = MoE(cfg) if cfg.ffn == "moe" else MLP(cfg)
        self.ffn_drop = nn.Dropout(cfg.dropout)
        # The add after attention takes the fused path unless an MoE model keeps the layout it trained in
        # before 2026-12-06 (moe_fused_blocks: false, both adds plain); the add after the experts never does.
        self.fuse_attn_add = cfg.fused_blocks

    def forward(self, x_BTD, y_BTD, next_norm: nn.LayerNorm, cache: KVCache | None = None,
                drop_tokens: bool = True, last: bool = False):
        """Returns (x_out, next_norm(x_out), ffn stats); x_out is None when `last` (only the norm is needed)."""
        x_BTD, y_BTD = _add_norm(x_BTD, self.attn(y_BTD, cache), self.attn.proj, self.attn_drop, self.ln2,
                                 self.fuse_attn_add)
        h_BTD, stats = self.ffn(y_BTD, drop_tokens)
        fuse = not isinstance(self.ffn, MoE)  # see _add_norm
        out = _add_norm(x_BTD, h_BTD, self.ffn.out_proj, self.ffn_drop, next_norm, fuse, keep_residual=not last)
        return (None, out, stats) if last else (*out, stats)


def _add_norm(x_BTD, h_BTD, proj: nn.Linear | None, drop: nn.Dropout, norm: nn.LayerNorm, fuse: bool,
              keep_residual: bool = True):
    """x + drop(proj(h)) (h where proj is None) and norm of it; only the norm when not keep_residual.

    fuse, with a projection and no active dropout: `residual_layer_norm` (one kernel each way on CUDA).
    The add after an MoE layer uses the plain layers: in training the compiler fuses the MoE combine (a
    gather and a weighted sum) into it; with the kernel there, falcon trained and evaluated slower
    (docs/performance.md). The add after attention uses the kernel in every block (its normalized
    output, bf16, is what the router reads, in fp32), unless config.moe_fused_blocks is false."""
    if not fuse or proj is None or (drop.training and drop.p > 0):
        x_BTD = x_BTD + drop(h_BTD if proj is None else proj(h_BTD))
        return (x_BTD, norm(x_BTD)) if keep_residual else norm(x_BTD)
    return residual_layer_norm(x_BTD, h_BTD, proj.weight, proj.bias, norm.weight, norm.bias, norm.eps,
                               keep_residual=keep_residual)


class KVCache:
    """Keys and values of every layer for incremental decoding, up to max_seq_len positions.

    `pos` is how many positions are filled; GPT.decode appends after it and advances it.
    """

    def __init__(self, cfg: GPTConfig, batch_size: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layers, batch_size, cfg.n_heads, cfg.max_seq_len, cfg.d_model // cfg.n_heads)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def update(self, layer: int, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor):
        """Store a layer's new keys/values at pos..pos+T; return all of that layer's keys/values so far."""
        end = self.pos + k_BHTd.shape[2]
        self.k[layer, :, :, self.pos : end] = k_BHTd
        self.v[layer, :, :, self.pos : end] = v_BHTd
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self) -> None:
        self.pos = 0


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied: one matrix reads and writes tokens
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 init: normal(0, 0.02), zero biases, residual projections scaled by 1/sqrt(2 * n_layers)."""
        std, resid_std = 0.02, 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")):
                nn.init.ones_(p)
            elif name.endswith(("bias", "ffn.b1", "ffn.b2")):
                nn.init.zeros_(p)
            elif name.endswith(("attn.proj.weight", "ffn.proj.weight", "ffn.w2")):
                nn.init.normal_(p, 0.0, resid_std)
            else:  # embeddings, qkv, fc, router, expert w1
                nn.init.normal_(p, 0.0, std)

    def num_params(self) -> int:
        """Parameters, with the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward) for MFU: GPTConfig.flops_per_token."""
        return self.config.flops_per_token(seq_len)

    def _bf16_residual(self, x_BTD: torch.Tensor) -> bool:
        """Whether the residual stream between blocks is kept in bf16: on the fused path (CUDA, kernels on)
        under bf16 autocast, unless config.fp32_residual. Each add and norm in the kernel still computes in
        fp32; only the stored stream and its gradient are bf16, which saves about 190 MB of traffic per
        add + norm per step at baseline's batch 512 (H200: 10.56 -> 10.08 ms per step; the default run's
        best validation loss 0.4805 -> 0.4792). MoE blocks' plain add after the experts then adds in bf16
        too (H100: falcon 16.70 -> 15.63 ms per step at batch 512, 3.10 -> 3.01 ms at 64; the study's best
        validation loss 0.4658-0.4662 -> 0.4665; docs/performance.md), unless config.moe_fused_blocks is
        false. fp16 keeps an fp32 stream: it lacks fp32's exponent range."""
        c = self.config
        return (not c.fp32_residual and c.fused_blocks and residual_norm_fused(x_BTD)
                and torch.get_autocast_dtype("cuda") == torch.bfloat16)

    def _trunk(self, idx_BT, cache: KVCache | None, drop_tokens: bool):
        T = idx_BT.shape[1]
        start = cache.pos if cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than max_seq_len = "
                f"{self.config.max_seq_len}; crop it to the last {self.config.max_seq_len}"
            )
        pos_T = torch.arange(start, start + T, device=idx_BT.device)
        x_BTD = self.emb_drop(self.tok_emb(idx_BT) + self.pos_emb(pos_T))
        if self._bf16_residual(x_BTD):
            x_BTD = x_BTD.to(torch.bfloat16)
        y_BTD = self.blocks[0].ln1(x_BTD)
        stats = []
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            next_norm = self.ln_f if last else self.blocks[i + 1].ln1
            x_BTD, y_BTD, s = block(x_BTD, y_BTD, next_norm, cache, drop_tokens, last)
            stats.append(s)
        if cache is not None:
            cache.pos += T
        return y_BTD, stats

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None) -> dict:
        """Logits (B, T, V) without targets; with targets the losses and, for MoE, routing statistics.

        loss = ce_loss + sum over layers of (aux_loss_coef * balance + z_loss_coef * z). balance_loss and
        z_loss are summed over layers unweighted, dropped_frac is the mean over layers, expert_load is
        (n_layers, n_experts): the fraction of each layer's assignments routed to each expert, kept or
        dropped (the load the balance loss counts; moe.py).
        """
        x_BTD, stats = self._trunk(idx_BT, None, True)
        if targets_BT is None:
            return {"logits": self.lm_head(x_BTD)}
        # The output layer and the loss are one node: on CUDA under autocast a fused kernel that
        # never hands out the logits (see kernels.linear_cross_entropy); call forward(idx) for them.
        ce = linear_cross_entropy(x_BTD.flatten(0, 1), self.lm_head.weight, targets_BT.flatten())
        out = {"loss": ce, "ce_loss": ce}
        if self.config.ffn == "moe":
            c = self.config
            balance = torch.stack([s["balance_loss"] for s in stats]).sum()
            z = torch.stack([s["z_loss"] for s in stats]).sum()
            out["loss"] = ce + c.aux_loss_coef * balance + c.z_loss_coef * z
            out["balance_loss"], out["z_loss"] = balance, z
            out["dropped_frac"] = torch.stack([s["dropped_frac"] for s in stats]).mean()
            out["expert_load"] = torch.stack([s["expert_load"] for s in stats])
        return out

    def new_cache(self, batch_size: int = 1) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(self.config, batch_size, device=p.device, dtype=p.dtype)

    def decode(self, idx_BT: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Inference logits (B, T, V). With a cache, idx_BT continues the cached positions.

        MoE layers route without dropping here: capacity depends on how many tokens share a call,
        which differs between a whole-prompt call and one-token steps, so dropping would make a
        sample depend on how it was chunked (and cached and uncached decoding would disagree).
        """
        x_BTD, _ = self._trunk(idx_BT, cache, False)
        return self.lm_head(x_BTD)
