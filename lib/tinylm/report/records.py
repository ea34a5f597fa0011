"""A run's records as the summary reads them, checked and named in every error: config.json (the
settings it ran with, see tinylm.train), metrics.jsonl (its training log, see tinylm.runlog) and
metrics.json (the evaluation of its best checkpoint, see tinylm.evaluate); and its status.

Status: "ok"; "diverged" (tinylm.train logged a non-finite training loss: such a run ends there and
keeps its best model so far; or metrics.json holds a non-finite loss); "failed" (the log stops without a "done" line and there is no metrics.json).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from ..errors import DataError
from ..io import read_json

# metrics.json numbers the summary reads: the losses must be finite in a run counted as "ok"; the
# others may be null (a checkpoint from before they were recorded).
LOSS_KEYS = ("val_loss", "val_bpb", "test_loss", "test_bpb")
METRIC_KEYS = (
    *LOSS_KEYS,
    "val_ppl",
    "test_ppl",
    "n_params",
    "best_step",
    "final_step",
    "train_tokens_per_sec",
    "train_wall_sec",
)
# Keys each metrics.jsonl line of a kind must carry; lines of other kinds are skipped.
LOG_KEYS = {
    "train": ("step", "ce_loss", "elapsed_sec"),
    "eval": ("step", "val_loss", "elapsed_sec"),
}
END_KINDS = ("done", "diverged", "stopped")  # the line a run's log ends with, if it ended cleanly
MOE_KEYS = ("expert_load", "dropped_frac", "balance_loss", "z_loss")


class RunLog(NamedTuple):
    """One run's metrics.jsonl: train and eval lines, one per step, sorted by step; `end` its last
    line if that is a done, diverged or stopped line; `diverged` its diverged line, if any."""

    train: pd.DataFrame
    val: pd.DataFrame
    end: dict | None = None
    diverged: dict | None = None

    @property
    def is_moe(self) -> bool:
        return "expert_load" in self.train.columns

    @property
    def last_step(self) -> int:
        return int(self.train["step"].iloc[-1]) if len(self.train) else 0


class RunRecord(NamedTuple):
    """One run as the summary sees it: where it sits in the experiment and what it recorded."""

    name: str
    model: str  # its entry under models: in the config
    setting: str  # the run name without its seed: the runs averaged together
    seed: int
    sweep: str | None
    values: dict  # swept key -> value, in a sweep
    log: RunLog
    config: dict  # config.json
    metrics: dict | None  # metrics.json; None when training never finished
    status: str  # ok | diverged | failed
    note: str  # why, when not ok


def read_run(name: str, entry: Mapping) -> RunRecord:
    """Read one run: `entry` holds its files (history, config, metrics) and, from the workflow's run
    table, model, setting, seed, sweep and values (by default: the run is its own model and setting,
    its seed the recorded one, in no sweep)."""
    log = read_metrics_log(entry["history"])
    config = read_run_config(entry["config"], name)
    recorded_seed = config["train_config"]["seed"]
    seed = entry.get("seed", recorded_seed)
    if seed != recorded_seed:
        raise DataError(
            f"{entry['config']} records train seed {recorded_seed}, but the run table gives "
            f"run {name} seed {seed}: the run folder is stale; delete it to retrain"
        )
    values = dict(entry.get("values") or {})
    for key, value in values.items():
        recorded = recorded_value(config, key)
        if recorded is not None and recorded != value:
            raise DataError(
                f"{entry['config']} records {key} = {recorded!r}, but the run table gives run {name} "
                f"{key} = {value!r}: the run folder is stale; delete it to retrain"
            )
    metrics_path = Path(entry["metrics"])
    metrics = None
    if metrics_path.is_file() or (log.end or {}).get("kind") == "done":
        metrics = read_run_metrics(metrics_path, name)
    status, note = run_status(log, metrics)
    return RunRecord(
        name=name,
        model=entry.get("model", name),
        setting=entry.get("setting", name),
        seed=seed,
        sweep=entry.get("sweep"),
        values=values,
        log=log,
        config=config,
        metrics=metrics,
        status=status,
        note=note,
    )


def recorded_value(config: Mapping, key: str):
    """The value config.json records for a swept key ("train.lr", "d_model", "moe.top_k"), or None
    where it holds none (the model config is flat: "moe.top_k" is its "top_k")."""
    section = "train_config" if key.startswith("train.") else "model_config"
    return config[section].get(key.rsplit(".", 1)[-1])


def run_status(log: RunLog, metrics: dict | None) -> tuple[str, str]:
    """(status, note): see the module docstring."""
    end = log.end or {}
    if log.diverged is not None:
        return "diverged", f"non-finite training loss at step {log.diverged.get('step')} (metrics.jsonl)"
    if metrics is not None:
        bad = [f"{key} = {metrics[key]}" for key in LOSS_KEYS if not math.isfinite(metrics[key])]
        if bad:
            return "diverged", f"non-finite {', '.join(bad)} (metrics.json)"
        return "ok", ""
    how = (
        f"stopped by {end.get('signal')} and not resumed"
        if end.get("kind") == "stopped"
        else ("without finishing (no 'done' line in metrics.jsonl, no metrics.json)")
    )
    return "failed", f"training ended at step {log.last_step} {how}; see the run's train_model log"


def precision_as_run(config: Mapping) -> str:
    """The precision a run trained in: as config.json records it, else fp32 off CUDA (CPU and MPS
    runs ignore train.precision), else train.precision."""
    if "precision" in config:
        return config["precision"]
    if not str(config.get("device", "")).startswith("cuda"):
        return "fp32"
    return config["train_config"]["precision"]


def hardware(device: str | None) -> str | None:
    """The kind of device a record names, whatever its index: 'cpu', the GPU's name ('cuda:1 (NVIDIA
    H200)' is 'NVIDIA H200'), or 'cuda' where the record has no name; None for no record."""
    if device is None:
        return None
    named = re.fullmatch(r"cuda(?::\d+)? \((.+)\)", str(device))
    if named:
        return named.group(1)
    return "cuda" if re.fullmatch(r"cuda(?::\d+)?", str(device)) else str(device)


