"""A run's records as the summary reads them: metrics.jsonl (the training log, see tinylm.runlog)
and metrics.json (the evaluation, see tinylm.evaluate), checked and named in every error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from ..errors import DataError
from ..io import read_json

SUMMARY_COLUMNS = [
    "model",
    "n_params",
    "best_step",
    "val_loss",
    "val_ppl",
    "val_bpb",
    "test_loss",
    "test_ppl",
    "test_bpb",
    "train_tokens_per_sec",
    "train_wall_sec",
]
# Keys each metrics.jsonl line of a kind must carry; lines of other kinds are skipped.
LOG_KEYS = {
    "train": ("step", "ce_loss", "elapsed_sec"),
    "eval": ("step", "val_loss", "elapsed_sec"),
}
MOE_KEYS = ("expert_load", "dropped_frac", "balance_loss", "z_loss")


class RunLog(NamedTuple):
    """One run's metrics.jsonl: train and eval lines, one per step, sorted by step."""

    train: pd.DataFrame
    val: pd.DataFrame

    @property
    def is_moe(self) -> bool:
        return "expert_load" in self.train.columns


# -- reading ---------------------------------------------------------------------------------------


def read_metrics_log(path: str | Path) -> RunLog:
    """Parse metrics.jsonl; after a resume the last line logged for a (kind, step) wins."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; train the model first (rule train_model)")
    rows: dict[str, dict[int, dict]] = {kind: {} for kind in LOG_KEYS}
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, 1):
            if text.strip():
                line = _parse_line(text, f"{path}, line {lineno}")
                if line is not None:
                    rows[line["kind"]][line["step"]] = line
    if not rows["train"]:
        raise DataError(
            f"{path}: no training lines; is the run finished? Delete the run folder to retrain"
        )
    train = pd.DataFrame([rows["train"][s] for s in sorted(rows["train"])])
    val = pd.DataFrame([rows["eval"][s] for s in sorted(rows["eval"])], columns=LOG_KEYS["eval"])
    _check_moe_columns(train, path)
    return RunLog(train=train, val=val)


def _parse_line(text: str, where: str) -> dict | None:
    try:
        line = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e}); fix or remove the line") from e
    if not isinstance(line, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(line).__name__}")
    if line.get("kind") not in LOG_KEYS:
        return None
    for key in LOG_KEYS[line["kind"]]:
        value = line.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise DataError(
                f"{where}: {line['kind']} line needs a number for {key!r}, got {value!r}"
            )
    return line


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


def read_run_metrics(path: str | Path, model: str) -> dict:
    """metrics.json of `model`, checked for the keys the summary and the samples page use."""
    metrics = read_json(path)
    if not isinstance(metrics, dict):
        raise DataError(f"{path}: expected a JSON object")
    missing = [key for key in [*SUMMARY_COLUMNS, "samples"] if key not in metrics]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)}; rerun rule evaluate_model")
    if metrics["model"] != model:
        raise DataError(f"{path}: holds model {metrics['model']!r}, expected {model!r}")
    samples = metrics["samples"]
    if not isinstance(samples, list) or not all(
        isinstance(s, dict)
        and isinstance(s.get("prompt"), str)
        and isinstance(s.get("completion"), str)
        for s in samples
    ):
        raise DataError(f"{path}: 'samples' must be a list of {{'prompt': str, 'completion': str}}")
    return metrics
