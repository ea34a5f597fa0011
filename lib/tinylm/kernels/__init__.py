"""Triton kernels for the places where a tiny GPT's training step moves the most memory.

Used on CUDA with bf16/fp16 activations; everywhere else (CPU, fp32, shapes out of range) the same
functions run the plain PyTorch path, which is what the tests compare the kernels with. One module
per fused op, each with its plain reference and the rule that decides which path runs:

attention.py      `causal_attention`, `linear_causal_attention` (the qkv projection + attention)
loss.py           `linear_cross_entropy`: output layer + mean cross-entropy in one autograd node
residual_norm.py  `residual_layer_norm`: output projection + residual add + LayerNorm
gelu.py           `linear_gelu`: first feed-forward layer + GELU, the bias gradient in its backward
combine.py        `moe_combine`: the MoE combine without autograd (gather, add the bias, weight, sum)
common.py         Triton (when installed), the switch, the autocast check, the sources' digest

The switch: the environment variable TINYLM_KERNELS. `TINYLM_KERNELS=0` runs the plain PyTorch
paths everywhere; unset (or 1), each op runs its kernels where eligible. It is read at each call
(torch.compile reads it once, when it traces). `disabled()` sets it to 0 for a block.
Measurements behind the kernels and their tile choices: docs/performance.md, "Triton kernels".
"""

from .attention import (
    HEAD_SIZES,
    MAX_T,
    attention_fused,
    causal_attention,
    linear_causal_attention,
    reference_attention,
    split_heads,
)
from .combine import MAX_COMBINE_D, combine_fused, moe_combine, reference_combine
from .common import SWITCH, disabled, enabled, source_digest
from .gelu import gelu_fused, linear_gelu
from .loss import (
    IGNORE,
    MAX_VOCAB,
    cross_entropy_fused,
    linear_cross_entropy,
    reference_cross_entropy,
)
from .residual_norm import MAX_NORM_D, residual_layer_norm, residual_norm_fused

__all__ = [
    "HEAD_SIZES",
    "IGNORE",
    "MAX_COMBINE_D",
    "MAX_NORM_D",
    "MAX_T",
    "MAX_VOCAB",
    "SWITCH",
    "attention_fused",
    "causal_attention",
    "combine_fused",
    "cross_entropy_fused",
    "disabled",
    "enabled",
    "gelu_fused",
    "linear_causal_attention",
    "linear_cross_entropy",
    "linear_gelu",
    "moe_combine",
    "reference_attention",
    "reference_combine",
    "reference_cross_entropy",
    "residual_layer_norm",
    "residual_norm_fused",
    "source_digest",
    "split_heads",
]
