"""Model and training configuration: GPTConfig, TrainConfig and their validation, without torch.

Snakemake imports this when it checks the workflow config, which happens on every `snakemake`
call and at the start of every cluster job; keeping torch out keeps those fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field

from .errors import ConfigError

FFN_TYPES = ("dense", "moe")
# Keys a workflow model entry may nest under `moe:` (flattened by GPTConfig.from_dict).
MOE_KEYS = (
    "n_experts",
    "top_k",
    "capacity_factor",
    "drop_tokens",
    "aux_loss_coef",
    "z_loss_coef",
    "d_ff_expert",
)
_SIZES = (
    "vocab_size",
    "max_seq_len",
    "d_model",
    "n_layers",
    "n_heads",
    "d_ff",
    "n_experts",
    "top_k",
)
_NUMBERS = ("capacity_factor", "aux_loss_coef", "z_loss_coef", "dropout")


# Settings that do not change the math of a run: a resume may differ in these.
RESUME_FREE_KEYS = ("device", "compile", "gpus", "max_gpus", "log_every", "save_every", "wandb")

# Keys added after checkpoints were first written, each with the value that reproduces how a model
# saved without it ran (checkpoint.py reads old checkpoints with these filled in).
LEGACY_DEFAULTS = {"fp32_residual": True}


@dataclass(kw_only=True)
class GPTConfig:
    vocab_size: int = 8192  # tokenizer vocabulary (ids 0..vocab_size-1)
    max_seq_len: int = 128  # learned positions: the longest context the model reads
    d_model: int  # embedding and residual width
    n_layers: int  # transformer blocks
    n_heads: int  # attention heads; must divide d_model
    d_ff: int  # hidden width of the dense MLP
    ffn: str = "dense"  # feed-forward slot: "dense" MLP or "moe" Mixture of Experts
    n_experts: int = 8  # MoE: experts per layer
    top_k: int = 2  # MoE: experts each token is routed to
    capacity_factor: float = 1.25  # MoE: slots per expert = ceil(cf * tokens * top_k / n_experts)
    drop_tokens: bool = True  # MoE: drop assignments beyond capacity (False: capacity = tokens)
    aux_loss_coef: float = 0.01  # MoE: weight of the load-balance loss in the total loss
    z_loss_coef: float = 1e-3  # MoE: weight of the router z-loss in the total loss
    d_ff_expert: int | None = None  # MoE: hidden width of each expert; None = d_ff // top_k
    dropout: float = 0.0  # on embeddings, attention weights and residual branches
    # Under bf16 autocast on CUDA, dense models keep the residual stream between blocks in bf16 (each add
    # and norm computed in fp32 inside the fused kernels); true keeps it in fp32, as autocast alone does.
    fp32_residual: bool = False

    def __post_init__(self):
        for key in _SIZES + (("d_ff_expert",) if self.d_ff_expert is not None else ()):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _bad(key, value, "must be a positive integer")
        for key in _NUMBERS:
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise _bad(key, value, "must be a number")
            setattr(self, key, float(value))
        checks = [
            ("drop_tokens", not isinstance(self.drop_tokens, bool), "must be true or false"),
            ("fp32_residual", not isinstance(self.fp32_residual, bool), "must be true or false"),
            (
                "ffn",
                self.ffn not in FFN_TYPES,
                f"is not a feed-forward type; use one of {FFN_TYPES}",
            ),
            (
                "n_heads",
                self.d_model % self.n_heads != 0,
                f"does not divide d_model = {self.d_model}",
            ),
            ("top_k", self.top_k > self.n_experts, f"is above n_experts = {self.n_experts}"),
            ("capacity_factor", self.capacity_factor <= 0, "must be > 0"),
            ("aux_loss_coef", self.aux_loss_coef < 0, "must be >= 0"),
            ("z_loss_coef", self.z_loss_coef < 0, "must be >= 0"),
            ("dropout", not 0 <= self.dropout < 1, "must be in [0, 1)"),
            (
                "d_ff_expert",
                self.ffn == "moe" and self.expert_hidden < 1,
                f"and d_ff // top_k = {self.d_ff} // {self.top_k} is 0; set d_ff_expert",
            ),
        ]
        for key, failed, why in checks:
            if failed:
                raise _bad(key, getattr(self, key), why)

    @property
    def expert_hidden(self) -> int:
        """Hidden width of one expert (d_ff_expert, or d_ff // top_k to keep active compute near dense)."""
        return self.d_ff_expert if self.d_ff_expert is not None else self.d_ff // self.top_k

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """Build from the flat form or the workflow's model entry (a nested `moe:` dict is flattened)."""
        if not isinstance(d, dict):
            raise ConfigError(f"model config: expected a mapping, got {type(d).__name__}")
        flat = {k: v for k, v in d.items() if k != "moe"}
        moe = d.get("moe") or {}
        if not isinstance(moe, dict):
            raise ConfigError(f"model config: moe = {moe!r} must be a mapping")
        for k, v in moe.items():
            if k not in MOE_KEYS:
                raise ConfigError(f"model config: unknown key moe.{k} = {v!r}; known: {MOE_KEYS}")
            if k in flat:
                raise ConfigError(
                    f"model config: {k} is given both at the top level and under moe:"
                )
            flat[k] = v
        fields = dataclasses.fields(cls)
        for k, v in flat.items():
            if k not in {f.name for f in fields}:
                known = [f.name for f in fields]
                raise ConfigError(f"model config: unknown key {k} = {v!r}; known: {known}")
        missing = [f.name for f in fields if f.default is MISSING and f.name not in flat]
        if missing:
            raise ConfigError(f"model config: missing key(s) {missing}")
        return cls(**flat)

    def to_dict(self) -> dict:
        """The flat form (JSON-able); from_dict(to_dict()) gives an equal config."""
        return dataclasses.asdict(self)


@dataclass
class TrainConfig:
    """Mirrors `$defs/train` in config/schema.yaml (which holds the defaults and descriptions)."""

    device: str = "auto"
    precision: str = "bf16"
    compile: bool = True
    batch_size: int = 64
    max_steps: int = 20000
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 200
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_rows: int | None = 8192
    save_every: int = 1000
    log_every: int = 50
    patience: int = 0
    min_delta: float = 0.0
    min_step: int = 0
    seed: int = 42
    gpus: int = 1
    max_gpus: int = 8
    wandb: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"train: unknown key(s) {unknown}; allowed: {sorted(names)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        checks = [
            (self.device in ("auto", "cuda", "cpu"), "device", "auto, cuda or cpu"),
            (self.precision in ("bf16", "fp16", "fp32"), "precision", "bf16, fp16 or fp32"),
            (self.batch_size >= 1, "batch_size", ">= 1"),
            (self.max_steps >= 1, "max_steps", ">= 1"),
            (self.lr > 0 and self.min_lr >= 0, "lr", "lr > 0 and min_lr >= 0"),
            (self.gpus >= 1, "gpus", ">= 1"),
            (self.gpus <= self.max_gpus, "gpus", f"<= train.max_gpus ({self.max_gpus})"),
            (self.eval_every >= 1 and self.save_every >= 1 and self.log_every >= 1, "eval_every/save_every/log_every", ">= 1"),
        ]
        for ok, key, want in checks:
            if not ok:
                raise ConfigError(f"train.{key} = {getattr(self, key.split('/')[0], None)!r} is invalid: must be {want}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def math_dict(self) -> dict:
        """The settings a resumed run must share with the interrupted one."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUME_FREE_KEYS}


def _bad(key: str, value, why: str) -> ConfigError:
    return ConfigError(f"model config: {key} = {value!r} {why}")