def compiled_as_run(config: Mapping) -> bool:
    """Whether the run's training step was compiled: train.compile, which applies on CUDA only."""
    return bool(config["train_config"].get("compile")) and str(config.get("device")).startswith("cuda")


def ran_with(record: RunRecord) -> dict:
    """How a run's numbers were computed beyond its settings, as config.json and metrics.json record
    them (None where they do not): the training's device, precision, compile, processes and CPU
    threads (every count a resumed run computed with), its torch, and the evaluation's device and
    precision (metrics.json; off CUDA it is fp32). A run resumed under other conditions (ran_on_all:
    every attempt's, tinylm.train) gives each value in the order its attempts had them, joined by
    THEN: "cuda:0 (NVIDIA H200), then cpu"."""
    cfg, metrics = record.config, record.metrics or {}
    threads = cfg.get("cpu_threads_all") or ([cfg["cpu_threads"]] if cfg.get("cpu_threads") else [])
    eval_device = metrics.get("device")
    eval_precision = metrics.get("precision")
    if eval_precision is None and eval_device is not None and not str(eval_device).startswith("cuda"):
        eval_precision = "fp32"
    attempts = cfg.get("ran_on_all") or []
    return {
        "device": _attempts(attempts, "device", cfg.get("device")),
        "precision": _attempts(attempts, "precision", precision_as_run(cfg)),
        "compile": _attempts(attempts, "compile", compiled_as_run(cfg)),
        "processes": _attempts(attempts, "world_size", cfg.get("world_size", 1)),
        "cpu_threads": " and ".join(map(str, threads)) or None,
        "torch": (cfg.get("software") or {}).get("torch"),
        "eval_device": eval_device,
        "eval_precision": eval_precision,
    }


THEN = ", then "  # between the values of a run's successive attempts


def _attempts(attempts: list, key: str, last):
    """`last` (config.json's, the last attempt's), or where the attempts had more than one value of
    `key`, each as text joined by THEN, a value repeated by the next attempt said once."""
    changes = said_once([a.get(key, last) for a in attempts if isinstance(a, Mapping)])
    return THEN.join(map(str, changes)) if len(changes) > 1 else last


def said_once(values: list) -> list:
    """`values` with each one that repeats the one before it left out: a run's attempts, once per change."""
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


def recorded_settings(record: RunRecord) -> dict[str, str]:
    """What a run ran with, as text, from its config.json and metrics.json only."""
    cfg, train, metrics = record.config, record.config["train_config"], record.metrics or {}
    ran = ran_with(record)
    final = metrics.get("final_step") or record.log.last_step
    out = {
        "model": record.model,
        "seed": str(record.seed),
        "status": record.status,
        # every attempt's, in order, where a resumed run changed them (ran_with)
        **{key: str(ran[key]) for key in ("device", "precision", "compile", "processes")},
        "steps run": f"{final:,}",
        "stop reason": str(metrics.get("stop_reason") or record.status),
    }
    skip = {"device", "precision", "compile", "seed", "wandb", "gpus", "max_gpus"}
    out.update({key: _text(value) for key, value in train.items() if key not in skip})
    model = cfg["model_config"]
    moe_only = (
        "n_experts",
        "top_k",
        "capacity_factor",
        "drop_tokens",
        "aux_loss_coef",
        "z_loss_coef",
        "d_ff_expert",
    )
    out.update(
        {
            key: _text(value)
            for key, value in model.items()
            if model.get("ffn") == "moe" or key not in moe_only
        }
    )
    out["parameters"] = f"{cfg['n_params']:,}"
    out["train data"] = str(cfg["train_bin"])
    out["validation data"] = str(cfg["val_bin"])
    out["tokenizer"] = f"{cfg['tokenizer_path']} (sha256 {str(cfg['tokenizer_sha256'])[:12]}…)"
    return out


