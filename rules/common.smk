# Config validation, the model list, path helpers and wildcard constraints.
import json
import os
import sys

from snakemake.utils import validate

validate(config, schema="../config/schema.yaml")

from tinylm.workflow import check_config, model_params, train_params  # noqa: E402

check_config(config, schema_path=workflow.source_path("../config/schema.yaml"))

MODELS = list(config["models"])
PYTHON = f'"{sys.executable}"'  # the interpreter Snakemake runs in, also inside cluster jobs

RAW = f"data/raw/{config['dataset']['name']}"
TOK = f"artifacts/tokenizers/{config['tokenizer']['name']}"
PROC = f"data/processed/{config['tokenizer']['name']}"
RUNS = "artifacts/runs"
PLOTS = "artifacts/plots"
MOE_MODELS = [m for m in MODELS if config["models"][m]["ffn"] == "moe"]
SPLITS = ["train", "validation", "test"]


wildcard_constraints:
    model="|".join(MODELS),
    split="|".join(SPLITS),


def as_json(obj):
    """Rule params travel to the scripts as one JSON argument; Snakemake reruns a rule when it changes."""
    return json.dumps(obj, sort_keys=True)


def local_inputs(wildcards):
    ds = config["dataset"]
    if ds["source"] != "local":
        return []
    return [p for p in (ds["local"]["train"], ds["local"]["validation"]) if p]


def train_launcher(wildcards):
    gpus = train_params(config, wildcards.model)["gpus"]
    if gpus == 1:
        return PYTHON
    # One job, N processes: torchrun sets RANK/WORLD_SIZE; see docs/cluster.md for several nodes.
    return f"{PYTHON} -m torch.distributed.run --standalone --nproc_per_node {gpus}"
