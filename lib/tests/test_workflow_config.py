"""Config resolution and the checks that run before any job: tinylm.workflow and config/*.yaml."""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import math
import os
import re
from pathlib import Path

import pytest
import yaml

from tinylm import schema
from tinylm.config import MOE_KEYS, TrainConfig, model_defaults, model_schema
from tinylm.errors import ConfigError
from tinylm.model import GPT, GPTConfig
from tinylm.workflow import (
    check_config,
    check_cuda_here,
    expand_runs,
    merge_config,
    model_params,
    reference_setting,
    train_params,
    training_order,
)

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "config" / "schema.yaml"


@pytest.fixture()
def config():
    from snakemake.utils import validate

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    validate(cfg, str(SCHEMA))
    return cfg


def test_default_config_passes_and_presets_have_the_original_sizes(config):
    check_config(config, SCHEMA)
    sizes = {
        m: GPT(GPTConfig.from_dict(model_params(config, m))).num_params() for m in config["models"]
    }
    assert sizes == {"baseline": 6_868_992, "falcon": 16_347_648, "condor": 2_460_544}


def test_model_train_overrides_merge_over_the_train_section(config):
    assert train_params(config, "condor")["eval_every"] == 1000
    assert train_params(config, "baseline")["eval_every"] == 500
    assert train_params(config, "condor")["lr"] == config["train"]["lr"]
    config["models"]["condor"]["train"]["wandb"] = {"mode": "offline"}
    merged = train_params(config, "condor")
    assert merged["wandb"]["mode"] == "offline" and merged["wandb"]["project"] == "tinylm"
    assert config["train"]["wandb"]["mode"] == "online"  # the shared section is not modified


def test_demo_config_merges_and_passes():
    from snakemake.utils import update_config, validate

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    update_config(cfg, yaml.safe_load((ROOT / "config" / "demo.yaml").read_text()))
    validate(cfg, str(SCHEMA))
    check_config(cfg, SCHEMA)
    assert cfg["models"]["falcon"]["ffn"] == "moe" and cfg["dataset"]["source"] == "synthetic"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["train"].update(gpus=0), r"train\.gpus = 0 .*must be >= 1"),
        (lambda c: c["train"].update(gpus=16), r"train\.gpus = 16 .*train\.max_gpus = 8"),
        (lambda c: c["train"].update(gpus=3), r"batch_size = 64 .*divisible by train\.gpus = 3"),
        (lambda c: c["packing"].update(seq_len=0), r"packing\.seq_len = 0 must be >= 1"),
        (
            lambda c: c["packing"].update(seq_len=256),
            r"packing\.seq_len = 256 is above models\.\w+\.max_seq_len = 128",
        ),
        (
            lambda c: c["tokenizer"].update(vocab_size=200),
            r"tokenizer\.vocab_size = 200 is too small.*at least 260",
        ),
        (
            lambda c: c["tokenizer"].update(special_tokens=["<pad>", "<eos>"]),
            r"special_tokens = \['<pad>', '<eos>'\] lacks <bos>; packing needs both",
        ),
        (  # refused before the tokenizer is trained, not by the packing job after it
            lambda c: (c["tokenizer"].update(vocab_size=70000), c["packing"].update(dtype="uint16")),
            r"packing\.dtype = uint16 cannot hold the ids of tokenizer\.vocab_size = 70000 \(up to 69999; "
            r"uint16 holds up to 65535\); set packing\.dtype: auto or int32",
        ),
        (lambda c: c["models"]["baseline"].update(n_heads=3), r"models\.baseline: .*n_heads"),
        (
            lambda c: c["models"]["baseline"].update(ffn="conv"),
            r"models\.baseline\.ffn = 'conv' must be one of dense, moe",
        ),
        (lambda c: c["models"]["falcon"]["moe"].update(top_k=9), r"models\.falcon: .*top_k"),
        (
            lambda c: c["models"]["baseline"].update(dropout=1.0),
            r"models\.baseline\.dropout = 1\.0 must be < 1",
        ),
        (
            lambda c: c["models"]["falcon"]["moe"].update(capacity_factor=0),
            r"models\.falcon\.moe\.capacity_factor = 0 must be > 0",
        ),
        (
            lambda c: c["models"]["condor"]["train"].update(lr="fast"),
            r"models\.condor\.train\.lr: 'fast' is not of type 'number' \(config",
        ),
        (  # what YAML makes of `lr: 1e-3`
            lambda c: c["train"].update(lr="1e-3"),
            r"train\.lr: '1e-3' is not of type 'number': YAML reads 1e-3 as text; write 1\.0e-3 \(a point",
        ),
        (lambda c: c["train"].update(lr="1.0e3"), r"YAML reads 1\.0e3 as text; write 1\.0e\+3 \("),
        (  # quoted, or from --config
            lambda c: c["train"].update(lr="0.001"),
            r"train\.lr: '0\.001' is not of type 'number': a number in quotes, or given with --config",
        ),
        (lambda c: c["train"].update(lr="inf"), r"train\.lr: 'inf' is not of type 'number' \(config/schema"),
        (
            lambda c: c["models"]["condor"]["train"].update(bogus=1),
            r"unknown key 'bogus' in models\.condor\.train; ",
        ),
        (lambda c: c["train"].update(seed=-1), r"train\.seed = -1 must be >= 0"),
        (lambda c: c["eval"].update(seed=-1), r"eval\.seed = -1 must be >= 0"),
        (lambda c: c["dataset"].update(seed=-1), r"dataset\.seed = -1 must be >= 0"),
        (lambda c: c["dataset"]["synthetic"].update(seed=-5), r"dataset\.synthetic\.seed = -5 must be >= 0"),
        (lambda c: c["models"]["condor"]["train"].update(seed=-1), r"models\.condor\.train\.seed = -1 must be >= 0"),
        # a run's seed is its train.seed: a negative one would pass here and fail in the training job
        (lambda c: c["models"]["condor"].update(seeds=[1, -2]), r"models\.condor\.seeds\[1\] = -2 must be >= 0"),
        (lambda c: c.update(sweeps={"s": {"model": "condor", "grid": {"train.lr": [1.0e-3]}, "seeds": [-1, 5]}}),
         r"sweeps\.s\.seeds\[0\] = -1 must be >= 0"),
        # torch.manual_seed takes at most 2**64 - 1: a larger seed passed here and failed in the job
        (lambda c: c["train"].update(seed=2**64), r"train\.seed = 18446744073709551616 must be <= 18446744073709551615"),
        (lambda c: c["eval"].update(seed=2**64), r"eval\.seed = 18446744073709551616 must be <= "),
        (lambda c: c["models"]["condor"].update(seeds=[1, 2**64]), r"models\.condor\.seeds\[1\] = 18446744073709551616 must be <= "),
        (lambda c: c.update(sweeps={"s": {"model": "condor", "grid": {"train.lr": [1.0e-3]}, "seeds": [2**70]}}),
         r"sweeps\.s\.seeds\[0\] = 1180591620717411303424 must be <= "),
        (lambda c: c["train"].update(beta2=1.0), r"train\.beta2 = 1\.0 must be < 1"),
        (lambda c: c["train"].update(beta1=1), r"train\.beta1 = 1 must be < 1"),
        (
            lambda c: c["train"].update(min_lr=1e-3),
            r"train\.min_lr = 0\.001 \(model baseline\) is above train\.lr = 0\.0003.*min_lr <= lr",
        ),
        (
            lambda c: c["models"]["condor"]["train"].update(lr=1e-5),
            r"train\.min_lr = 3e-05 \(model condor\) is above train\.lr = 1e-05",
        ),
        (lambda c: c.update(trian={"lr": 1}), r"^unknown key 'trian' in config \(did you mean 'train'\?\)"),
        (lambda c: c["train"].update(bach_size=3), r"unknown key 'bach_size' in train \(did you mean 'batch_size'\?\)"),
        (
            lambda c: c["models"]["falcon"]["moe"].update(n_expert=3),
            r"unknown key 'n_expert' in models\.falcon\.moe \(did you mean 'n_experts'\?\)",
        ),
        (lambda c: c["models"]["baseline"].update(n_head=4), r"unknown key 'n_head' in models\.baseline \(did you mean"),
        # names from nanoGPT and Hugging Face configs point to tinylm's, where spelling alone would not
        (lambda c: c["train"].update(learning_rate=1.0), r"unknown key 'learning_rate' in train \(did you mean 'lr'\?\)"),
        (lambda c: c["models"]["baseline"].update(n_embd=64), r"'n_embd' in models\.baseline \(did you mean 'd_model'\?\)"),
        (lambda c: c["models"]["baseline"].update(block_size=64), r"\(did you mean 'max_seq_len'\?\)"),
        (lambda c: c["models"]["falcon"]["moe"].update(num_experts_per_tok=1), r"\(did you mean 'top_k'\?\)"),
        (lambda c: c.update(zzz=1), r"unknown key 'zzz' in config; the keys allowed there: dataset, tokenizer"),
        # Snakemake's --config 'train={max_steps: 10}' passes every value as text
        (lambda c: c["train"].update(max_steps="10"),
         r"train\.max_steps: '10' is not of type 'integer': a number in quotes, or given with --config"),
        (lambda c: c["train"].update(lr="0.001"), r"train\.lr: '0\.001' is not of type 'number': a number in quotes"),
        # YAML 1.1 reads 2e4 as text, and an integer key gets the whole number to write instead
        (lambda c: c["train"].update(max_steps="2e4"),
         r"train\.max_steps: '2e4' is not of type 'integer': YAML reads 2e4 as text; write 20000 \("),
        # YAML's .nan and .inf are floats that every bound lets through (nan compares false)
        (lambda c: c["train"].update(lr=float("nan")), r"train\.lr = nan: give a finite number"),
        (lambda c: c["train"].update(lr=float("inf")), r"train\.lr = inf: give a finite number"),
        (lambda c: c["eval"].update(temperature=float("nan")), r"eval\.temperature = nan: give a finite number"),
        (lambda c: c["models"]["falcon"]["moe"].update(capacity_factor=float("inf")),
         r"models\.falcon\.moe\.capacity_factor = inf: give a finite number"),
        (lambda c: c["dataset"].update(name=float("nan")), r"dataset\.name: nan is not of type 'string'"),
        (lambda c: c["models"].update(condor=None),  # meant as "off": YAML's null, and the way to turn one off
         r"models\.condor: null is not of type 'object'; to train no run of this model, give it `seeds: \[\]` "
         r"\(removed from an override file, its entry in the config under it still trains\)"),
        (lambda c: c["train"].update(wandb=None), r"train\.wandb: null is not of type 'object' \("),
        # a whole number written with a point is a float: the jobs' own checks refuse it, and Snakemake
        # sees a changed data parameter (100.0 against 100) and deletes the data before its job refuses it
        (lambda c: c["dataset"].update(test_n=100.0),
         r"dataset\.test_n: 100\.0 is not of type 'integer': write 100, without the point"),
        (lambda c: c["train"].update(max_steps=30.0), r"train\.max_steps: 30\.0 is not of type 'integer': write 30,"),
        (lambda c: c["models"]["condor"].update(seeds=[1.0]), r"models\.condor\.seeds\[0\]: 1\.0 is not of type 'integer'"),
        (lambda c: c["packing"].update(seq_len=64.5), r"packing\.seq_len: 64\.5 is not of type 'integer' \(config"),
        # the tokenizer job refuses a repeated special token: refused here, before the download
        (lambda c: c["tokenizer"].update(special_tokens=["<pad>", "<bos>", "<eos>", "<bos>"]),
         r"tokenizer\.special_tokens = \['<pad>', '<bos>', '<eos>', '<bos>'\] holds a token twice"),
        # a name is a folder of data/raw/, artifacts/tokenizers/ and data/processed/: . and .. would leave it
        (lambda c: c["dataset"].update(name=".."), r"dataset\.name: '\.\.' "),
        (lambda c: c["tokenizer"].update(name="."), r"tokenizer\.name: '\.' "),
        # story files named without source: local would not be read: the hub's data would be downloaded and
        # trained on instead, or the synthetic stories generated
        (lambda c: c["dataset"]["local"].update(train="my/train.txt", validation="my/val.txt"),
         r"dataset\.local\.train = 'my/train\.txt' is set, but dataset\.source is hub, which does not read it; "
         r"set dataset\.source: local to train on the file"),
        (lambda c: c["dataset"].update(source="synthetic", local={"validation": "v.jsonl"}),
         r"dataset\.local\.validation = 'v\.jsonl' is set, but dataset\.source is synthetic"),
    ],
)
def test_bad_config_is_refused_naming_the_key(config, edit, message):
    bad = copy.deepcopy(config)
    edit(bad)
    with pytest.raises(ConfigError, match=message):
        check_config(bad, SCHEMA)


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda c: c["train"]["wandb"].update(api_key="SECRET-VALUE-1234"), "train.wandb.api_key"),
        (lambda c: c["models"]["condor"]["train"].update(wandb={"api_key": "SECRET-VALUE-1234"}),
         "models.condor.train.wandb.api_key"),
        (lambda c: c.update(wandb_api_key="SECRET-VALUE-1234"), "wandb_api_key"),
        (lambda c: c.update(wandb={"key": "SECRET-VALUE-1234"}), "wandb.key"),
        (lambda c: c["dataset"].update(hf_token="SECRET-VALUE-1234"), "dataset.hf_token"),
        (lambda c: c["train"].update(password="SECRET-VALUE-1234"), "train.password"),
        (lambda c: c["train"]["wandb"].update(project="SECRET-VALUE-1234", API_KEY=1), "train.wandb.API_KEY"),
        # inside a list, where the schema's error would print the whole list, value and all
        (lambda c: c["eval"].update(prompts=[{"api_key": "SECRET-VALUE-1234"}]), "eval.prompts[0].api_key"),
        (lambda c: c.update(train=[{"wandb": {"api_key": "SECRET-VALUE-1234"}}]), "train[0].wandb.api_key"),
        # a dotted key (`--config wandb.token=...` does not nest it; a sweep's grid key is a path): the
        # last word counts, as after an underscore
        (lambda c: c.update({"wandb.token": "SECRET-VALUE-1234"}), "wandb.token"),
        (lambda c: c.update(sweeps={"s": {"model": "condor", "grid": {"train.password": ["SECRET-VALUE-1234"]}}}),
         "sweeps.s.grid.train.password"),
    ],
)
def test_a_secret_in_the_config_is_refused_without_printing_it(config, edit, key):
    bad = copy.deepcopy(config)
    edit(bad)
    with pytest.raises(ConfigError) as e:
        check_config(bad, SCHEMA)
    message = str(e.value)
    assert f"'{key}'" in message and "WANDB_API_KEY" in message and ".env" in message, message
    assert "SECRET" not in message


