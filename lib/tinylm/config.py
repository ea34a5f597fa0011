"""Model and training configuration: GPTConfig, TrainConfig and their validation, without torch.

Their defaults and bounds are those of config/schema.yaml (tinylm.schema), which the workflow's config
is checked against too. Snakemake imports this when it checks the workflow config, which happens on
every `snakemake` call and at the start of every cluster job; keeping torch out keeps those fast.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import MISSING, dataclass, field

from . import schema
from .errors import ConfigError

# Seconds between progress lines while a run trains (0 = none): an environment variable, not a config
# key, because the config's train section is rule train_model's parameters and a change retrains.
PROGRESS_ENV, PROGRESS_SEC = "TINYLM_PROGRESS_SEC", 10.0


def progress_interval() -> float:
    """The progress interval from $TINYLM_PROGRESS_SEC, else (unset or empty) PROGRESS_SEC. Training reads it; the workflow
    checks it before any job when a model is to be trained, so a value it cannot use stops no job halfway."""
    text = os.environ.get(PROGRESS_ENV, "").strip() or str(PROGRESS_SEC)  # set but empty: as unset
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0 or math.isinf(value):
        raise ConfigError(f"{PROGRESS_ENV} = {text!r}: give the seconds between progress lines while "
                          f"training, e.g. 10 (0 = no progress lines)")
    return value


FFN_TYPES = tuple(schema.section("model")["properties"]["ffn"]["enum"])
# Keys a workflow model entry may nest under `moe:` (flattened by GPTConfig.from_dict).
MOE_KEYS = tuple(schema.section("moe")["properties"])


# Settings that do not change the math of a run: a resume may differ in these.
RESUME_FREE_KEYS = ("device", "compile", "compile_eval", "gpus", "max_gpus", "log_every", "save_every", "wandb")
# Of those, the ones that change only what a run records and reports, not a number it computes:
# changing them does not retrain a finished run (rules/train.smk passes them apart).
RECORD_ONLY_KEYS = ("log_every", "save_every", "max_gpus", "wandb")

def legacy_defaults(saved: dict) -> dict:
    """Keys added after checkpoints were first written, each with the value that reproduces how a model
    saved without it (flat model config `saved`) ran; checkpoint.py reads old checkpoints with these
    filled in. MoE blocks ran both adds plain on an fp32 stream until moe_fused_blocks; dense blocks
    never read it, so a dense checkpoint gets today's default and resumes under today's config."""
    return {"fp32_residual": True, "moe_fused_blocks": saved.get("ffn") != "moe"}


def model_schema() -> dict:
    """The schema of GPTConfig's flat form: the model and moe keys of config/schema.yaml, and
    tokenizer.vocab_size. GPTConfig checks its types and bounds against it, as the workflow checks a
    model entry against the same keys; the rules across keys are GPTConfig's own."""
    model = {k: v for k, v in schema.section("model")["properties"].items() if k not in ("moe", "train", "seeds")}
    return {"type": "object", "properties": {"vocab_size": schema.section("tokenizer")["properties"]["vocab_size"],
                                             **model, **schema.section("moe")["properties"]}}


def model_defaults() -> dict:
    """GPTConfig's defaults: the model and moe keys of config/schema.yaml, and tokenizer.vocab_size."""
    out = {**schema.defaults("model"), **schema.defaults("moe")}
    del out["train"]  # a model entry's overrides of the train section, not a model setting
    return {"vocab_size": schema.defaults("tokenizer")["vocab_size"], **out}


_M, _T = model_defaults(), schema.defaults("train")
_MODEL_SCHEMA = model_schema()
# Settings of type number: kept as floats, whether given as 1 or 1.0.
_NUMBERS = tuple(k for k, spec in _MODEL_SCHEMA["properties"].items() if spec.get("type") == "number")


