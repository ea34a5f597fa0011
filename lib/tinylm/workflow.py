"""Config resolution for the Snakemake workflow (rules/common.smk), kept here so it is unit-tested.

The YAML is validated against config/schema.yaml by Snakemake first; `check_config` then checks what
a JSON schema cannot express (cross-key rules, per-model overrides), so that bad input fails before
any job is submitted, with the key and the value named.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from .errors import ConfigError


def train_params(config: dict, model: str) -> dict:
    """The top-level train section with the model's `train:` overrides applied."""
    merged = copy.deepcopy(config["train"])
    for key, value in (config["models"][model].get("train") or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def model_params(config: dict, model: str) -> dict:
    """The flat GPTConfig dict for `model` (vocab_size from the tokenizer section)."""
    entry = {k: v for k, v in config["models"][model].items() if k != "train"}
    moe = entry.pop("moe", None) or {}
    return {"vocab_size": config["tokenizer"]["vocab_size"], **entry, **moe}


def check_config(config: dict, schema_path: str | Path | None = None) -> None:
    """Cross-key checks; raises ConfigError naming the key, the value and the fix."""
    from .config import (
        GPTConfig,  # the model's own validation: one source of truth (no torch import)
    )

    tok = config["tokenizer"]
    n_special = len(tok["special_tokens"])
    if tok["vocab_size"] < 256 + n_special:
        raise ConfigError(f"tokenizer.vocab_size = {tok['vocab_size']} is too small: it must hold the 256 byte "
                          f"tokens plus {n_special} special tokens (>= {256 + n_special})")
    for name in ("<bos>", "<eos>"):
        if name not in tok["special_tokens"]:
            raise ConfigError(f"tokenizer.special_tokens must contain {name!r} (packing wraps each story in <bos> ... <eos>)")
    seq_len = config["packing"]["seq_len"]
    if seq_len < 1:
        raise ConfigError(f"packing.seq_len = {seq_len} must be >= 1")

    train_schema = None
    if schema_path is not None:
        schema = yaml.safe_load(Path(schema_path).read_text())
        train_schema = {"$ref": "#/$defs/train", "$defs": schema["$defs"]}

    for model in config["models"]:
        where = f"models.{model}"
        try:
            mcfg = GPTConfig.from_dict(model_params(config, model))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e
        if seq_len > mcfg.max_seq_len:
            raise ConfigError(f"packing.seq_len = {seq_len} is above {where}.max_seq_len = {mcfg.max_seq_len}; "
                              f"lower packing.seq_len or raise max_seq_len")
        train = train_params(config, model)
        if train_schema is not None:
            import jsonschema

            try:
                jsonschema.validate(train, train_schema)
            except jsonschema.ValidationError as e:
                key = ".".join(str(p) for p in e.absolute_path) or "train"
                raise ConfigError(f"{where}.train (merged with train): {key}: {e.message}") from None
        gpus, max_gpus = train["gpus"], train["max_gpus"]
        if gpus < 1:
            raise ConfigError(f"train.gpus = {gpus} (model {model}) must be >= 1")
        if gpus > max_gpus:
            raise ConfigError(f"train.gpus = {gpus} (model {model}) is more than train.max_gpus = {max_gpus}, the most "
                              f"one job may ask for on this cluster; lower train.gpus or raise train.max_gpus")
        if train["batch_size"] % gpus:
            raise ConfigError(f"train.batch_size = {train['batch_size']} (model {model}) must be divisible by "
                              f"train.gpus = {gpus}: the global batch is split evenly across GPUs")