def test_keys_that_merely_mention_tokens_are_not_secrets(config):
    assert {"special_tokens", "max_new_tokens", "drop_tokens"} <= {
        *config["tokenizer"], *config["eval"], *config["models"]["falcon"]["moe"]}
    check_config(config, SCHEMA)


def test_model_entry_may_keep_an_fp32_residual_stream(config):
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    # x-default: GPTConfig applies it; Snakemake does not write it into the entry (and its parameters).
    assert "fp32_residual" not in model_params(config, "baseline")
    assert "dropout" not in model_params(config, "baseline")
    assert "moe_fused_blocks" not in model_params(config, "falcon")
    config["models"]["baseline"]["fp32_residual"] = True
    validate(config, str(SCHEMA))
    check_config(config, SCHEMA)
    assert GPTConfig.from_dict(model_params(config, "baseline")).fp32_residual is True
    config["models"]["baseline"]["fp32_residual"] = "yes"
    with pytest.raises(WorkflowError):
        validate(config, str(SCHEMA))


def test_schema_rejects_unknown_keys_and_wrong_types(config):
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    for edit in (
        lambda c: c["train"].update(bogus=1),
        lambda c: c["train"].update(batch_size="64"),
        lambda c: c.update(extra={}),
    ):
        bad = copy.deepcopy(config)
        edit(bad)
        with pytest.raises(WorkflowError):
            validate(bad, str(SCHEMA))


def test_config_yaml_states_the_schema_defaults(config):
    from snakemake.utils import validate

    sections = ("dataset", "tokenizer", "packing", "train", "eval")
    filled = {**{section: {} for section in sections}, "models": config["models"]}
    validate(filled, str(SCHEMA))  # fills in the schema's defaults
    for section in sections:
        assert filled[section] == config[section], section


def test_config_classes_take_their_defaults_from_the_schema():
    assert {f.name for f in dataclasses.fields(TrainConfig)} == set(schema.section("train")["properties"])
    assert TrainConfig().to_dict() == schema.defaults("train")
    model = schema.section("model")
    flat = set(model["properties"]) - {"moe", "train", "seeds"} | set(schema.section("moe")["properties"]) | {"vocab_size"}
    assert {f.name for f in dataclasses.fields(GPTConfig)} == flat
    required = {f.name for f in dataclasses.fields(GPTConfig) if f.default is dataclasses.MISSING}
    assert required == set(model["required"])
    built = GPTConfig(d_model=8, n_layers=1, n_heads=2, d_ff=8).to_dict()
    assert {k: built[k] for k in model_defaults()} == model_defaults()
    assert model_defaults()["vocab_size"] == schema.defaults("tokenizer")["vocab_size"]


def test_train_config_checks_every_schema_bound():
    for key, value, message in [
        ("beta2", 1.5, r"train\.beta2 = 1\.5 must be < 1"),
        ("warmup_steps", -1, r"train\.warmup_steps = -1 must be >= 0"),
        ("precision", "fp8", r"train\.precision = 'fp8' must be one of bf16, fp16, fp32"),
        ("eval_rows", 0, r"train\.eval_rows = 0 must be >= 1"),
        ("beta2", 1.0, r"train\.beta2 = 1\.0 must be < 1"),
        ("min_lr", 0.5, r"train\.min_lr = 0\.5 is above train\.lr = 0\.0003"),
    ]:
        with pytest.raises(ConfigError, match=message):
            TrainConfig.from_dict({key: value})


def _bound_edges(spec: dict):
    """(value at or just inside, value just outside) for each bound and enum of one schema key."""
    if "integer" in spec["type"]:  # a type, or a list of them
        step = lambda v, up: v + 1 if up else v - 1  # noqa: E731
    else:  # the next float
        step = lambda v, up: math.nextafter(v, math.inf if up else -math.inf)  # noqa: E731
    for word, bound in spec.items():
        if word == "minimum":
            yield bound, step(bound, False)
        elif word == "exclusiveMinimum":
            yield step(bound, True), bound
        elif word == "maximum":
            yield bound, step(bound, True)
        elif word == "exclusiveMaximum":
            yield step(bound, False), bound
        elif word == "enum":
            yield from ((value, "not-" + "-".join(bound)) for value in bound)


def test_gpt_config_and_the_workflow_keep_the_same_model_bounds(config):
    """GPTConfig, built from Python, and the workflow's check of a model entry read their bounds from one
    place (config/schema.yaml): over every key with a bound, both refuse the value just outside it,
    naming the key, and GPTConfig takes the value at it (a stricter bound of its own would refuse it).
    The workflow's own rules across sections (vocab_size against the special tokens, seq_len against
    max_seq_len) are its own, so its side is checked for refusals only."""
    # a model whose rules across keys hold at every edge: one head, one expert a token, experts' width set
    base = {"vocab_size": 97, "max_seq_len": 16, "d_model": 32, "n_layers": 2, "n_heads": 1, "d_ff": 64,
            "ffn": "moe", "top_k": 1, "d_ff_expert": 8}
    checked = set()
    for key, spec in model_schema()["properties"].items():
        for inside, outside in _bound_edges(spec):
            checked.add(key)
            assert getattr(GPTConfig(**{**base, key: inside}), key) == inside
            with pytest.raises(ConfigError) as e:
                GPTConfig(**{**base, key: outside})
            assert e.value.key == key and f"{key} = {outside!r}" in str(e.value)

            place = ("tokenizer.vocab_size" if key == "vocab_size" else
                     f"models.falcon.moe.{key}" if key in MOE_KEYS else f"models.falcon.{key}")
            bad = copy.deepcopy(config)
            *parents, last = place.split(".")
            functools.reduce(dict.__getitem__, parents, bad)[last] = outside
            with pytest.raises(ConfigError) as e:
                check_config(bad, SCHEMA)
            assert e.value.key == place and f"{place} = {outside!r}" in str(e.value)
    assert checked >= {"vocab_size", "d_model", "n_heads", "ffn", "top_k", "capacity_factor", "dropout"}


# -- runs: seeds and sweeps --------------------------------------------------------------------------


def merged(*files: str) -> dict:
    """config.yaml with config/<files> merged over it, defaults filled in, as Snakemake has it."""
    from snakemake.utils import update_config, validate

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    for name in files:
        update_config(cfg, yaml.safe_load((ROOT / "config" / name).read_text()))
    validate(cfg, str(SCHEMA))
    return cfg