@dataclass(kw_only=True)
class GPTConfig:
    """One GPT, dense or MoE. Defaults: config/schema.yaml (model and moe keys, tokenizer.vocab_size)."""

    vocab_size: int = _M["vocab_size"]  # tokenizer vocabulary (ids 0..vocab_size-1)
    max_seq_len: int = _M["max_seq_len"]  # learned positions: the longest context the model reads
    d_model: int  # embedding and residual width
    n_layers: int  # transformer blocks
    n_heads: int  # attention heads; must divide d_model
    d_ff: int  # hidden width of the dense MLP
    ffn: str = _M["ffn"]  # feed-forward slot: "dense" MLP or "moe" Mixture of Experts
    n_experts: int = _M["n_experts"]  # MoE: experts per layer
    top_k: int = _M["top_k"]  # MoE: experts each token is routed to
    capacity_factor: float = _M["capacity_factor"]  # MoE: slots per expert = ceil(cf * tokens * top_k / n_experts)
    drop_tokens: bool = _M["drop_tokens"]  # MoE: drop assignments beyond capacity (False: capacity = tokens)
    aux_loss_coef: float = _M["aux_loss_coef"]  # MoE: weight of the load-balance loss in the total loss
    z_loss_coef: float = _M["z_loss_coef"]  # MoE: weight of the router z-loss in the total loss
    d_ff_expert: int | None = _M["d_ff_expert"]  # MoE: hidden width of each expert; None = d_ff // top_k
    dropout: float = _M["dropout"]  # on embeddings, attention weights and residual branches
    # Under bf16 autocast on CUDA, models keep the residual stream between blocks in bf16 (each fused add
    # and norm computed in fp32 inside the kernel); true keeps it in fp32, as autocast alone does.
    fp32_residual: bool = _M["fp32_residual"]
    # MoE models: the add after attention fused and the stream as above (true), or both adds plain on an
    # fp32 stream, as before 2026-12-06 (false; checkpoints saved then load with it).
    moe_fused_blocks: bool = _M["moe_fused_blocks"]

    def __post_init__(self):
        """The schema's types and bounds (model_schema), then the rules across keys."""
        try:
            schema.check(self.to_dict(), _MODEL_SCHEMA)
        except ConfigError as e:
            raise ConfigError(f"model config: {e}", key=e.key, first=e.first) from None
        for key in _NUMBERS:
            setattr(self, key, float(getattr(self, key)))
        checks = [
            (
                "n_heads",
                self.d_model % self.n_heads != 0,
                f"does not divide d_model = {self.d_model}",
            ),
            ("top_k", self.top_k > self.n_experts, f"is above n_experts = {self.n_experts}"),
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
    def fused_blocks(self) -> bool:
        """Whether the blocks take the fused add after attention and may keep a bf16 stream: dense ones
        always, MoE ones unless moe_fused_blocks is false (how they ran before 2026-12-06)."""
        return self.ffn == "dense" or self.moe_fused_blocks

    @property
    def expert_hidden(self) -> int:
        """Hidden width of one expert (d_ff_expert, or d_ff // top_k to keep active compute near dense)."""
        return self.d_ff_expert if self.d_ff_expert is not None else self.d_ff // self.top_k

    def flops_per_token(self, seq_len: int, padded: bool = False) -> int:
        """Training FLOPs per token (forward + backward): 6 * N + 12 * n_layers * d_model * seq_len.

        N counts the matmul weights one token passes through: per layer the attention (4 * D^2) and the
        feed-forward (dense: 2 * D * d_ff; MoE: the router D * E plus top_k experts' 2 * D * d_ff_expert),
        plus the tied lm_head (V * D). Embedding lookups, biases and norms are left out. The attention
        term is the PaLM/nanoGPT one: QK^T and AV over seq_len positions, counted in full although the
        causal mask skips half of them. The benchmark's MFU uses it as it is. `padded`: the experts'
        products over every slot they run, as the step does (moe.py): capacity_factor times the routed
        tokens with drop_tokens, else every token through every expert (n_experts / top_k times), which
        is also the most with drop_tokens (a queue holds at most every token); the workflow's training
        order (workflow.training_order) uses that.
        """
        if self.ffn == "moe":
            experts = self.top_k * 2 * self.d_model * self.expert_hidden
            if padded:
                every = self.n_experts / self.top_k
                experts *= min(self.capacity_factor, every) if self.drop_tokens else every
            ffn = self.d_model * self.n_experts + experts
        else:
            ffn = 2 * self.d_model * self.d_ff
        n = self.n_layers * (4 * self.d_model * self.d_model + ffn) + self.vocab_size * self.d_model
        return round(6 * n + 12 * self.n_layers * self.d_model * seq_len)

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
    """The train section: its defaults, bounds and descriptions are `$defs/train` in config/schema.yaml."""

    device: str = _T["device"]
    precision: str = _T["precision"]
    compile: bool = _T["compile"]
    compile_eval: bool = _T["compile_eval"]
    batch_size: int = _T["batch_size"]
    max_steps: int = _T["max_steps"]
    lr: float = _T["lr"]
    min_lr: float = _T["min_lr"]
    warmup_steps: int = _T["warmup_steps"]
    weight_decay: float = _T["weight_decay"]
    beta1: float = _T["beta1"]
    beta2: float = _T["beta2"]
    grad_clip: float = _T["grad_clip"]
    eval_every: int = _T["eval_every"]
    eval_rows: int | None = _T["eval_rows"]
    save_every: int = _T["save_every"]
    log_every: int = _T["log_every"]
    patience: int = _T["patience"]
    min_delta: float = _T["min_delta"]
    min_step: int = _T["min_step"]
    seed: int = _T["seed"]
    gpus: int = _T["gpus"]
    max_gpus: int = _T["max_gpus"]
    wandb: dict = field(default_factory=lambda: copy.deepcopy(_T["wandb"]))

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
        """The schema's types and bounds, then what a schema cannot express."""
        schema.check(self.to_dict(), schema.section("train"), prefix="train")
        check_lr_schedule(self.lr, self.min_lr)
        if self.gpus > self.max_gpus:
            raise ConfigError(f"train.gpus = {self.gpus} is invalid: must be <= train.max_gpus ({self.max_gpus})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def math_dict(self, moe: bool = False) -> dict:
        """The settings a resumed run must share with the interrupted one. With a MoE model (`moe`) the
        number of processes is one of them: each routes its share of the batch, with its own capacity."""
        free = [k for k in RESUME_FREE_KEYS if not (moe and k == "gpus")]
        return {k: v for k, v in self.to_dict().items() if k not in free}


def check_lr_schedule(lr: float, min_lr: float, model: str | None = None) -> None:
    """The cosine schedule decays from lr to min_lr: a min_lr above lr would make it climb instead."""
    if min_lr > lr:
        of = f" (model {model})" if model else ""
        raise ConfigError(f"train.min_lr = {min_lr}{of} is above train.lr = {lr}: the learning rate would rise "
                          "during the decay; set min_lr <= lr")


def _bad(key: str, value, why: str) -> ConfigError:
    return ConfigError(f"model config: {key} = {value!r} {why}", key=key)
