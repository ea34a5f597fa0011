"""Config resolution for the Snakemake workflow (rules/common.smk), kept here so it is unit-tested.

`check_config` checks the config against config/schema.yaml and then what a JSON schema cannot express
(cross-key rules, per-model overrides), so that bad input fails before any job is submitted, with
the key and the value named. `check_inputs` does the same for the files already on disk.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

from . import schema
from .config import GPTConfig, check_lr_schedule
from .data.pack import check_packed
from .data.sources import check_local_file
from .data.tokenizer import tokenizer_sha256
from .errors import ConfigError


def check_yaml_syntax(path: str | Path) -> None:
    """Parse a config file, if it exists, and name the file, line and column of a YAML mistake:
    Snakemake's own message names neither."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        mark, context = e.problem_mark, ""
        if e.context and e.context_mark:
            context = f" ({e.context} at line {e.context_mark.line + 1})"
        raise ConfigError(f"{path}, line {mark.line + 1}, column {mark.column + 1}: {e.problem}{context}; "
                          "fix the YAML there") from None


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


# Key names that hold credentials: api_key, wandb_key, hf_token, password, client_secret ...
# (special_tokens or max_new_tokens are not: the name must end in the word).
_SECRET = re.compile(r"(^|_)(api_?key|key|token|password|passwd|secret|credentials?)$")


def check_no_secrets(config: dict, where: str = "") -> None:
    """Refuse a key that looks like a credential, without showing its value: config files end up
    in run records, logs and version control."""
    for key, value in config.items():
        name = f"{where}.{key}" if where else str(key)
        # Model names are names, not settings.
        if where != "models" and _SECRET.search(str(key).lower().replace("-", "_")):
            raise ConfigError(
                f"config key {name!r} looks like a secret (API key, token or password); secrets do not go "
                "in config files, which are copied into logs and run records (its value is not shown). "
                "Remove it: W&B reads its key from WANDB_API_KEY in the environment or in a .env file in "
                "the working directory")
        if isinstance(value, dict):
            check_no_secrets(value, name)


def check_config(config: dict, schema_path: str | Path | None = None) -> None:
    """Check `config` before any job runs; raises ConfigError naming the key, the value and the fix.

    First against config/schema.yaml, which holds every bound (so this also runs before Snakemake's
    own validate(), whose errors do not name the key as plainly), then what a schema cannot express:
    cross-key rules and per-model overrides. Defaults are taken into account, not written.
    """
    from snakemake.utils import validate

    path = Path(schema_path) if schema_path is not None else schema.SCHEMA_PATH
    check_no_secrets(config)
    root = schema.load_schema(path)
    schema.check(config, root, root=root)
    config = copy.deepcopy(config)
    validate(config, str(path))  # fills in the defaults: the checks below read every key

    tok = config["tokenizer"]
    n_special = len(tok["special_tokens"])
    if tok["vocab_size"] < 256 + n_special:
        raise ConfigError(f"tokenizer.vocab_size = {tok['vocab_size']} is too small: it must hold the 256 byte "
                          f"tokens plus {n_special} special tokens (>= {256 + n_special})")
    for name in ("<bos>", "<eos>"):
        if name not in tok["special_tokens"]:
            raise ConfigError(f"tokenizer.special_tokens must contain {name!r} (packing wraps each story in <bos> ... <eos>)")
    seq_len = config["packing"]["seq_len"]
    for model in config["models"]:
        where = f"models.{model}"
        try:  # the model's own validation
            mcfg = GPTConfig.from_dict(model_params(config, model))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e
        if seq_len > mcfg.max_seq_len:
            raise ConfigError(f"packing.seq_len = {seq_len} is above {where}.max_seq_len = {mcfg.max_seq_len}; "
                              f"lower packing.seq_len or raise max_seq_len")
        train = train_params(config, model)
        # The top-level section passed above, so what fails here comes from the model's overrides.
        schema.check(train, root["$defs"]["train"], prefix=f"{where}.train", root=root)
        check_lr_schedule(train["lr"], train["min_lr"], model)
        gpus, max_gpus = train["gpus"], train["max_gpus"]
        if gpus > max_gpus:
            raise ConfigError(f"train.gpus = {gpus} (model {model}) is more than train.max_gpus = {max_gpus}, the most "
                              f"one job may ask for on this cluster; lower train.gpus or raise train.max_gpus")
        if train["batch_size"] % gpus:
            raise ConfigError(f"train.batch_size = {train['batch_size']} (model {model}) must be divisible by "
                              f"train.gpus = {gpus}: the global batch is split evenly across GPUs")


def check_inputs(config: dict, *, raw_dir: str, tokenizer_dir: str, packed_dir: str, splits: list[str]) -> None:
    """Check the inputs on disk against their records before any job runs; raises naming the file.

    Snakemake deletes a job's outputs before the job checks its inputs, so a rerun failing on a bad
    input would already have lost the last good model. Cheap: only the tokenizer (small) is hashed;
    a packed split is checked by size and the tokenizer sha256 its meta records, and only when
    Snakemake would use it as it is (no input newer or missing: else it is repacked anyway).
    """
    ds = config["dataset"]
    if ds["source"] == "local":
        for split in ("train", "validation"):
            check_local_file(split, ds["local"][split], ds["text_column"])
    tokenizer = Path(tokenizer_dir) / "tokenizer.json"
    if not (tokenizer.is_file() and tokenizer.with_name("tokenizer_meta.json").is_file()):
        return  # rebuilt by train_tokenizer
    sha = tokenizer_sha256(tokenizer)
    for split in splits:
        packed = Path(packed_dir) / f"{split}.bin"
        inputs = [tokenizer, Path(raw_dir) / f"{split}.txt"]
        if not packed.is_file() or any(not p.is_file() or p.stat().st_mtime > packed.stat().st_mtime for p in inputs):
            continue
        check_packed(packed, tokenizer_sha256=sha, tokenizer_path=tokenizer)