def test_default_runs_are_the_models_with_their_own_settings(config):
    runs = expand_runs(config, SCHEMA)
    assert list(runs) == list(config["models"])
    for name, run in runs.items():
        assert run["model_config"] == model_params(config, name)
        assert run["train_config"] == train_params(config, name)
        assert (run["model"], run["setting"], run["seed"], run["sweep"], run["values"]) == (name, name, 42, None, {})


def test_training_order_ranks_runs_by_their_estimated_compute(config):
    """1 for the cheapest training (FLOPs per token x tokens), equal estimates share a rank; seeds
    cost the same, and a longer or wider run ranks above its model."""
    config["models"]["condor"]["seeds"] = [42, 7]
    config["sweeps"] = {"w": {"model": "condor", "grid": {"d_model": [512], "train.max_steps": [40000]}}}
    runs = expand_runs(config, SCHEMA)
    order = training_order(runs, seq_len=config["packing"]["seq_len"])
    assert order == {"condor": 1, "condor-seed7": 1, "baseline": 2, "falcon": 3, "condor-d_model512-max_steps40000": 4}
    config["models"]["condor"]["train"] = {"max_steps": 10**9}  # now condor costs the most
    order = training_order(expand_runs(config, SCHEMA), seq_len=config["packing"]["seq_len"])
    assert order["condor"] == max(order.values()) > order["falcon"]


def test_seeds_and_a_sweep_make_one_named_run_each(config):
    config["models"]["condor"]["seeds"] = [42, 7]
    config["models"]["falcon"]["seeds"] = []
    config["sweeps"] = {"lr": {"model": "condor", "grid": {"train.lr": [1.0e-3, 3.0e-3], "d_model": [128]},
                               "seeds": [1, 42]}}
    check_config(config, SCHEMA)
    runs = expand_runs(config, SCHEMA)
    assert list(runs) == ["baseline", "condor", "condor-seed7", "condor-d_model128-lr0.001-seed1",
                          "condor-d_model128-lr0.001", "condor-d_model128-lr0.003-seed1", "condor-d_model128-lr0.003"]
    run = runs["condor-d_model128-lr0.003-seed1"]
    assert (run["model"], run["setting"], run["seed"], run["sweep"]) == ("condor", "condor-d_model128-lr0.003", 1, "lr")
    assert run["values"] == {"d_model": 128, "train.lr": 3.0e-3}
    assert run["model_config"] == {**model_params(config, "condor"), "d_model": 128}
    assert run["train_config"] == {**train_params(config, "condor"), "lr": 3.0e-3, "seed": 1}
    assert runs["condor-seed7"]["train_config"]["seed"] == 7 and runs["condor-seed7"]["setting"] == "condor"

    # Adding values and seeds adds runs and renames none: every run keeps its name and settings.
    config["sweeps"]["lr"]["grid"]["train.lr"].append(1.0e-2)
    config["sweeps"]["lr"]["seeds"].append(3)
    config["models"]["condor"]["seeds"].append(8)
    more = expand_runs(config, SCHEMA)
    assert len(more) == 1 + 3 + 3 * 3 and all(more[name] == run for name, run in runs.items())


def test_a_sweep_grid_is_checked_with_the_rest_of_the_config(config):
    """An unknown grid key or a refused grid value is listed with the config's other refused settings,
    not found in a later pass once those are fixed; so is a nan, which passes every bound and is found
    apart from the schema's rules."""
    config["train"]["lr"] = -1.0
    config["train"]["min_lr"] = float("nan")
    config["sweeps"] = {"s": {"model": "condor", "grid": {"d_modl": [64], "ffn": ["conv"]}},
                        "t": {"model": "condr", "grid": {"d_model": [64]}}}
    with pytest.raises(ConfigError) as e:
        check_config(config, SCHEMA)
    lines = str(e.value).splitlines()
    assert lines[0].startswith("5 settings refused (config/schema.yaml describes each key"), str(e.value)
    assert re.fullmatch(r"  train\.lr = -1\.0 must be > 0", lines[1])
    assert re.fullmatch(r"  train\.min_lr = nan: give a finite number .*", lines[2])
    assert re.match(r"  sweeps\.s\.grid: unknown key 'd_modl'.*'d_model'", lines[3])
    assert re.fullmatch(r"  sweeps\.s\.grid\.ffn\[0\] = 'conv' must be one of dense, moe", lines[4])
    assert re.fullmatch(r"  sweeps\.t\.model = 'condr' is not a model under models: .*did you mean 'condor'\?", lines[5])
    assert e.value.key == "train.lr"


@pytest.mark.parametrize(
    ("grid", "first", "lines"),
    [  # every refused value of a key, each once, by its place in the list; the schema's note kept
        ({"ffn": ["dense", "conv", "foo"]}, "2 settings refused (config/schema.yaml describes each key",
         [r"sweeps\.s\.grid\.ffn\[1\] = 'conv' must be one of", r"sweeps\.s\.grid\.ffn\[2\] = 'foo' must be one of"]),
        ({"train.lr": [0.001, float("nan")]}, "sweeps.s.grid.train.lr[1] = nan: give a finite number", []),
        ({"train.lr": [-1.0, 0.5], "train.min_lr": [float("nan")]},
         "2 settings refused (config/schema.yaml describes each key",
         [r"train\.lr\[0\] = -1\.0 must be > 0", r"train\.min_lr\[0\] = nan: give a finite number"]),
    ],
)
def test_refused_grid_values_are_each_named_once(config, grid, first, lines):
    config["sweeps"] = {"s": {"model": "condor", "grid": grid}}
    with pytest.raises(ConfigError) as e:
        check_config(config, SCHEMA)
    message = str(e.value).splitlines()
    assert message[0].startswith(first), str(e.value)
    assert len(message) == (1 + len(lines) if lines else 1), str(e.value)
    for pattern in lines:
        assert sum(bool(re.search(pattern, line)) for line in message[1:]) == 1, (pattern, str(e.value))


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"model": "condr", "grid": {"train.lr": [1.0]}}, r"sweeps\.s\.model = 'condr' .*did you mean 'condor'"),
        ({"model": "condor", "grid": {"train.lrr": [1.0]}}, r"sweeps\.s\.grid: unknown key 'train\.lrr'.*'train\.lr'"),
        ({"model": "condor", "grid": {"d_modl": [64]}}, r"sweeps\.s\.grid: unknown key 'd_modl'.*'d_model'"),
        ({"model": "condor", "grid": {"moe.top": [1]}}, r"unknown key 'moe\.top'.*'moe\.top_k'"),
        ({"model": "condor", "grid": {"train.learning_rate": [1.0]}}, r"'train\.learning_rate' .*; did you mean 'train\.lr'"),
        # a train or MoE key without its section, as the train: section spells it
        ({"model": "condor", "grid": {"lr": [1.0]}}, r"unknown key 'lr' .*; did you mean 'train\.lr'"),
        ({"model": "condor", "grid": {"batch_size": [8]}}, r"unknown key 'batch_size' .*; did you mean 'train\.batch_size'"),
        ({"model": "condor", "grid": {"top_k": [1]}}, r"unknown key 'top_k' .*; did you mean 'moe\.top_k'"),
        ({"model": "condor", "grid": {"train.seed": [1, 2]}}, r"train\.seed cannot be swept.*`seeds:`"),
        ({"model": "condor", "grid": {"moe": [1]}}, r"'moe' is a section"),
        ({"model": "condor", "grid": {"train.lr": [-1.0]}}, r"sweeps\.s\.grid\.train\.lr\[0\] = -1\.0 must be > 0"),
        ({"model": "condor", "grid": {"ffn": ["conv"]}}, r"sweeps\.s\.grid\.ffn\[0\] = 'conv' must be one of dense, moe"),
        ({"model": "condor", "grid": {"n_heads": [3]}}, r"sweeps\.s, run condor-n_heads3: .*n_heads = 3 does not divide"),
        ({"model": "condor", "grid": {"n_heads": [3, 2, 5]}},  # every refused point, not only the first
         r"^2 swept settings refused:\n  sweeps\.s, run condor-n_heads3: .*n_heads = 3 does not divide.*\n"
         r"  sweeps\.s, run condor-n_heads5: .*n_heads = 5 does not divide"),
        ({"model": "condor", "grid": {"train.gpus": [3]}}, r"run condor-gpus3: .*divisible by train\.gpus = 3"),
        ({"model": "condor", "grid": {"train.lr": [1.0e-3]}, "seeds": [42]}, r"sweeps\.s and sweeps\.t both make run 'condor-lr0\.001'"),
        ({"model": "condor", "grid": {"train.wandb.project": ["a b"]}}, r"run name 'condor-projecta b' may hold only"),
    ],
)
def test_bad_sweep_is_refused_naming_it(config, sweep, message):
    config["sweeps"] = {"s": sweep, "t": {"model": "condor", "grid": {"train.lr": [1.0e-3]}}}
    with pytest.raises(ConfigError, match=message):
        check_config(config, SCHEMA)


def test_two_places_making_one_setting_are_refused(config):
    # The summary groups runs by setting: runs of two places under one setting name would be averaged
    # as one setting (of two different models here), and a sweep's plot would miss the setting.
    config["models"]["condor-n_layers2"] = {**config["models"]["condor"], "d_ff": 64, "seeds": [3, 4]}
    config["sweeps"] = {"s": {"model": "condor", "grid": {"n_layers": [2, 3]}, "seeds": [1, 2]}}
    with pytest.raises(ConfigError, match=r"models\.condor-n_layers2 and sweeps\.s both make setting "
                                          r"'condor-n_layers2' \(runs condor-n_layers2-seed3, .*condor-n_layers2-seed1\)"):
        check_config(config, SCHEMA)
    del config["models"]["condor-n_layers2"]
    # Two sweeps repeating a value at other seeds: the seeds belong in one sweep.
    config["sweeps"] = {"a": {"model": "condor", "grid": {"train.lr": [1.0e-3, 3.0e-3]}, "seeds": [1, 2]},
                        "b": {"model": "condor", "grid": {"train.lr": [1.0e-3, 1.0e-2]}, "seeds": [3, 4]}}
    with pytest.raises(ConfigError, match=r"sweeps\.a and sweeps\.b both make setting 'condor-lr0\.001'.*"
                                          r"list all its seeds in one of them"):
        check_config(config, SCHEMA)
    config["sweeps"]["b"]["grid"]["train.lr"] = [1.0e-2]
    check_config(config, SCHEMA)


def test_no_runs_at_all_is_refused(config):
    for entry in config["models"].values():
        entry["seeds"] = []
    with pytest.raises(ConfigError, match=r"no runs: every model has `seeds: \[\]`"):
        check_config(config, SCHEMA)