def _text(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value}"
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


# -- reading ---------------------------------------------------------------------------------------


def read_metrics_log(path: str | Path) -> RunLog:
    """Parse metrics.jsonl; after a resume the last line logged for a (kind, step) wins."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; train the model first (rule train_model)")
    rows: dict[str, dict[int, dict]] = {kind: {} for kind in LOG_KEYS}
    end = diverged = None
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, 1):
            if text.strip():
                line = _parse_line(text, f"{path}, line {lineno}")
                if line.get("kind") in LOG_KEYS:
                    rows[line["kind"]][line["step"]] = line
                end = line if line.get("kind") in END_KINDS else None
                diverged = line if line.get("kind") == "diverged" else diverged
    if not rows["train"] and diverged is None:
        raise DataError(
            f"{path}: no training lines; is the run finished? Delete the run folder to retrain"
        )
    train = pd.DataFrame(
        [rows["train"][s] for s in sorted(rows["train"])] or None,
        columns=None if rows["train"] else LOG_KEYS["train"],
    )
    val = pd.DataFrame([rows["eval"][s] for s in sorted(rows["eval"])], columns=LOG_KEYS["eval"])
    _check_moe_columns(train, path)
    return RunLog(train=train, val=val, end=end, diverged=diverged)


def is_number(value) -> bool:
    """An int or float (numpy's too), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _parse_line(text: str, where: str) -> dict:
    try:
        line = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e}); fix or remove the line") from e
    if not isinstance(line, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(line).__name__}")
    if not isinstance(line.get("kind"), str):
        raise DataError(f"{where}: 'kind' must be text, got {line.get('kind')!r}")
    for key in LOG_KEYS.get(line.get("kind"), ()):
        value = line.get(key)
        if not is_number(value):
            raise DataError(
                f"{where}: {line['kind']} line needs a number for {key!r}, got {value!r}"
            )
    return line


def read_run_metrics(path: str | Path, run: str) -> dict:
    """metrics.json of `run`, checked for the keys the summary and the samples page use."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: file not found; training finished, so evaluate the run (rule evaluate_model)"
        )
    metrics = read_json(path)
    if not isinstance(metrics, dict):
        raise DataError(f"{path}: expected a JSON object")
    missing = [key for key in ["model", *METRIC_KEYS, "samples"] if key not in metrics]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)}; rerun rule evaluate_model")
    if metrics["model"] != run:
        raise DataError(f"{path}: holds model {metrics['model']!r}, expected {run!r}")
    samples = metrics["samples"]
    if not isinstance(samples, list) or not all(
        isinstance(s, dict)
        and isinstance(s.get("prompt"), str)
        and isinstance(s.get("completion"), str)
        for s in samples
    ):
        raise DataError(f"{path}: 'samples' must be a list of {{'prompt': str, 'completion': str}}")
    for key in METRIC_KEYS:
        value = metrics[key]
        if value is None and key not in LOSS_KEYS:
            continue
        if not is_number(value):
            raise DataError(
                f"{path}: {key} must be a number, got {value!r}; rerun rule evaluate_model"
            )
    return metrics


def read_run_config(path: str | Path, run: str) -> dict:
    """config.json of `run` (written by tinylm.train when the run starts)."""
    config = read_json(path)
    missing = [
        key
        for key in (
            "run",
            "model_config",
            "train_config",
            "n_params",
            "train_bin",
            "val_bin",
            "tokenizer_path",
            "tokenizer_sha256",
        )
        if key not in config
    ]
    if missing:
        raise DataError(
            f"{path}: missing key(s) {', '.join(missing)}; delete the run folder to retrain"
        )
    if config["run"] != run:
        raise DataError(f"{path}: holds run {config['run']!r}, expected {run!r}")
    if "seed" not in config["train_config"]:
        raise DataError(f"{path}: train_config has no seed; delete the run folder to retrain")
    return config


def _check_moe_columns(train: pd.DataFrame, path: Path) -> None:
    """Either no training line has MoE keys or all do, with one (layers, experts) shape."""
    present = [key for key in MOE_KEYS if key in train.columns]
    if not present:
        return
    incomplete = [key for key in MOE_KEYS if key not in train.columns or train[key].isna().any()]
    if incomplete:
        raise DataError(f"{path}: some training lines lack MoE key(s) {', '.join(incomplete)}")
    shapes = {_shape(load) for load in train["expert_load"]}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise DataError(
            f"{path}: expert_load must be [layers][experts] with one shape on every line, got "
            + ", ".join(sorted(map(str, shapes)))
        )


def _shape(value) -> tuple | str:
    try:
        return np.array(value, dtype=float).shape
    except (TypeError, ValueError):
        return "ragged"