def test_the_reference_setting_is_compare_to_else_baseline_else_none(config):
    assert reference_setting(config, expand_runs(config)) == "baseline"
    config["sweeps"] = {"lr": {"model": "condor", "grid": {"train.lr": [1.0e-3, 3.0e-3]}, "seeds": [1, 2]}}
    config["compare_to"] = "condor-lr0.001"
    check_config(config, SCHEMA)
    assert reference_setting(config, expand_runs(config)) == "condor-lr0.001"
    config["compare_to"] = None
    config["models"]["baseline"]["seeds"] = []
    assert reference_setting(config, expand_runs(config)) is None


@pytest.mark.parametrize(("value", "message"), [
    ("condor-lr0.001-seed1", r"compare_to = 'condor-lr0\.001-seed1' is not a setting of this config "
                             r"\(baseline, falcon, condor, condor-lr0\.001, condor-lr0\.003\); .*did you mean 'condor-lr0\.001'"),
    ("basline", r"compare_to = 'basline' is not a setting.*did you mean 'baseline'"),
    (3, r"compare_to: 3 is not of type 'string', 'null'"),
    # `--config compare_to=null` passes the text 'null': say how to give null there
    # null is the default, which compares with baseline where the config has that setting (this one does)
    ("null", r"compare_to = 'null' is not a setting.*; 'null' is text \(--config passes text\), not null: for null "
             r"\(compare with baseline, the default here\) give --config compare_to= \(nothing after the '='\), or "
             r"compare_to: null in a config file"),
    ("~", r"compare_to = '~' is not a setting.*; '~' is text"),
])
def test_a_compare_to_that_names_no_setting_is_refused(config, value, message):
    config["sweeps"] = {"lr": {"model": "condor", "grid": {"train.lr": [1.0e-3, 3.0e-3]}, "seeds": [1, 2]}}
    config["compare_to"] = value
    with pytest.raises(ConfigError, match=message):
        check_config(config, SCHEMA)


def test_compare_to_given_as_null_text_without_baseline_says_null_compares_nothing(config):
    config["models"]["baseline"]["seeds"] = []
    config["compare_to"] = "null"
    with pytest.raises(ConfigError, match=r"not null: for null \(no comparison, the default here\) give --config "
                                          r"compare_to="):
        check_config(config, SCHEMA)


@pytest.mark.parametrize(("where", "refused"), [("", True), ("data/mine", True), ("artifacts/runs/x", True),
                                               ("artifacts/mine", False)])
def test_an_absolute_results_dir_in_the_checkout_is_checked_as_its_relative_one(config, tmp_path, monkeypatch,
                                                                               where, refused):
    """The checkout itself (as '.') or a folder under its data/, written as an absolute path, is no folder of
    its own either."""
    monkeypatch.chdir(tmp_path)  # where Snakemake runs: the checkout
    config["results_dir"] = str(tmp_path / where) if where else str(tmp_path)
    if refused:
        with pytest.raises(ConfigError, match=rf"results_dir = '{re.escape(config['results_dir'])}': name a folder"):
            check_config(config, SCHEMA)
    else:
        check_config(config, SCHEMA)
    config["results_dir"] = "/elsewhere/results"
    check_config(config, SCHEMA)


@pytest.mark.parametrize("results_dir", ["artifacts/runs", "artifacts/logs/x", "data/mine", "../elsewhere", "."])
def test_results_dir_must_be_a_folder_of_its_own(config, results_dir):
    config["results_dir"] = results_dir
    with pytest.raises(ConfigError, match=rf"results_dir = '{re.escape(results_dir)}': name a folder of its own"):
        check_config(config, SCHEMA)


def test_the_config_file_that_names_results_dir_owns_it(tmp_path, monkeypatch):
    """Two configs that name the same results_dir would overwrite each other's runs: the file whose
    results_dir Snakemake keeps owns the folder; an override file layered over it without a results_dir
    of its own (a change made on purpose, like an edit) does not change the owner."""
    from tinylm.workflow import check_results_owner, record_results_owner, results_owner

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    base = tmp_path / "config" / "config.yaml"
    base.write_text("results_dir: artifacts\n")
    (tmp_path / "demo.yaml").write_text("results_dir: artifacts/demo\ntrain: {max_steps: 10}\n")
    (tmp_path / "copy.yaml").write_text("results_dir: artifacts/demo\ntrain: {max_steps: 20}\n")
    (tmp_path / "faster.yaml").write_text("train: {lr: 1.0e-3}\n")
    assert results_owner(base, []) == "config/config.yaml"
    assert results_owner(base, [tmp_path / "faster.yaml"]) == "config/config.yaml"
    assert results_owner(base, [tmp_path / "demo.yaml", tmp_path / "faster.yaml"]) == "demo.yaml"
    outside = tmp_path.parent / f"{tmp_path.name}-outside.yaml"
    outside.write_text("results_dir: artifacts/demo\n")
    assert results_owner(base, [outside]) == str(outside)

    results = "artifacts/demo"
    check_results_owner(results, "copy.yaml")  # no record yet: a first run, or results from before records
    record_results_owner(results, "demo.yaml")
    assert json.loads((tmp_path / results / "config-owner.json").read_text())["config"] == "demo.yaml"
    check_results_owner(results, "demo.yaml")  # its own config, with or without override files
    with pytest.raises(ConfigError, match=r"results_dir = 'artifacts/demo' holds the results of demo\.yaml "
                                          r"\(artifacts/demo/config-owner\.json\), and copy\.yaml names it too.*"
                                          r"Give copy\.yaml a results_dir of its own.*delete "
                                          r"artifacts/demo/config-owner\.json") as e:
        check_results_owner(results, "copy.yaml")
    assert e.value.key == "results_dir"
    record_results_owner(results, "demo.yaml")  # unchanged: the record is not rewritten
    (tmp_path / results / "config-owner.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"artifacts/demo/config-owner\.json: not the record.*delete it"):
        check_results_owner(results, "demo.yaml")


def test_config_results_dir_on_the_command_line_keeps_the_file_as_owner(tmp_path, monkeypatch):
    """`--config results_dir=...` moves a config file's runs, it brings no settings: the file stays the owner.
    Else the owner's own file pointed at its folder that way was refused, and two other files given the same
    --config results_dir both passed as one owner, retraining each other's runs."""
    from tinylm.workflow import check_results_owner, record_results_owner, results_owner

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    base = tmp_path / "config" / "config.yaml"
    base.write_text("results_dir: artifacts\n")
    for name, steps in (("a", 10), ("b", 20)):
        (tmp_path / f"{name}.yaml").write_text(f"results_dir: artifacts/{name}\ntrain: {{max_steps: {steps}}}\n")
    assert results_owner(base, [tmp_path / "a.yaml"]) == "a.yaml"
    assert results_owner(base, []) == "config/config.yaml"

    record_results_owner("artifacts/a", "a.yaml")
    check_results_owner("artifacts/a", results_owner(base, [tmp_path / "a.yaml"]))
    record_results_owner("artifacts/x", results_owner(base, [tmp_path / "a.yaml"]))
    with pytest.raises(ConfigError, match=r"holds the results of a\.yaml \(artifacts/x/config-owner\.json\), and "
                                          r"b\.yaml \(with --config results_dir=artifacts/x\) names it too.*"
                                          r"Give b\.yaml a results_dir of its own"):
        check_results_owner("artifacts/x", results_owner(base, [tmp_path / "b.yaml"]),
                            "--config results_dir=artifacts/x")


def test_raw_data_built_before_test_and_validation_were_kept_apart_is_named(tmp_path):
    """Data built before the test split skipped validation's stories (its meta.json has no test_left_out)
    is reused as it is: a test split that may share stories with validation gets a warning that says
    how to rebuild it; data built since, or by the synthetic generator (which repeats no story), none."""
    from tinylm.workflow import data_warnings

    raw = tmp_path / "raw"
    raw.mkdir()
    assert data_warnings("local", raw) == []  # nothing built yet
    meta = {"source": "local", "splits": {}, "train_left_out": {"in_test_or_validation": 0}}
    (raw / "meta.json").write_text(json.dumps(meta))
    (warning,) = data_warnings("local", raw)
    assert f"{raw}/meta.json" in warning and "may share stories with the validation split" in warning
    assert f"delete {raw}/ and run again" in warning
    assert data_warnings("synthetic", raw) == []
    (raw / "meta.json").write_text(json.dumps({**meta, "test_left_out": {"in_validation": 0}}))
    assert data_warnings("local", raw) == [] and data_warnings("hub", raw) == []


def test_shipped_configs_pass_and_keep_their_results_apart():
    configs = {name: merged(*([name] if name else [])) for name in ("", "demo.yaml", "sweep-demo.yaml")}
    for cfg in configs.values():
        check_config(cfg, SCHEMA)
    assert [c["results_dir"] for c in configs.values()] == ["artifacts", "artifacts/demo", "artifacts/sweep-demo"]
    runs = expand_runs(configs["sweep-demo.yaml"], SCHEMA)
    assert list(runs) == ["condor-lr0.001-seed1", "condor-lr0.001-seed2", "condor-lr0.003-seed1", "condor-lr0.003-seed2"]
    assert {r["setting"] for r in runs.values()} == {"condor-lr0.001", "condor-lr0.003"}


def test_configs_that_name_the_same_data_describe_it_alike():
    """A dataset or tokenizer name stands for one set of settings: configs sharing it must agree."""
    configs = [merged(path.name) for path in sorted((ROOT / "config").glob("*.yaml")) if path.name != "schema.yaml"]
    for a, b in itertools.combinations(configs, 2):
        if a["dataset"]["name"] == b["dataset"]["name"]:
            assert a["dataset"] == b["dataset"], a["dataset"]["name"]
            if a["tokenizer"]["name"] == b["tokenizer"]["name"]:
                assert (a["tokenizer"], a["packing"]) == (b["tokenizer"], b["packing"]), a["tokenizer"]["name"]


def test_a_sweep_name_is_a_name_not_a_secret_key(config):
    config["sweeps"] = {"token": {"model": "condor", "grid": {"train.lr": [1.0e-3]}}}
    check_config(config, SCHEMA)
    assert "condor-lr0.001" in expand_runs(config, SCHEMA)


@pytest.mark.parametrize("name", ["smoke.yaml", "demo.yaml", "sweep-demo.yaml", "study.yaml"])
def test_merge_config_merges_as_snakemake_does(name):
    """What `python -m tinylm bench --config` reads is what `snakemake --configfile` reads."""
    from snakemake.utils import update_config

    base = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    overlay = yaml.safe_load((ROOT / "config" / name).read_text())
    theirs = copy.deepcopy(base)
    update_config(theirs, copy.deepcopy(overlay))
    assert merge_config(copy.deepcopy(base), overlay) == theirs


def built_data(tmp_path: Path, cfg: dict, legacy: bool = False) -> dict:
    """The records a build of cfg's data leaves, as far as check_data_settings reads them: each with the
    parameters of its rule, or (`legacy`) as data built before they were recorded."""
    from tinylm.workflow import data_params

    dirs = {"raw_dir": tmp_path / "raw", "tokenizer_dir": tmp_path / "tok", "packed_dir": tmp_path / "proc",
            "splits": ["train", "validation", "test"]}
    for key in ("raw_dir", "tokenizer_dir", "packed_dir"):
        dirs[key].mkdir()
    params = data_params(cfg)
    ds, tok = cfg["dataset"], cfg["tokenizer"]
    records = {
        dirs["raw_dir"] / "meta.json": ({"params": params["download_tinystories"]}, {
            "source": ds["source"], "hub_id": ds["hub_id"], "text_column": ds["text_column"], "seed": ds["seed"],
            "test_n": ds["test_n"], "train_n": ds["train_n"], "validation_n": ds["validation_n"]}),
        dirs["tokenizer_dir"] / "tokenizer_meta.json": ({"params": params["train_tokenizer"]}, {
            "vocab_size": tok["vocab_size"] - 10, "vocab_size_requested": tok["vocab_size"],
            "min_frequency": tok["min_frequency"], "special_tokens": tok["special_tokens"]}),
        **{dirs["packed_dir"] / f"{split}.meta.json": ({"params": params["pack_tokens"]}, {
            "seq_len": cfg["packing"]["seq_len"], "dtype": "uint16"}) for split in dirs["splits"]},
    }
    for path, (new, old) in records.items():
        path.write_text(json.dumps(old if legacy else {**old, **new}))
    return {k: str(v) if isinstance(v, Path) else v for k, v in dirs.items()}


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c["dataset"].update(seed=7), r"raw/meta\.json: built with other settings than this config's "
     r"\(dataset\.seed: 42 there, 7 here\)\. Every config naming dataset 'tinystories' shares .*raw/, and "
     r"Snakemake would rebuild it under their runs: give this config a dataset\.name of its own, or delete "
     r".*raw/ to rebuild it"),
    (lambda c: c["dataset"].update(source="synthetic"), r"dataset\.source: 'hub' there, 'synthetic' here"),
    # not read by a hub dataset, but a parameter of its rule: Snakemake would rebuild on it all the same
    (lambda c: c["dataset"]["synthetic"].update(seed=9), r"dataset\.synthetic\.seed: 1234 there, 9 here"),
    (lambda c: c["tokenizer"].update(min_frequency=3), r"tok/tokenizer_meta\.json: built with other settings "
     r".*tokenizer\.min_frequency: 2 there, 3 here.*dataset 'tinystories' and tokenizer 'bpe8192' shares .*tok/.*"
     r"tokenizer\.name of its own"),
    (lambda c: c["tokenizer"].update(vocab_size=4096), r"tokenizer\.vocab_size: 8192 there, 4096 here"),
    (lambda c: c["packing"].update(seq_len=64), r"proc/train\.meta\.json: built with other settings "
     r".*packing\.seq_len: 128 there, 64 here.*tokenizer\.name of its own, or delete .*proc/"),
    (lambda c: c["packing"].update(dtype="uint16"), r"packing\.dtype: 'auto' there, 'uint16' here"),
    (lambda c: c["packing"].update(encode_batch=16), r"packing\.encode_batch: 2048 there, 16 here"),
], ids=["dataset seed", "dataset source", "synthetic seed", "min_frequency", "vocab_size", "seq_len", "dtype",
        "encode_batch"])
def test_data_built_with_other_settings_under_the_same_name_is_refused(config, tmp_path, edit, message):
    """Any setting Snakemake would rebuild shared data on (its rule's parameters: tinylm.workflow.data_params,
    which rules/data.smk passes) is refused where that data is built."""
    from tinylm.workflow import check_data_settings

    dirs = built_data(tmp_path, config)
    check_data_settings(config, **dirs)  # as built
    other = copy.deepcopy(config)
    edit(other)
    with pytest.raises(ConfigError, match=message):
        check_data_settings(other, **dirs)


def test_data_built_before_its_parameters_were_recorded_is_checked_on_what_it_records(config, tmp_path):
    from tinylm.workflow import check_data_settings

    dirs = built_data(tmp_path, config, legacy=True)
    other = copy.deepcopy(config)
    other["packing"]["encode_batch"] = 16  # not in such a record
    check_data_settings(other, **dirs)
    for edit, message in ((lambda c: c["dataset"].update(test_n=10), r"dataset\.test_n: 5000 there, 10 here"),
                          (lambda c: c["tokenizer"].update(vocab_size=512), r"tokenizer\.vocab_size: 8192 there"),
                          (lambda c: c["packing"].update(seq_len=64), r"packing\.seq_len: 128 there, 64 here")):
        other = copy.deepcopy(config)
        edit(other)
        with pytest.raises(ConfigError, match=message):
            check_data_settings(other, **dirs)


def test_the_data_rules_pass_the_parameters_that_are_checked():
    """rules/data.smk passes data_params(config) to each data rule: what Snakemake rebuilds on is what
    check_data_settings compares."""
    rules = (ROOT / "rules" / "data.smk").read_text()
    for rule in ("download_tinystories", "train_tokenizer", "pack_tokens"):
        body = rules.split(f"rule {rule}:", 1)[1].split("\nrule ", 1)[0]
        assert f'json=as_json(DATA_PARAMS["{rule}"])' in body, rule


def test_one_file_as_both_train_and_validation_is_refused(config, tmp_path):
    from tinylm.data import dataset_kwargs, prepare_raw
    from tinylm.data.sources import write_stories
    from tinylm.workflow import check_inputs

    write_stories(tmp_path / "stories.txt", ["One story.", "Another story."])
    (tmp_path / "also.txt").symlink_to(tmp_path / "stories.txt")  # two names, one file
    config["dataset"].update(source="local", local={"train": str(tmp_path / "stories.txt"),
                                                    "validation": str(tmp_path / "also.txt")})
    same = (r"dataset\.local\.train and dataset\.local\.validation are the same file, .*stories\.txt: the model "
            r"would be validated on stories it trains on")
    with pytest.raises(ConfigError, match=same):  # before any job
        check_inputs(config, raw_dir=str(tmp_path / "raw"), tokenizer_dir=str(tmp_path / "tok"),
                     packed_dir=str(tmp_path / "proc"), splits=["train"])
    with pytest.raises(ConfigError, match=same):  # and in the job, which --forceall runs without the above
        prepare_raw(tmp_path / "raw", **dataset_kwargs(config["dataset"]))


def _local_stories(config: dict, folder, out) -> dict:
    """Local train and validation story files in `folder`, named by the config; check_inputs' folders
    under `out`."""
    from tinylm.data.sources import write_stories

    for split in ("train", "validation"):
        # stories of its own each: a story in both would be left out of train (two of three left none)
        write_stories(folder / f"{split}.txt", [f"A {split} story.", f"Another {split} story.", f"A third {split} one."])
    config["dataset"].update(source="local", local={s: str(folder / f"{s}.txt") for s in ("train", "validation")},
                             test_n=1)
    config["packing"]["seq_len"] = 8  # a row that stories this short can fill
    return dict(raw_dir=str(out / "raw"), tokenizer_dir=str(out / "tok"), packed_dir=str(out / "proc"), splits=["train"])


def test_raw_splits_built_too_small_for_this_configs_rows_are_refused_before_any_job(config, tmp_path):
    """Raw data built for short rows, read by a config of longer ones (another tokenizer.name): its
    record's sizes show a split that fills no row before a tokenizer is trained for it."""
    from tinylm.data import dataset_kwargs, prepare_raw
    from tinylm.workflow import check_inputs, data_params

    config["dataset"].update(name="few", source="synthetic", synthetic={"n_train": 200, "n_validation": 1, "seed": 1})
    dirs = dict(raw_dir=str(tmp_path / "raw"), tokenizer_dir=str(tmp_path / "tok"), packed_dir=str(tmp_path / "proc"),
                splits=["train", "validation", "test"])
    prepare_raw(tmp_path / "raw", **dataset_kwargs(config["dataset"]), params=data_params(config)["download_tinystories"])
    check_inputs(config, **dirs)  # rows of 129 tokens: one story of 385 bytes or more fills one
    config["packing"]["seq_len"] = 2048
    with pytest.raises(ConfigError, match=(
            rf"^{re.escape(str(tmp_path / 'raw' / 'meta.json'))}: its validation split holds 1 story of at most \d+ "
            r"tokens, fewer than one packed row of packing\.seq_len \+ 1 = 2049: pack_tokens could make no row of it; "
            r"lower packing\.seq_len \(2048\), or under a new dataset\.name raise dataset\.synthetic\.n_validation "
            r"\(1\)$")):
        check_inputs(config, **dirs)
    (tmp_path / "raw" / "validation.txt").unlink()  # rebuilt by the download job, which checks it there
    check_inputs(config, **dirs)


def test_raw_splits_of_a_local_file_changed_since_are_left_to_the_download_job(config, tmp_path):
    from tinylm.data import dataset_kwargs, prepare_raw
    from tinylm.data.sources import write_stories
    from tinylm.workflow import check_inputs, data_params

    write_stories(tmp_path / "train.txt", [f"Story {i} is about a cat who sat on a mat all day long. " * 3
                                           for i in range(50)])
    write_stories(tmp_path / "valid.txt", ["A validation story of some length, " * 8, "And another one, " * 20])
    config["dataset"].update(source="local", local={"train": str(tmp_path / "train.txt"),
                                                    "validation": str(tmp_path / "valid.txt")}, validation_n=1)
    config["packing"]["seq_len"] = 400  # fills a row of the validation file, not of its first story
    dirs = dict(raw_dir=str(tmp_path / "raw"), tokenizer_dir=str(tmp_path / "tok"), packed_dir=str(tmp_path / "proc"),
                splits=["train", "validation", "test"])
    prepare_raw(tmp_path / "raw", **dataset_kwargs(config["dataset"]), params=data_params(config)["download_tinystories"])
    with pytest.raises(ConfigError, match=r"its validation split holds 1 story .* lower packing\.seq_len \(400\), or "
                                          r"under a new dataset\.name raise dataset\.validation_n \(1\) or set it to "
                                          r"null$"):
        check_inputs(config, **dirs)
    later = (tmp_path / "raw" / "meta.json").stat().st_mtime + 10
    os.utime(tmp_path / "valid.txt", (later, later))  # changed since: Snakemake rebuilds the splits
    check_inputs(config, **dirs)


def test_a_local_file_moved_after_its_data_was_built_is_named_with_what_to_do(config, tmp_path):
    """The local files are the download rule's inputs, so a moved one stops every command of the config;
    the message says the data was made from it and how to go on, not only that it is missing."""
    from tinylm.data import dataset_kwargs, prepare_raw
    from tinylm.errors import DataError
    from tinylm.workflow import check_inputs, data_params

    dirs = _local_stories(config, tmp_path, tmp_path)
    (tmp_path / "validation.txt").rename(tmp_path / "v.txt")
    with pytest.raises(DataError, match=r"validation\.txt: dataset\.local\.validation file not found; check the path$"):
        check_inputs(config, **dirs)  # nothing built from it yet
    (tmp_path / "v.txt").rename(tmp_path / "validation.txt")
    prepare_raw(tmp_path / "raw", **dataset_kwargs(config["dataset"]))  # a record without its parameters
    (tmp_path / "validation.txt").rename(tmp_path / "moved.txt")
    with pytest.raises(DataError, match=r"dataset\.local\.validation file not found; check the path$"):
        check_inputs(config, **dirs)  # it does not say what the data was made from: the plain message
    (tmp_path / "moved.txt").rename(tmp_path / "validation.txt")
    prepare_raw(tmp_path / "raw", **dataset_kwargs(config["dataset"]), params=data_params(config)["download_tinystories"])
    check_inputs(config, **dirs)
    (tmp_path / "validation.txt").rename(tmp_path / "moved.txt")
    with pytest.raises(DataError, match=(
            rf"validation\.txt: dataset\.local\.validation file not found; {re.escape(str(tmp_path / 'raw'))} was made "
            r"from it, and the workflow reads it to tell whether that is up to date: put the file back; to read it "
            r"from its new place, set dataset\.local\.validation there and give the dataset a new dataset\.name")):
        check_inputs(config, **dirs)


def test_both_local_files_gone_are_named_in_one_message(config, tmp_path):
    """Two local files moved (a folder renamed): one command names both, not one per attempt."""
    from tinylm.data import dataset_kwargs, prepare_raw
    from tinylm.errors import DataError
    from tinylm.workflow import check_inputs, data_params

    src = tmp_path / "stories"
    src.mkdir()
    dirs = _local_stories(config, src, tmp_path)
    src.rename(tmp_path / "elsewhere")
    with pytest.raises(DataError) as e:  # nothing built from them yet
        check_inputs(config, **dirs)
    assert re.search(r"train\.txt: dataset\.local\.train file not found", str(e.value))
    assert re.search(r"validation\.txt: dataset\.local\.validation file not found", str(e.value))
    (tmp_path / "elsewhere").rename(src)
    prepare_raw(tmp_path / "raw", **dataset_kwargs(config["dataset"]), params=data_params(config)["download_tinystories"])
    src.rename(tmp_path / "elsewhere")
    with pytest.raises(DataError) as e:  # built from them: both named, with what to do once
        check_inputs(config, **dirs)
    message = str(e.value)
    assert "dataset.local.train file not found" in message and "dataset.local.validation file not found" in message
    assert message.count("put the files back") == 1, message
    assert "set dataset.local.train and dataset.local.validation to their new paths" in message, message


def test_the_command_line_is_read_only_from_snakemake():
    from tinylm.workflow import command_line

    args = command_line(["/venv/bin/snakemake", "-n", "--cores", "2", "artifacts/runs/condor/metrics.json", "--forceall"])
    assert args.targets == ["artifacts/runs/condor/metrics.json"] and args.forceall
    assert command_line(["/usr/bin/python3", "my_pipeline.py"]) is None  # the Python API: nothing to read
    assert command_line([]) is None


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("artifacts/demo/runs/condor/metrics.json", None),
        ("artifacts/demo/runs/condor", None),
        ("artifacts/demo/summary_vs_reference.csv", None),
        ("artifacts/demo/plots/summary.html", None),
        ("verify", None),  # a rule
        ("data/processed/synthetic-demo/demo-bpe2048/train.bin", None),  # shared data: not results
        ("artifacts/demo/runs/baseline-seed1/metrics.json", r"no run 'baseline-seed1' \(its runs: baseline, falcon, condor\)"),
        ("artifacts/summary.csv", r"under artifacts/demo/ \(its results_dir\), not artifacts/; .* ask for "
                                  r"artifacts/demo/summary\.csv"),
        ("/work/repo/artifacts/demo/runs/condr/log", r"did you mean 'condor'"),  # absolute, in the workdir
        ("artifacts/runs/condor/metrics.json", r"not artifacts/; .* or ask for artifacts/demo/runs/condor/metrics\.json"),
        # another config's run that this config lacks: asking for it here would only fail again
        ("artifacts/other/runs/condor-lr0.01-seed1/metrics.json", r"not artifacts/other/; give the --configfile of "
                                                                  r"the config that writes there$"),
        ("artifacts/runs/condr/log", r"not artifacts/; .* or ask for artifacts/demo/runs/condor/log$"),
    ],
)
def test_targets_among_results_must_be_this_configs(target, message):
    from tinylm.workflow import check_targets

    cfg = merged("demo.yaml")
    runs = expand_runs(cfg)
    if message is None:
        check_targets([target], cfg["results_dir"], runs, "/work/repo")
    else:
        with pytest.raises(ConfigError, match=message):
            check_targets([target], cfg["results_dir"], runs, "/work/repo")


@pytest.mark.parametrize("target", ["data/raw/runs/meta.json", "data/processed/runs/bpe8192/train.bin",
                                    "artifacts/tokenizers/runs/bpe8192/tokenizer.json", "/work/repo/data/raw/plots/meta.json"])
def test_the_data_of_a_dataset_named_like_a_results_folder_is_no_results_target(target):
    """A dataset named runs or plots (the schema allows it) had its data targets read as another config's
    results and refused: data/raw/runs/meta.json is under data/, which no results_dir may be."""
    from tinylm.workflow import check_targets

    check_targets([target], "artifacts", expand_runs(merged("demo.yaml")), "/work/repo")


@pytest.mark.parametrize(
    ("target", "message"),
    [
        # the README's own-stories target, typed without the --configfile that names the dataset
        ("data/raw/mystories/meta.json", r"this config's dataset is 'synthetic-demo' \(dataset\.name\), not "
                                         r"'mystories'; .* or ask for data/raw/synthetic-demo/meta\.json$"),
        ("/work/repo/data/raw/mystories/train.txt", r"or ask for data/raw/synthetic-demo/train\.txt$"),
        ("data/processed/synthetic-demo/bpe8192/train.bin", r"this config's tokenizer is 'demo-bpe2048' "
                                                            r"\(tokenizer\.name\), not 'bpe8192'; .* or ask for "
                                                            r"data/processed/synthetic-demo/demo-bpe2048/train\.bin$"),
        ("artifacts/tokenizers/tinystories/demo-bpe2048/tokenizer.json",
         r"dataset is 'synthetic-demo' .* or ask for artifacts/tokenizers/synthetic-demo/demo-bpe2048/tokenizer\.json$"),
    ],
)
def test_a_data_target_of_another_dataset_or_tokenizer_name_is_refused_naming_this_configs(target, message):
    """Snakemake says only that no rule makes data/raw/<name>/meta.json when the config names another dataset
    (the default config's tinystories, for a target typed without its --configfile)."""
    from tinylm.workflow import check_targets

    cfg = merged("demo.yaml")
    with pytest.raises(ConfigError, match=rf"^{re.escape(target)}: .*give the --configfile of the config"):
        check_targets([target], cfg["results_dir"], expand_runs(cfg), "/work/repo", dataset=cfg["dataset"]["name"],
                      tokenizer=cfg["tokenizer"]["name"])
    with pytest.raises(ConfigError, match=message):
        check_targets([target], cfg["results_dir"], expand_runs(cfg), "/work/repo", dataset=cfg["dataset"]["name"],
                      tokenizer=cfg["tokenizer"]["name"])
    for own in ("data/raw/synthetic-demo/meta.json", "data/processed/synthetic-demo/demo-bpe2048/test.bin",
                "artifacts/tokenizers/synthetic-demo/demo-bpe2048/tokenizer.json", "logs/download_tinystories/x.log"):
        check_targets([own], cfg["results_dir"], expand_runs(cfg), "/work/repo", dataset=cfg["dataset"]["name"],
                      tokenizer=cfg["tokenizer"]["name"])


@pytest.mark.parametrize("results_dir", ["/scratch/tinylm/mine", "/work/repo/results/mine"])
def test_targets_under_an_absolute_results_dir_are_this_configs(results_dir):
    """results_dir may be an absolute path (the schema allows it); a target under it, written as absolute
    (as Snakemake needs it to match the rules' absolute outputs), is this config's, not another's."""
    from tinylm.workflow import check_targets

    runs = expand_runs(merged("demo.yaml"))
    check_targets([f"{results_dir}/runs/condor/metrics.json", f"{results_dir}/summary.csv"], results_dir, runs,
                  "/work/repo")
    with pytest.raises(ConfigError, match=r"no run 'condr' .*; did you mean 'condor'\?"):
        check_targets([f"{results_dir}/runs/condr/metrics.json"], results_dir, runs, "/work/repo")
    with pytest.raises(ConfigError, match=rf"under {results_dir}/ \(its results_dir\), not artifacts/demo/"):
        check_targets(["/work/repo/artifacts/demo/summary.csv"], results_dir, runs, "/work/repo")


@pytest.mark.parametrize(("target", "results_dir", "spelled"), [
    ("/work/repo/artifacts/demo/runs/condor/metrics.json", "artifacts/demo", "artifacts/demo/runs/condor/metrics.json"),
    ("results/mine/summary.csv", "/work/repo/results/mine", "/work/repo/results/mine/summary.csv"),
    ("./results/mine/plots/summary.html", "/work/repo/results/mine/", "/work/repo/results/mine/plots/summary.html"),
])
def test_a_target_among_this_configs_results_spelled_otherwise_is_refused_naming_its_spelling(target, results_dir,
                                                                                            spelled):
    """Snakemake matches a target to the rules' outputs as spelled: absolute where results_dir is, relative where
    it is not; else it says only that no rule makes the file."""
    from tinylm.workflow import check_targets

    with pytest.raises(ConfigError, match=rf"^{re.escape(target)}: .*ask for {re.escape(spelled)}$"):
        check_targets([target], results_dir, expand_runs(merged("demo.yaml")), "/work/repo")


@pytest.mark.parametrize(
    ("path", "refused"),
    [("config/demo.yaml", False), ("my.json", False), ("artifacts/demo/runs/condor/metrics.json", True),
     ("data/raw/tinystories/meta.json", True), ("artifacts/demo/summary.csv", True),
     # Snakemake reads any YAML or JSON file: the name need not say so
     ("my.cfg", False), ("myconf", False), ("../elsewhere/settings", False),
     ("results/mine/plots/summary.html", True), ("results/mine/runs/condor/metrics.json", True)],
)
def test_a_configfile_that_the_workflow_makes_is_refused(path, refused):
    from tinylm.workflow import check_configfiles

    if refused:
        with pytest.raises(ConfigError, match=rf"--configfile {re.escape(path)} is a file this workflow makes"):
            check_configfiles([f"/work/repo/{path}"], "/work/repo")
    else:
        check_configfiles([f"/work/repo/{path}"], "/work/repo")


def test_configfile_given_twice_is_refused_naming_the_file_it_would_drop():
    # Snakemake keeps only the last --configfile option: smoke.yaml would be dropped without a word,
    # and the runs planned on the defaults (hub data, full-length training) in my.yaml's results_dir
    from tinylm.workflow import check_configfile_options

    argv = ["/venv/bin/snakemake", "-n", "--configfile", "config/smoke.yaml", "--configfiles=my.yaml", "--cores", "2"]
    with pytest.raises(ConfigError, match=r"--configfile given 2 times: Snakemake reads only the last \(my\.yaml\), "
                                          r"not config/smoke\.yaml; .*--configfile config/smoke\.yaml my\.yaml"):
        check_configfile_options(argv)
    with pytest.raises(ConfigError, match=r"given 2 times"):
        check_configfile_options(["snakemake", "--configfile", "a.yaml", "--cores", "1", "--configf", "b.yaml"])
    check_configfile_options(["/venv/bin/snakemake", "--configfile", "config/smoke.yaml", "my.yaml"])
    check_configfile_options(["/venv/bin/snakemake", "--cores", "1"])
    check_configfile_options(["snakemake", "--configfile", "my.yaml", "--configfile", "my.yaml"])  # nothing dropped
    check_configfile_options(["/usr/bin/python3", "--configfile", "a", "--configfile", "b"])  # not snakemake's


def test_a_packed_split_changed_after_packing_is_refused_before_any_job(config, tmp_path):
    """A packed split written after its meta file recorded it (same size, so the size check passes) is
    hashed before any job: Snakemake would delete every run's model to retrain on the damaged tokens,
    and the trainer's first complaint (a token id beyond the vocabulary, or none) would not name it."""
    import os

    from tinylm.data import build_synthetic_corpus
    from tinylm.errors import DataError
    from tinylm.workflow import check_inputs

    d = tmp_path / "data"
    build_synthetic_corpus(d, n_train=60, n_validation=10, vocab_size=300, seq_len=16)
    dirs = dict(raw_dir=str(d), tokenizer_dir=str(d / "tok"), packed_dir=str(d), splits=["train", "validation"])
    check_inputs(config, **dirs)
    train_bin = d / "train.bin"
    later = train_bin.stat().st_mtime_ns + 2_000_000_000
    os.utime(train_bin, ns=(later, later))  # newer than its meta, content intact (a copy, a touch): passes
    check_inputs(config, **dirs)
    data = bytearray(train_bin.read_bytes())
    data[100:110] = b"\xff" * 10
    train_bin.write_bytes(bytes(data))
    os.utime(train_bin, ns=(later, later))
    with pytest.raises(DataError, match=r"train\.bin: changed since pack_tokens recorded it .*sha256 .*Delete it and rerun"):
        check_inputs(config, **dirs)


def test_moe_settings_on_a_dense_model_are_refused(config):
    """They computed nothing, yet entered the run's parameters and retrained it."""
    from tinylm.workflow import check_config

    config["models"]["condor"]["moe"] = {"n_experts": 4}
    with pytest.raises(ConfigError, match=r"models\.condor\.moe: an MoE setting on a model with ffn: dense.*"
                                          r"remove models\.condor\.moe, or set models\.condor\.ffn: moe"):
        check_config(config)
    config["models"]["condor"]["ffn"] = "moe"
    check_config(config)


def test_an_moe_setting_swept_on_a_dense_model_is_refused_naming_the_grid(config):
    """The setting comes from the grid, not from the model's entry: the fix is there."""
    from tinylm.workflow import check_config

    config["sweeps"] = {"s": {"model": "condor", "grid": {"moe.top_k": [1, 2]}}}
    with pytest.raises(ConfigError, match=r"sweeps\.s, run condor-top_k1: sweeps\.s\.grid\.moe\.top_k: an MoE setting "
                                          r"swept on model condor, which has ffn: dense.*drop it from sweeps\.s\.grid, "
                                          r"or sweep it on an MoE model"):
        check_config(config)


def test_moe_fused_blocks_on_a_dense_model_is_refused(config):
    """Dense blocks ignore it, yet set it would enter the run's parameters and retrain the run, and a
    sweep over it would train one model twice under two names."""
    from tinylm.workflow import check_config

    config["models"]["condor"]["moe_fused_blocks"] = False
    with pytest.raises(ConfigError, match=r"models\.condor\.moe_fused_blocks: an MoE setting on a model with "
                                          r"ffn: dense.*remove models\.condor\.moe_fused_blocks, or set "
                                          r"models\.condor\.ffn: moe"):
        check_config(config)
    del config["models"]["condor"]["moe_fused_blocks"]
    config["sweeps"] = {"s": {"model": "baseline", "grid": {"moe_fused_blocks": [True, False]}}}
    with pytest.raises(ConfigError, match=r"sweeps\.s, run baseline-moe_fused_blocks\w+: .*ffn: dense"):
        check_config(config)
    config["sweeps"] = {"s": {"model": "falcon", "grid": {"moe_fused_blocks": [True, False]}}}
    check_config(config)


def test_a_model_key_written_at_its_unwritten_default_leaves_the_runs_parameters_alone(config):
    """Rule train_model's parameters decide whether Snakemake retrains a finished run: an x-default key
    (config/schema.yaml) written at its default is the same model, and must not change them."""
    plain = expand_runs(config)
    config["models"]["condor"].update(dropout=0.0, fp32_residual=False)
    config["models"]["falcon"].update(moe_fused_blocks=True, dropout=0)
    written = expand_runs(config)
    for run in ("condor", "falcon"):
        assert written[run]["model_config"] == plain[run]["model_config"]
    config["models"]["condor"].update(dropout=0.1, fp32_residual=True)
    changed = expand_runs(config)["condor"]["model_config"]
    assert (changed["dropout"], changed["fp32_residual"]) == (0.1, True)


def test_a_whole_number_for_a_setting_of_type_number_leaves_the_runs_parameters_alone(config):
    """`grad_clip: 1` is the default 1.0: the rules' parameters (as_json) must not tell them apart, or
    Snakemake retrains every finished run for a value written without its point."""
    plain = expand_runs(config)
    config["train"].update(grad_clip=1, weight_decay=0, min_delta=0)
    config["models"]["falcon"]["train"] = {"beta1": 0.9}
    written = expand_runs(config)
    for run in plain:
        for part in ("model_config", "train_config"):
            assert json.dumps(written[run][part], sort_keys=True) == json.dumps(plain[run][part], sort_keys=True)
    config["models"]["condor"]["train"] = {"grad_clip": 2}
    config["models"]["falcon"]["moe"]["capacity_factor"] = 2
    runs = expand_runs(config)
    assert json.dumps([runs["condor"]["train_config"]["grad_clip"], runs["falcon"]["model_config"]["capacity_factor"]]) \
        == "[2.0, 2.0]"
    # a sweep's run names keep the values as written
    config["sweeps"] = {"g": {"model": "condor", "grid": {"train.grad_clip": [1, 3]}}}
    runs = expand_runs(config)
    assert "condor-grad_clip1" in runs and runs["condor-grad_clip1"]["train_config"]["grad_clip"] == 1.0


def test_a_partial_model_entry_says_each_entry_is_a_whole_model(config):
    from tinylm.workflow import check_config

    config["models"]["condor_tiny"] = {"d_ff": 64}  # meant as condor with one change
    with pytest.raises(ConfigError, match=r"models\.condor_tiny: 'd_model', 'n_layers', 'n_heads' are required properties; each entry under "
                                          r"models: is a whole model.*<<: \*name.*sweeps:"):
        check_config(config)


def test_a_misspelt_model_name_is_named_with_the_model_it_likely_means(config):
    from tinylm.workflow import check_config

    config["models"]["baselien"] = {"seeds": [1, 2]}  # meant as baseline's seeds
    with pytest.raises(ConfigError, match=r"models\.baselien: .*did you mean 'baseline'\?"):
        check_config(config)


def test_the_readme_sweep_example_trains_what_its_comments_say(config):
    # Copied into a --configfile, it runs condor at three seeds and its 2 x 2 grid at two, and no other
    # model: the models of config/config.yaml are merged in, so each one it leaves out says seeds: [].
    text = (ROOT / "README.md").read_text(encoding="utf-8").split("### Seeds and sweeps", 1)[1]
    example = yaml.safe_load(text.split("```yaml", 1)[1].split("```", 1)[0])
    merged = merge_config(config, example)
    check_config(merged, SCHEMA)
    runs = expand_runs(merged, SCHEMA)
    assert {run["model"] for run in runs.values()} == {"condor"}
    assert len(runs) == 3 + 2 * 2 * 2 and "condor-d_model128-lr0.001-seed1" in runs


def test_a_sweep_point_with_a_models_own_settings_and_seed_is_named_as_the_same_run(config):
    """A grid that holds the model's own value, at a seed the model also runs at, trains that run
    twice under two names; the workflow warns, naming both (the sweep plot may want the point)."""
    from tinylm.workflow import same_runs

    own_lr = train_params(config, "condor")["lr"]
    config["models"]["condor"]["seeds"] = [42, 1]
    config["sweeps"] = {"lr": {"model": "condor", "grid": {"train.lr": [own_lr, 3.0e-3]}, "seeds": [1, 2]}}
    runs = expand_runs(config, SCHEMA)
    assert same_runs(runs) == [("condor-seed1", f"condor-lr{own_lr}-seed1")]
    config["sweeps"]["lr"]["grid"]["train.lr"] = [3.0e-3]
    assert same_runs(expand_runs(config, SCHEMA)) == []

    # A key the model entry leaves to its default (fp32_residual, dropout: x-default, not written into
    # the entry) swept at that default is the same run too.
    config["sweeps"] = {"d": {"model": "condor", "grid": {"dropout": [0.0, 0.1], "fp32_residual": [False]},
                              "seeds": [1]}}
    assert same_runs(expand_runs(config, SCHEMA)) == [("condor-seed1", "condor-dropout0.0-fp32_residualfalse-seed1")]

    # Settings that change only what a run records (log_every, save_every, ...) train the same model:
    # a grid over one trains it once per value.
    config["models"]["condor"]["seeds"] = [42]
    config["sweeps"] = {"log": {"model": "condor", "grid": {"train.log_every": [5, 7]}, "seeds": [1]}}
    assert same_runs(expand_runs(config, SCHEMA)) == [("condor-log_every5-seed1", "condor-log_every7-seed1")]


def test_yaml_line_finds_a_setting_in_block_and_flow_style_and_keys_with_dots(tmp_path):
    from tinylm.workflow import yaml_line

    cfg = tmp_path / "c.yaml"
    cfg.write_text("# a comment\nresults_dir: artifacts/x\nmodels:\n  condor: {d_model: 64,\n    seeds: [1, 2]}\n"
                   "sweeps:\n  lr:\n    grid:\n      train.lr: [0.1]\n")
    assert yaml_line(cfg, "results_dir") == 2
    assert yaml_line(cfg, "models.condor") == 4
    assert yaml_line(cfg, "models.condor.seeds[1]") == 5
    assert yaml_line(cfg, "sweeps.lr.grid.train.lr") == 9
    assert yaml_line(cfg, "models.condor.n_heads") is None  # not set in this file
    assert yaml_line(cfg, "models.condor.seeds[5]") is None


def test_yaml_line_names_the_value_yaml_keeps_repeated_or_merged(tmp_path):
    from tinylm.workflow import yaml_line

    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  beta1: 0.5\ntrain:\n  beta1: 1.0\n")  # a repeated key: the last one counts
    assert yaml_line(cfg, "train.beta1") == 4
    cfg.write_text("small: &small\n  d_model: 64\n  n_layers: 2\nmodels:\n  tiny:\n    <<: *small\n"
                   "    n_layers: 3\n")
    assert yaml_line(cfg, "models.tiny.d_model") == 2  # merged in: where the anchor sets it
    assert yaml_line(cfg, "models.tiny.n_layers") == 7  # its own key overrides the merged one


def test_the_config_file_named_is_the_one_whose_value_counts(tmp_path):
    """Two --configfile files set the same bad value: Snakemake keeps the last one's, so that is named."""
    from tinylm.workflow import check_config, config_error_source, load_merged

    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("train: {beta1: 1.0}\n")
    second.write_text("results_dir: artifacts/x\n\ntrain: {beta1: 1.0}\n")
    with pytest.raises(ConfigError) as e:
        check_config(load_merged(SCHEMA.parent / "config.yaml", [first, second]))
    assert config_error_source(SCHEMA.parent / "config.yaml", [first, second], e.value) == f"{second}, line 3: "


def test_a_report_of_a_summary_made_for_other_runs_or_another_reference_is_refused(tmp_path):
    """`snakemake --report` reads the summary as built: after a seed or a sweep point is added, or
    compare_to changed, it would describe the config before the change without a word."""
    from tinylm.workflow import check_report_current

    cfg = merged("demo.yaml")
    runs = expand_runs(cfg)
    results = tmp_path / cfg["results_dir"]
    results.mkdir(parents=True)
    (results / "summary.csv").write_text("run,model\n" + "".join(f"{r},{r}\n" for r in runs))
    (results / "summary_vs_reference.csv").write_text("setting,reference,metric\ncondor,baseline,val_loss\n")
    check_report_current(cfg["results_dir"], tmp_path, runs, "baseline")  # as built
    more = {**runs, "condor-seed7": runs["condor"]}
    with pytest.raises(ConfigError, match=r"summary\.csv summarizes other runs than this config's \(not yet "
                                          r"summarized: condor-seed7\).*same --configfile arguments"):
        check_report_current(cfg["results_dir"], tmp_path, more, "baseline")
    fewer = {r: v for r, v in runs.items() if r != "falcon"}
    with pytest.raises(ConfigError, match=r"\(no longer in the config: falcon\)"):
        check_report_current(cfg["results_dir"], tmp_path, fewer, "baseline")
    with pytest.raises(ConfigError, match=r"compares the settings with baseline; this config compares them with "
                                          r"condor \(compare_to\)"):
        check_report_current(cfg["results_dir"], tmp_path, runs, "condor")
    # built without a reference (no baseline, no compare_to): a header only, then compare_to set
    (results / "summary_vs_reference.csv").write_text("setting,reference,metric\n")
    check_report_current(cfg["results_dir"], tmp_path, runs, None)
    with pytest.raises(ConfigError, match=r"compares no settings; this config compares them with condor"):
        check_report_current(cfg["results_dir"], tmp_path, runs, "condor")
    (results / "summary.csv").write_text("model,val_loss\nbaseline,1.0\n")  # no run column
    with pytest.raises(ConfigError, match=r"summary\.csv has no 'run' column \(an older tinylm wrote it\)"):
        check_report_current(cfg["results_dir"], tmp_path, runs, None)


def test_a_warm_up_as_long_as_the_run_is_warned_of_once_per_setting(config):
    """train.max_steps lowered for a short run under the default 200 warm-up steps: the learning rate
    would climb for the whole run and never reach train.lr. Legal (a smoke test may want it), so a
    warning, once per setting however many seeds, and none for the shipped configs' schedules."""
    from tinylm.workflow import run_warnings

    assert run_warnings(expand_runs(config, SCHEMA)) == []
    config["models"]["condor"]["train"].update(max_steps=100)
    config["models"]["condor"]["seeds"] = [1, 2]
    warnings = run_warnings(expand_runs(config, SCHEMA))
    assert warnings == [
        "warning: runs condor-seed1, condor-seed2: train.warmup_steps = 200 is not below train.max_steps = 100: "
        "the learning rate warms up for the whole run (to 0.00015 at its last step; train.lr = 0.0003) and never "
        "decays; lower train.warmup_steps (or raise max_steps) unless that is what you want"
    ]
    config["models"]["condor"]["train"].update(max_steps=200)  # reaches lr at the last step, no decay
    assert "warms up for the whole run (to 0.0003 at its last step" in run_warnings(expand_runs(config, SCHEMA))[0]
    config["models"]["condor"]["train"].update(max_steps=201)
    assert run_warnings(expand_runs(config, SCHEMA)) == []


def test_every_train_device_the_readme_names_is_one_the_config_accepts():
    """README's `train.device: X` values (cuda:N read as cuda:0) pass the schema: the README told of a
    job naming its GPU with `train.device: cuda:N`, which the config refuses before any job."""
    named = set(re.findall(r"`train\.device: ([^`]+)`", (ROOT / "README.md").read_text(encoding="utf-8")))
    assert named
    for value in named:
        TrainConfig.from_dict({"device": value.replace(":N", ":0")})


def test_a_key_given_twice_in_one_mapping_is_refused_naming_both_lines(tmp_path):
    """YAML keeps the last of two equal keys without a word: a second `train:` section drops every setting of
    the first. Refused, naming the key and both lines; keys merged in with `<<: *name` may be overridden."""
    from tinylm.workflow import check_yaml_syntax, load_merged

    cfg = tmp_path / "c.yaml"
    cfg.write_text("results_dir: artifacts/x\ntrain:\n  lr: 1.0e-2\nmodels:\n  condor: {seeds: [1]}\ntrain:\n"
                   "  max_steps: 7\n")
    with pytest.raises(ConfigError) as e:
        load_merged(SCHEMA.parent / "config.yaml", [cfg])
    assert str(e.value).startswith(f"{cfg}, line 6: key 'train' is given twice (also at line 2)"), e.value
    assert "merge them into one" in str(e.value)
    cfg.write_text("models:\n  condor:\n    d_model: 64\n    n_layers: 2\n    d_model: 128\n")
    with pytest.raises(ConfigError, match=r"line 5: key 'models.condor.d_model' is given twice \(also at line 3\)"):
        check_yaml_syntax(cfg)
    cfg.write_text("small: &small\n  d_model: 64\n  n_layers: 2\nmodels:\n  tiny:\n    <<: *small\n    n_layers: 3\n")
    assert check_yaml_syntax(cfg)["models"]["tiny"] == {"d_model": 64, "n_layers": 3}


def test_a_json_config_file_is_read_as_snakemake_reads_it_first_as_json(tmp_path):
    """Snakemake reads a --configfile as JSON before YAML: a JSON file indented with tabs (no YAML) is a
    config to it, and was refused as a YAML mistake. A key given twice in one JSON object is refused too."""
    from tinylm.workflow import check_yaml_syntax

    cfg = tmp_path / "c.json"
    cfg.write_text('{\n\t"results_dir": "artifacts/js",\n\t"train": {"lr": 0.01}\n}\n')
    assert check_yaml_syntax(cfg) == {"results_dir": "artifacts/js", "train": {"lr": 0.01}}
    cfg.write_text('{\n\t"train": {"lr": 0.01},\n\t"train": {"max_steps": 7}\n}\n')
    with pytest.raises(ConfigError, match=r"c\.json: key 'train' is given twice in one JSON object; JSON readers keep "
                                          r"only the last"):
        check_yaml_syntax(cfg)


def test_build_command_names_the_config_files_as_given_from_here(tmp_path, monkeypatch):
    """What verify says to run when nothing is built: plain snakemake, or with the run's --configfile and --config
    (files inside the checkout relative to it, others absolute)."""
    from tinylm.workflow import build_command

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    demo, outside = tmp_path / "config" / "demo.yaml", tmp_path.parent / f"{tmp_path.name}-my.yaml"
    assert build_command([], []) == "snakemake --cores 4"
    assert build_command([demo], []) == "snakemake --cores 4 --configfile config/demo.yaml"
    assert build_command([demo, outside], ["results_dir=artifacts/x y"]) == \
        f"snakemake --cores 4 --configfile config/demo.yaml {outside} --config 'results_dir=artifacts/x y'"


def test_runs_that_require_cuda_are_refused_before_any_job_where_this_machine_has_none(config, monkeypatch):
    """train.device: cuda fails at once without a GPU, but only once its job started, after Snakemake
    deleted the outputs of the run it trains again (a finished run's model, where the setting changed)."""
    import torch

    config["train"]["device"] = "cuda"
    config["models"]["falcon"]["train"] = {"device": "cpu"}
    runs = expand_runs(config)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"runs baseline, condor: train\.device = 'cuda' but no CUDA GPU is visible "
                                          r"on this machine.*Nothing was run"):
        check_cuda_here(runs)
    check_cuda_here({"falcon": runs["falcon"]})  # on the CPU: nothing to check
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_cuda_here(runs)
