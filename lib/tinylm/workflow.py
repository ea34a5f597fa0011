"""Config resolution for the Snakemake workflow (rules/common.smk), kept here so it is unit-tested.

`check_config` checks the config against config/schema.yaml and then what a JSON schema cannot express
(cross-key rules, per-model overrides, sweeps), so that bad input fails before any job is submitted,
with the key and the value named. `check_inputs` does the same for the files already on disk, and
`check_configfiles` and `check_targets` for the command line's config files and targets.
`expand_runs` turns models, seeds and sweeps into the list of runs, one training job each.
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import json
import os
import re
import shlex
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath

import yaml

from . import runlock, schema
from .config import RECORD_ONLY_KEYS, GPTConfig, check_lr_schedule, progress_interval
from .data.pack import check_packed, check_packed_unchanged
from .data.sources import (
    check_local_files,
    check_local_files_fill_a_row,
    recorded_more_stories,
    split_short_of_a_row,
)
from .data.tokenizer import check_tokenizer_config, tokenizer_sha256
from .errors import CheckpointError, ConfigError, DataError
from .io import write_json
from .verify import made_from_elsewhere


def check_yaml_syntax(path: str | Path):
    """Parse a config file, if it exists, and name the file, line and column of a YAML mistake:
    Snakemake's own message names neither. Returns what the file holds (None without a file)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
        if (data := _json_config(path, text)) is not None:  # as Snakemake reads it: JSON first, then YAML
            return data
        data = yaml.safe_load(text)
        repeated = _repeated_key(yaml.compose(text))
    except yaml.MarkedYAMLError as e:
        mark, context = e.problem_mark, ""
        if e.context and e.context_mark:
            context = f" ({e.context} at line {e.context_mark.line + 1})"
        raise ConfigError(f"{path}, line {mark.line + 1}, column {mark.column + 1}: {e.problem}{context}; "
                          "fix the YAML there") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e}); save it as UTF-8") from None
    if repeated:
        key, first, again = repeated
        raise ConfigError(f"{path}, line {again}: key {key!r} is given twice (also at line {first}); YAML keeps only "
                          f"the last and drops the first with all it holds, without a word: merge them into one")
    return data


def _json_config(path: Path, text: str):
    """What `text` holds where it is JSON (Snakemake reads a config file as JSON before trying YAML, and JSON
    indented with tabs is no YAML), else None; a key given twice in one object refused, as in YAML."""
    repeated: list[str] = []

    def pairs(items: list) -> dict:
        keys = [k for k, _ in items]
        repeated.extend(k for i, k in enumerate(keys) if k in keys[:i])
        return dict(items)

    try:
        data = json.loads(text, object_pairs_hook=pairs)
    except ValueError:
        return None
    if repeated:
        raise ConfigError(f"{path}: key {repeated[0]!r} is given twice in one JSON object; JSON readers keep only the "
                          f"last and drop the first with all it holds, without a word: merge them into one")
    return data


def _repeated_key(node, where: str = "") -> tuple[str, int, int] | None:
    """The first key that a mapping in the composed YAML `node` gives twice among its own keys, as (its
    dotted place, the line of the first, the line of the repeat); keys merged in with `<<: *name` may be
    overridden. None where there is none."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for k, v in node.value:
            if k.tag == MERGE_TAG or not isinstance(k, yaml.ScalarNode):
                continue
            key = f"{where}.{k.value}" if where else k.value
            if k.value in seen:
                return key, seen[k.value], k.start_mark.line + 1
            seen[k.value] = k.start_mark.line + 1
            if found := _repeated_key(v, key):
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            if found := _repeated_key(v, f"{where}[{i}]"):
                return found
    return None


def read_config_file(path: Path) -> dict:
    """One config file as Snakemake reads it: a mapping of settings at the top level, or ConfigError
    naming the file (and the line of a YAML mistake)."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    data = check_yaml_syntax(path)
    if not isinstance(data, dict):
        what = "nothing" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{path} holds {what}, not a mapping of settings (key: value lines, as in "
                          f"config/config.yaml); Snakemake refuses it as --configfile too")
    return data


def load_merged(base: str | Path, files: Sequence[str | Path]) -> dict:
    """`files` merged as Snakemake merges --configfile: into one another in order, then the result over
    `base` (the Snakefile's configfile), with Snakemake's own update_config."""
    from snakemake.utils import update_config

    overlay: dict = {}
    for path in files:
        update_config(overlay, read_config_file(Path(path)))
    config = read_config_file(Path(base))
    update_config(config, overlay)
    return config


def config_error_source(base: str | Path, files: Sequence[str | Path], error: ConfigError) -> str:
    """Where check_config's `error` for `base` with `files` merged over it comes from: 'FILE, line N: '
    for the config file whose value Snakemake keeps (the last of `files` that sets the error's key and,
    merged alone over `base`, gives the same error; else `base`), 'FILE: ' for the file that alone
    gives it where no file sets a key (`base` itself, else the first of `files`); '' where no one file
    does (the mistake lies in how the files combine, or in settings given on the command line). Where
    the error lists several settings, the first's file and line: the file that alone gives that one."""
    message = str(error)

    def alone_gives_it(path) -> bool:  # the error, or where it lists several settings, its first
        try:
            check_config(load_merged(base, [] if path is base else [path]))
        except ConfigError as alone:
            if str(alone) == message:
                return True
            lines = [line.strip() for line in str(alone).splitlines()]
            return error.first is not None and (lines[0].startswith(error.first) or error.first in lines[1:])
        return False

    if error.key:
        for path in (*reversed(files), base):
            line = yaml_line(Path(path), error.key)
            if line and alone_gives_it(path):
                return f"{path}, line {line}: "
    for path in (base, *files):
        if alone_gives_it(path):
            return f"{path}: "
    return ""


MERGE_TAG = "tag:yaml.org,2002:merge"


def _entries(node: yaml.MappingNode) -> list:
    """A mapping's (key, value) nodes as YAML resolves them: those merged in with `<<: *name` first,
    then its own, each later one overriding an earlier one of the same key."""
    merged, own = [], []
    for k, v in node.value:
        if k.tag == MERGE_TAG:
            for m in v.value if isinstance(v, yaml.SequenceNode) else [v]:
                if isinstance(m, yaml.MappingNode):
                    merged.extend(_entries(m))
        else:
            own.append((k, v))
    return merged + own


def yaml_line(path: Path, key: str) -> int | None:
    """The line (from 1) of the setting `key` in the YAML file `path`: keys joined by dots, list positions
    in brackets (`models.condor.seeds[1]`), as ConfigError.key writes them; a key that holds dots itself (a
    sweep's `train.lr`) is matched whole. Where YAML resolves a key from several places (a key repeated,
    or merged in with `<<: *name`), the one it keeps; a merged key's line is where its anchor sets it.
    None where the file does not set it."""
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    rest, line = key, None
    while rest:
        if isinstance(node, yaml.SequenceNode):
            m = re.match(r"\[(\d+)\]\.?", rest)
            if not m or int(m.group(1)) >= len(node.value):
                return None
            node = node.value[int(m.group(1))]
            line, rest = node.start_mark.line + 1, rest[m.end():]
        elif isinstance(node, yaml.MappingNode):
            # the longest key of this mapping that the rest starts with, followed by a dot, a [ or nothing;
            # of equal ones the last, which YAML keeps
            fits = [(i, k, v) for i, (k, v) in enumerate(_entries(node)) if isinstance(k, yaml.ScalarNode)
                    and re.match(re.escape(k.value) + r"(\.|(?=\[)|$)", rest)]
            if not fits:
                return None
            _, k, node = max(fits, key=lambda ikv: (len(ikv[1].value), ikv[0]))
            line, rest = k.start_mark.line + 1, rest[len(k.value):].removeprefix(".")
        else:
            return None
    return line


def train_params(config: dict, model: str) -> dict:
    """The top-level train section with the model's `train:` overrides applied."""
    merged = copy.deepcopy(config["train"])
    for key, value in (config["models"][model].get("train") or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def split_record_only(train: dict) -> tuple[dict, dict]:
    """A run's resolved train settings as (those its results depend on, the record-only ones:
    config.RECORD_ONLY_KEYS). The train rule passes the second apart, so that changing them does not
    retrain a finished run."""
    return ({k: v for k, v in train.items() if k not in RECORD_ONLY_KEYS},
            {k: v for k, v in train.items() if k in RECORD_ONLY_KEYS})


def model_params(config: dict, model: str) -> dict:
    """The flat GPTConfig dict for `model` (vocab_size from the tokenizer section), as rule train_model
    passes it. A key with an `x-default` (config/schema.yaml) set to that default is left out: written
    or not, it is the same model, and these parameters decide whether Snakemake retrains a finished run."""
    entry = {k: v for k, v in config["models"][model].items() if k not in ("train", "seeds")}
    moe = entry.pop("moe", None) or {}
    unwritten = {k: spec["x-default"] for k, spec in schema.section("model")["properties"].items()
                 if "x-default" in spec}
    return {"vocab_size": config["tokenizer"]["vocab_size"],
            **{k: v for k, v in {**entry, **moe}.items() if not _is_default(v, unwritten.get(k, ...))}}


def with_floats(values: dict, *sections: str) -> dict:
    """`values` with each whole number given for a setting of type number in the schema `sections`
    (schema.section) as a float: `grad_clip: 1` is the default 1.0, and the rules' parameters, which
    decide whether Snakemake reruns a finished job, must not tell the two apart."""
    numbers = {k for s in sections for k, spec in schema.section(s)["properties"].items() if spec.get("type") == "number"}
    return {k: float(v) if k in numbers and type(v) is int else v for k, v in values.items()}


def _is_default(value, default) -> bool:
    """value == default, where a bool is no number (0.0 is dropout's default; False is not)."""
    return value == default and isinstance(value, bool) == isinstance(default, bool)


# Key names that hold credentials: api_key, wandb_key, hf_token, password, client_secret, and dotted
# ones (wandb.token: `--config` does not nest them; a sweep's grid keys are paths) ... (special_tokens or
# max_new_tokens are not: the name must end in the word).
_SECRET = re.compile(r"(^|[_.])(api_?key|key|token|password|passwd|secret|credentials?)$")


def merge_config(base: dict, overlay: dict) -> dict:
    """`overlay` merged into `base` in place, as Snakemake merges each --configfile over the
    Snakefile's config: mappings key by key, anything else (lists too) replaced. Returns `base`."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_config(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def check_no_secrets(config: dict | list, where: str = "") -> None:
    """Refuse a key that looks like a credential, without showing its value: config files end up
    in run records, logs and version control. Mappings inside lists too: the schema's error for a
    misplaced list prints it whole."""
    if isinstance(config, list):
        for i, item in enumerate(config):
            if isinstance(item, (dict, list)):
                check_no_secrets(item, f"{where}[{i}]")
        return
    for key, value in config.items():
        name = f"{where}.{key}" if where else str(key)
        # Model and sweep names are names, not settings.
        if where not in ("models", "sweeps") and _SECRET.search(str(key).lower().replace("-", "_")):
            raise ConfigError(
                f"config key {name!r} looks like a secret (API key, token or password); secrets do not go "
                "in config files, which are copied into logs and run records (its value is not shown). "
                "Remove it: W&B reads its key from WANDB_API_KEY in the environment or in a .env file in "
                "the working directory")
        if isinstance(value, (dict, list)):
            check_no_secrets(value, name)


# Top folders of the workflow's outputs at their default places (results_dir may add another).
MADE_HERE = ("artifacts", "data", "logs", "benchmarks")
RESULTS_TARGET = re.compile(r"(?P<dir>.+?)/(?:runs/(?P<run>[^/]+)(?:/.*)?|summary[^/]*\.csv|plots/.+)")
# The shared data's outputs and the data rules' logs and benchmarks, where no results_dir may be
# (check_results_dir): a dataset or tokenizer may be named runs or plots there
DATA_TARGET = re.compile(r"(?:data|logs|benchmarks|artifacts/tokenizers)/.*")
# The data rules' outputs: data/raw/<dataset>/..., data/processed and artifacts/tokenizers <dataset>/<tokenizer>/...
DATA_OUTPUT = re.compile(r"(?:data/raw/(?P<raw>[^/]+)|(?P<top>data/processed|artifacts/tokenizers)/(?P<dataset>[^/]+)"
                         r"/(?P<tokenizer>[^/]+))/(?P<file>[^/]+)")


def command_line(argv: list[str] | None = None) -> argparse.Namespace | None:
    """The arguments of the `snakemake` command line running this process (`argv`: sys.argv), or None
    where it is not one (the Python API). Snakemake hands the targets and the DAG settings
    (--forceall) to a workflow only after reading it; the rules need them while being read."""
    from snakemake.cli import get_argument_parser

    argv = sys.argv if argv is None else argv
    if not argv or os.path.basename(argv[0]) not in ("snakemake", "__main__.py"):
        return None
    try:
        return get_argument_parser().parse_known_args(argv[1:])[0]
    except SystemExit:  # argparse gave up; Snakemake itself will say why
        return None


# Kinds of file the workflow writes that no config file is: a --configfile ending so is a target.
OUTPUT_SUFFIXES = (".csv", ".png", ".html", ".pt", ".bin", ".tsv", ".log", ".zip", ".txt", ".jsonl")


def check_configfiles(paths: Iterable[str | os.PathLike], workdir: str | os.PathLike) -> None:
    """Refuse a --configfile that is a file this workflow makes: a target typed after --configfile,
    which Snakemake reads as one more config file (its keys then fail the schema, naming no file).
    A file is taken for a target where it lies in the workflow's output folders or a run's folder, or
    ends like an output (OUTPUT_SUFFIXES); any other name is a config, as Snakemake reads any YAML
    or JSON file whatever its name."""
    for path in paths:
        rel = os.path.relpath(path, workdir)
        suffix, top = Path(rel).suffix, Path(rel).parts[0]
        if suffix in (".yaml", ".yml") or not (top in MADE_HERE or "/runs/" in f"/{rel}"
                                               or suffix in OUTPUT_SUFFIXES):
            continue
        raise ConfigError(f"--configfile {rel} is a file this workflow makes, not a config; Snakemake reads "
                          f"every path after --configfile as a config file: put targets before it "
                          f"(snakemake --cores 4 {rel} --configfile my.yaml)")


def check_configfile_options(argv: list[str] | None = None) -> None:
    """Refuse --configfile given more than once on a `snakemake` command line (`argv`: sys.argv):
    Snakemake keeps only the last option's files and drops the others without a word, so the config
    would be another than the one typed (the defaults' data and runs, in another results_dir)."""
    argv = sys.argv if argv is None else argv
    if not argv or os.path.basename(argv[0]) not in ("snakemake", "__main__.py"):
        return
    given: list[list[str]] = []  # the files of each --configfile option
    current = None  # the list the next plain word goes to, if any
    for arg in argv[1:]:
        name, eq, value = arg.partition("=")
        if name.startswith("--configf") and "--configfiles".startswith(name):  # or as abbreviated
            given.append([value] if eq else [])
            current = None if eq else given[-1]
        elif arg.startswith("-"):
            current = None
        elif current is not None:
            current.append(arg)
    dropped = list(dict.fromkeys(f for files in given[:-1] for f in files if f not in given[-1]))
    if dropped:
        raise ConfigError(f"--configfile given {len(given)} times: Snakemake reads only the last "
                          f"({' '.join(given[-1])}), not {' '.join(dropped)}; list every config file after one "
                          f"--configfile: --configfile {' '.join(dropped + given[-1])}")


def check_targets(targets: Iterable[str], results_dir: str, runs: dict[str, dict],
                  workdir: str | os.PathLike, dataset: str | None = None, tokenizer: str | None = None) -> None:
    """Refuse a target among some config's results (runs/<run>/..., summary*.csv, plots/...) that this
    config does not make, naming where its results go and its runs, and a data file of another `dataset`
    or `tokenizer` name than this config's (dataset.name, tokenizer.name); Snakemake would only say that
    no rule makes it."""
    results_dir = os.path.normpath(results_dir)
    for target in targets:
        rel = os.path.relpath(target, workdir) if os.path.isabs(target) else os.path.normpath(target)
        d = DATA_OUTPUT.fullmatch(rel) if dataset is not None and tokenizer is not None else None
        if d is not None:
            theirs = {"dataset": d["raw"] or d["dataset"], "tokenizer": d["tokenizer"]}
            ours = {"dataset": dataset, "tokenizer": tokenizer if d["top"] else None}
            differ = [k for k in ("dataset", "tokenizer") if theirs[k] != ours[k]]
            if differ:
                own = f"data/raw/{dataset}" if d["raw"] else f"{d['top']}/{dataset}/{tokenizer}"
                raise ConfigError(f"{target}: " + "; ".join(f"this config's {k} is {ours[k]!r} ({k}.name), not "
                                                            f"{theirs[k]!r}" for k in differ)
                                  + f"; give the --configfile of the config that names it, after the target "
                                  f"(snakemake --cores 4 {target} --configfile my.yaml), or ask for {own}/{d['file']}")
            continue
        m = RESULTS_TARGET.fullmatch(rel)
        if m is None or DATA_TARGET.fullmatch(rel):
            continue
        # results_dir may be absolute, or lie in workdir written either way: compare where the two are
        if os.path.normpath(os.path.join(workdir, m["dir"])) != os.path.join(workdir, results_dir):
            rest = rel[len(m["dir"]) + 1:]
            if m["run"] is not None and m["run"] not in runs:  # this config's nearest run, if any
                close = schema.closest_key(m["run"], runs)
                rest = f"runs/{close}{rel[m.end('run'):]}" if close else None
            raise ConfigError(f"{target}: this config writes its results under {results_dir}/ (its results_dir), "
                              f"not {m['dir']}/; give the --configfile of the config that writes there"
                              + (f", or ask for {results_dir}/{rest}" if rest else ""))
        if m["run"] is not None and m["run"] not in runs:
            raise ConfigError(f"{target}: this config has no run {m['run']!r} (its runs: {', '.join(runs)})"
                              f"{_did_you_mean(m['run'], runs)}")
        # Snakemake matches a target to the outputs as spelled (results_dir's way), and otherwise says only
        # that no rule makes it
        if os.path.isabs(target) != os.path.isabs(results_dir):
            raise ConfigError(f"{target}: Snakemake knows this config's results by their paths as its results_dir "
                              f"writes them; ask for {results_dir}/{rel[len(m['dir']) + 1:]}")


# Top folders of a checkout that hold no results (and may hold many files).
REPORT_SKIP = ("data", "lib", "tests", "rules", "config", "docs", "dev", "venv", "node_modules", "benchmarks", "logs")


def check_report_ready(results_dir: str, workdir: str | os.PathLike) -> None:
    """Refuse `snakemake --report` before this config's summary exists, naming what builds it and the
    results folders under `workdir` that have one (another config's: add its --configfile). Snakemake's
    own message names only the first missing file."""
    summary = Path(results_dir) / "summary.csv"
    if (Path(workdir) / summary).is_file():
        return
    built = []
    for top, dirs, files in os.walk(workdir):  # results folders, a few levels down, outside code and data
        rel = os.path.relpath(top, workdir)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        dirs[:] = [d for d in dirs if depth < 4 and not d.startswith(".") and (depth or d not in REPORT_SKIP)]
        if "summary.csv" in files and rel != ".":
            built.append(rel)
    built.sort()
    elsewhere = (f"; results here are under {', '.join(built)}: for those, add the --configfile of the config "
                 f"that made them (its results_dir)") if built else ""
    raise ConfigError(f"--report: {summary} does not exist, so this config's results are not built yet. Build "
                      f"them first (snakemake --cores 4, with the same --configfile arguments), then make the "
                      f"report{elsewhere}")


def check_report_current(results_dir: str, workdir: str | os.PathLike, runs: dict[str, dict],
                         reference: str | None) -> None:
    """Refuse `snakemake --report` of a summary built for other runs (a seed or sweep point added or
    dropped since) or against another reference setting (compare_to changed): the report reads the
    summary as built, and would describe the config before the change. `runs`: expand_runs."""
    folder = Path(workdir) / results_dir
    again = ("run snakemake with the same --configfile arguments first (it trains what is new and summarizes "
             "again), then make the report")
    summarized = _csv_column(folder / "summary.csv", "run")
    if summarized is None:
        raise ConfigError(f"--report: {results_dir}/summary.csv has no 'run' column (an older tinylm wrote it); {again}")
    if set(summarized) != set(runs):
        new = [r for r in runs if r not in summarized]
        gone = [r for r in summarized if r not in runs]
        what = "; ".join(([f"not yet summarized: {', '.join(new)}"] if new else [])
                         + ([f"no longer in the config: {', '.join(gone)}"] if gone else []))
        raise ConfigError(f"--report: {results_dir}/summary.csv summarizes other runs than this config's ({what}); "
                          f"{again}")
    # summarize compares every other setting with the reference: one row or more each, none without one
    compared = set(_csv_column(folder / "summary_vs_reference.csv", "reference") or []) - {""}
    others = reference is not None and any(run["setting"] != reference for run in runs.values())
    if compared != ({reference} if others else set()):
        made = f"compares the settings with {', '.join(sorted(compared))}" if compared else "compares no settings"
        raise ConfigError(f"--report: {results_dir}/summary_vs_reference.csv {made}; this config compares them "
                          f"with {reference or 'none'} (compare_to); {again}")


def _csv_column(path: Path, column: str) -> list[str] | None:
    """The values of one column of a CSV file: [] where the file is missing, None where the column is."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if column not in (reader.fieldnames or []):
                return None
            return [row.get(column) or "" for row in reader]
    except OSError:
        return []


def check_runs_free(run_dirs: Iterable[str | os.PathLike]) -> None:
    """Refuse to start when a run about to be trained is held by a live trainer (another Snakemake's
    job, here or on a cluster node). Snakemake deletes a job's outputs before the job starts and again
    when it fails, so scheduling such a run would destroy the other trainer's work before the new
    trainer could find the lock."""
    busy = [(str(d), held) for d in run_dirs if (held := runlock.held_by(d)) is not None]
    if busy:
        which = "; ".join(f"{d} is being trained ({who})" for d, (who, _) in busy)
        stops = "; ".join(stop for _, (_, stop) in busy)
        raise ConfigError(f"{which}. Starting that training again now would make Snakemake delete the run's "
                          f"files first. Wait for it to finish (another Snakemake's job, or a cluster job from "
                          f"before `snakemake --unlock`), or stop it ({stops}), then run again.")


def check_checkpoints_unchanged(paths: Iterable[str | os.PathLike]) -> None:
    """Refuse to start when a best checkpoint about to be evaluated as it is (its training not rerun)
    changed since training recorded its sha256. Snakemake reruns the evaluation of a checkpoint newer
    than its metrics and deletes the metrics first; the evaluation would then refuse the checkpoint,
    and the last good metrics.json would be lost for nothing."""
    for path, e in changed_checkpoints(paths):
        metrics = path.parent.parent / "metrics.json"
        kept = f"; {metrics} is kept" if metrics.is_file() else ""
        raise ConfigError(f"{e}. Nothing was run{kept}") from e


def changed_checkpoints(paths: Iterable[str | os.PathLike]) -> Iterator[tuple[Path, CheckpointError]]:
    """(path, why) for each best checkpoint of `paths` that exists and changed since training recorded
    its sha256 (checkpoint.check_recorded), hashed one at a time as they are asked for."""
    paths = [Path(p) for p in paths if Path(p).is_file()]
    if not paths:
        return
    from .checkpoint import check_recorded  # imports torch: only when there is something to check

    for path in paths:
        try:
            check_recorded(path)
        except CheckpointError as e:
            yield path, e


def resume_refusals(runs: dict[str, dict], runs_dir: str | os.PathLike) -> dict[str, tuple[Path, str]]:
    """run -> (its checkpoints/last.pt, why its training would refuse to resume it) for the runs
    (`runs`: expand_runs entries) whose last.pt, an interrupted training, was made with other model or
    train settings, another eval.batch_size or rows of another packing.seq_len than the config now gives
    them (train.resume refuses it by the same check; the tokenizer and the packed data's sha256, which it
    checks too, may yet be rebuilt by the jobs before it). Opens only the last.pt files there are (torch
    is imported only then), and reads only their records."""
    lasts = {name: Path(runs_dir) / name / "checkpoints" / "last.pt" for name in runs}
    lasts = {name: path for name, path in lasts.items() if path.is_file()}
    if not lasts:
        return {}
    from .checkpoint import check_resumable, load_checkpoint
    from .config import TrainConfig

    refused = {}
    for name, path in lasts.items():
        try:
            seq_len = runs[name].get("seq_len")
            check_resumable(load_checkpoint(path, mmap=True), path, GPTConfig.from_dict(dict(runs[name]["model_config"])),
                            TrainConfig.from_dict(dict(runs[name]["train_config"])),
                            eval_batch_size=runs[name].get("eval_batch_size"),
                            seq_len=None if seq_len is None else (seq_len, "this config's packed data (packing.seq_len)"))
        except CheckpointError as e:
            refused[name] = (path, str(e))
    return refused


def check_resumes(runs: dict[str, dict], runs_dir: str | os.PathLike) -> None:
    """Refuse before any job the runs to be trained whose last.pt their jobs would refuse to resume
    (resume_refusals), all of them in one message. The job would refuse it too, but only once started,
    and Snakemake would stop the other jobs with it."""
    refused = resume_refusals(runs, runs_dir)
    if len(refused) == 1:
        (path, why), = refused.values()
        raise ConfigError(f"{why}. Nothing was run; {path} is kept")
    if refused:
        raise ConfigError("\n".join(why for _, why in refused.values()) + "\nNothing was run; those last.pt files are kept")


def gpu_shortfalls(runs: dict[str, dict], gpu_limit: int | None) -> dict[str, str]:
    """run -> why, for the runs (`runs`: expand_runs entries) whose train.gpus is more than the `gpu`
    resource Snakemake was given (`gpu_limit`: --resources gpu=N or a profile's; None when none was).
    Snakemake lowers such a job's request to the limit without a word and starts it; its launcher then
    starts train.gpus processes, one per GPU. A run with train.device: cpu uses no GPU: never refused."""
    if gpu_limit is None:
        return {}
    return {name: (f"run {name}: train.gpus = {run['train_config']['gpus']} is more than the gpu={gpu_limit} "
                   f"Snakemake was given (--resources, or the profile's resources: gpu), and Snakemake would "
                   f"start its job anyway with one process per GPU; give --resources "
                   f"gpu={run['train_config']['gpus']} if the machine has the GPUs, lower train.gpus, or set "
                   f"train.device: cpu for processes on the CPU")
            for name, run in runs.items()
            if run["train_config"]["gpus"] > gpu_limit and run["train_config"]["device"] != "cpu"}


def check_gpus_given(runs: dict[str, dict], gpu_limit: int | None) -> None:
    """Refuse before any job the runs to be trained that ask for more GPUs than Snakemake was given
    (gpu_shortfalls)."""
    if refused := gpu_shortfalls(runs, gpu_limit):
        raise ConfigError("\n".join(refused.values()) + "\nNothing was run")


def check_cuda_here(runs: dict[str, dict]) -> None:
    """Refuse before any job the runs (`runs`: expand_runs entries, those to train or evaluate) with
    train.device: cuda where this machine shows no CUDA GPU; for jobs that run here (not on a cluster's
    nodes). Each job would fail at once, but only once started, after Snakemake had deleted the outputs
    of the run it trains again: a finished run's model, where train.device changed to cuda."""
    wanting = [name for name, run in runs.items() if run["train_config"]["device"] == "cuda"]
    if not wanting:
        return
    import torch  # only when a run asks for CUDA

    if torch.cuda.is_available():
        return
    which = f"run{'s' if len(wanting) > 1 else ''} {', '.join(wanting)}"
    raise ConfigError(f"{which}: train.device = 'cuda' but no CUDA GPU is visible on this machine, where the jobs "
                      f"run (check CUDA_VISIBLE_DEVICES and the driver); set train.device: auto to fall back to "
                      f"the CPU, or run where a GPU is. Nothing was run")


def dry_run_warnings(runs: dict[str, dict], runs_dir: str | os.PathLike, gpu_limit: int | None = None) -> list[str]:
    """What a dry run (`snakemake -n`) would not show: it skips the checks made before the first job,
    which need to know the jobs. Those, for every run of the config whatever the targets: a progress
    interval ($TINYLM_PROGRESS_SEC) that training would refuse, a run that a live trainer holds, a
    last.pt its training would refuse (an interrupted run is trained whenever its results are wanted),
    a best checkpoint that changed since training recorded its sha256, and a run that asks for more
    GPUs than `gpu_limit` (gpu_shortfalls). Of those, only checkpoints
    newer than their metrics.json are hashed (so a dry run over many finished runs does not read every
    model): the real run also hashes one whose evaluation reruns for another reason (changed eval
    settings, a newer tokenizer), which a parse-time warning cannot know of."""
    then = "without -n, Snakemake stops before any job when it is to train run"
    warnings = []
    try:
        progress_interval()  # read from the environment by each training job
    except ConfigError as e:
        warnings.append(f"{e}; without -n, Snakemake stops before any job when it is to train a run")
    for name in runs:
        if (held := runlock.held_by(Path(runs_dir) / name)) is not None:
            who, stop = held
            warnings.append(f"{Path(runs_dir) / name} is being trained ({who}); {then} {name}: wait for that "
                            f"training to finish, or stop it ({stop})")
    warnings += [f"{why}; {then} {name}" for name, (_, why) in resume_refusals(runs, runs_dir).items()]
    warnings += [f"{why}; {then} {name}" for name, why in gpu_shortfalls(runs, gpu_limit).items()]
    best = {Path(runs_dir) / name / "checkpoints" / "best_model.pt": name for name in runs}
    newer = [path for path in best if path.is_file() and _newer_than_its_metrics(path)]
    return warnings + [f"{e}; without -n, Snakemake stops before any job when it is to evaluate run {best[path]} "
                       f"as it is" for path, e in changed_checkpoints(newer)]


def _newer_than_its_metrics(best: Path) -> bool:
    """Whether Snakemake reruns the evaluation of the existing checkpoint `best` for its own sake: its
    run's metrics.json is missing or older."""
    metrics = best.parent.parent / "metrics.json"
    return not metrics.is_file() or best.stat().st_mtime > metrics.stat().st_mtime


def check_config(config: dict, schema_path: str | Path | None = None) -> None:
    """Check `config` before any job runs; raises ConfigError naming the key, the value and the fix.

    First against config/schema.yaml, which holds every bound (so this also runs before Snakemake's
    own validate(), whose errors do not name the key as plainly), then what a schema cannot express:
    cross-key rules, per-model overrides, sweeps and results_dir. Defaults are taken into account, not
    written.
    """
    from snakemake.utils import validate

    path = Path(schema_path) if schema_path is not None else schema.SCHEMA_PATH
    check_no_secrets(config)
    root = schema.load_schema(path)
    found, note = schema.problems(config, root, root=root)
    grid, grid_note = _grid_problems(config, root)
    schema.refuse(found + grid, note or grid_note)
    config = copy.deepcopy(config)
    validate(config, str(path))  # fills in the defaults: the checks below read every key

    check_source_settings(config["dataset"])
    tok = config["tokenizer"]
    check_tokenizer_config(tok["vocab_size"], tok["special_tokens"], tok["min_frequency"])  # the job's own check
    vocab = tok["vocab_size"]
    if config["packing"]["dtype"] == "uint16" and vocab > 1 << 16:  # else pack.choose_dtype refuses it later
        raise ConfigError(f"packing.dtype = uint16 cannot hold the ids of tokenizer.vocab_size = {vocab} (up to "
                          f"{vocab - 1}; uint16 holds up to 65535); set packing.dtype: auto or int32")
    for model in config["models"]:
        check_model(config, model, root)
    check_results_dir(config["results_dir"])
    runs = expand_runs(config, path)
    _check_swept_settings(config, root, runs)
    reference_setting(config, runs)


def check_source_settings(dataset: dict) -> None:
    """Refuse story files (dataset.local) named for a dataset whose source is not local: they would not be
    read, and the workflow would download the hub's data (or generate the synthetic stories) and train on
    that instead, without a word (README's own-stories config with its `source: local` line forgotten)."""
    if dataset["source"] == "local":
        return
    for split in ("train", "validation"):
        if (path := (dataset.get("local") or {}).get(split)) is not None:
            key = f"dataset.local.{split}"
            raise ConfigError(f"{key} = {path!r} is set, but dataset.source is {dataset['source']}, which does not "
                              f"read it; set dataset.source: local to train on the file, or remove {key}", key=key)


def _grid_problems(config: dict, root: dict) -> tuple[list[tuple[str | None, str]], str]:
    """Each sweep's grid keys and values, as schema.problems gives them: a sweep's grid is free-form to
    the schema (its keys are paths into a model entry), so these are listed here with the rest of the
    config's refused settings. Sweeps the schema refuses in shape are left to its own message."""
    found, note = [], ""
    sweeps, models = config.get("sweeps"), config.get("models")
    for name, sweep in (sweeps.items() if isinstance(sweeps, dict) else ()):
        model = sweep.get("model") if isinstance(sweep, dict) else None
        if isinstance(model, str) and isinstance(models, dict) and model not in models:
            found.append((f"sweeps.{name}.model", f"sweeps.{name}.model = {model!r} is not a model under models: "
                          f"({', '.join(map(str, models))}){_did_you_mean(model, models)}"))
        grid = sweep.get("grid") if isinstance(sweep, dict) else None
        where = f"sweeps.{name}.grid"
        for key, values in (grid.items() if isinstance(grid, dict) else ()):
            try:
                leaf = grid_key_schema(root, str(key), where)
            except ConfigError as e:
                found.append((e.key, str(e)))
                continue
            for i, value in enumerate(values if isinstance(values, list) else ()):
                # indexed as the whole-config check names a value (a list or nan there is named once)
                more, why = schema.problems(value, leaf, prefix=f"{where}.{key}[{i}]", root=root)
                found, note = found + more, note or why
    return found, note


def check_model(config: dict, model: str, root: dict) -> None:
    """What the schema cannot check of one model entry: its GPT config, packing.seq_len against its
    max_seq_len, and its train section with the model's overrides merged."""
    seq_len = config["packing"]["seq_len"]
    where = f"models.{model}"
    try:  # the model's own validation
        mcfg = GPTConfig.from_dict(model_params(config, model))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}", key=where) from e
    entry = config["models"][model]
    # Settings only MoE blocks read (the `moe` section when it sets anything, moe_fused_blocks at all).
    if mcfg.ffn != "moe" and (keys := [k for k in ("moe", "moe_fused_blocks") if entry.get(k) not in (None, {})]):
        key = f"{where}.{keys[0]}"
        raise ConfigError(f"{key}: an MoE setting on a model with ffn: {mcfg.ffn}, which has no experts; it would "
                          f"change nothing but the run's record (and retrain it): remove {key}, or set "
                          f"{where}.ffn: moe", key=key)
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


def data_params(config: dict) -> dict[str, dict]:
    """The parameters of the data rules (rules/data.smk), as their scripts receive them: Snakemake
    rebuilds a rule's outputs when any of them changes. By rule: download_tinystories,
    train_tokenizer, pack_tokens."""
    tokenizer = {k: config["tokenizer"][k] for k in ("vocab_size", "special_tokens", "min_frequency")}
    return {name: json.loads(json.dumps(section, sort_keys=True)) for name, section in (
        ("download_tinystories", config["dataset"]), ("train_tokenizer", tokenizer),
        ("pack_tokens", config["packing"]))}


def check_data_settings(config: dict, *, raw_dir: str, tokenizer_dir: str, packed_dir: str,
                        splits: list[str]) -> None:
    """Refuse a config under which Snakemake would rebuild data that is shared by name; raises naming
    the file, the settings that differ and what to do.

    Every config with the same dataset.name reads data/raw/<name>/, and with the same tokenizer.name
    its tokenizer and packed splits too. Snakemake rebuilds them when their rule's parameters (the
    config's dataset, tokenizer or packing settings) change, which would change the data under the
    other configs' runs (and retrain them all at their next run). Each data file's record holds the
    parameters it was built with ("params"); a record from before them is compared on the settings it
    holds (dataset: source, seed, split sizes, hub_id, text_column, synthetic seed; tokenizer: all
    three; packing: seq_len).
    """
    ds, tok = config["dataset"]["name"], config["tokenizer"]["name"]
    wanted = data_params(config)

    def compare(meta: Path, record: dict, legacy: dict, want: dict, section: str, key: str, folder: str) -> None:
        have, want = _flat(record.get("params", legacy)), _flat(want)
        keys = set(have) | set(want) if "params" in record else set(have)  # an old record: what it holds
        keys = sorted(k for k in keys if have.get(k, "unset") != want.get(k, "unset"))
        if not keys:
            return
        diff = ", ".join(f"{section}.{k}: {have.get(k, 'unset')!r} there, {want.get(k, 'unset')!r} here" for k in keys)
        names = f"dataset {ds!r}" + (f" and tokenizer {tok!r}" if key == "tokenizer.name" else "")
        raise ConfigError(
            f"{meta}: built with other settings than this config's ({diff}). Every config naming {names} "
            f"shares {folder}/, and Snakemake would rebuild it under their runs: give this config a {key} of "
            f"its own, or delete {folder}/ to rebuild it with these settings (the runs of configs that read "
            f"it are then out of date: `snakemake verify` names them)")

    raw = read_meta(Path(raw_dir) / "meta.json")
    if raw:
        legacy = {k: raw[k] for k in ("source", "seed", "test_n", "train_n", "validation_n", "hub_id", "text_column")
                  if k in raw} | ({"synthetic": {"seed": raw["synthetic_seed"]}} if "synthetic_seed" in raw else {})
        compare(Path(raw_dir) / "meta.json", raw, legacy, wanted["download_tinystories"], "dataset", "dataset.name",
                raw_dir)
    tok_meta = read_meta(Path(tokenizer_dir) / "tokenizer_meta.json")
    if tok_meta:
        legacy = {k: tok_meta[k] for k in ("min_frequency", "special_tokens") if k in tok_meta}
        if "vocab_size_requested" in tok_meta:  # vocab_size is the size it reached
            legacy["vocab_size"] = tok_meta["vocab_size_requested"]
        compare(Path(tokenizer_dir) / "tokenizer_meta.json", tok_meta, legacy, wanted["train_tokenizer"], "tokenizer",
                "tokenizer.name", tokenizer_dir)
    for split in splits:
        meta = Path(packed_dir) / f"{split}.meta.json"
        if packed := read_meta(meta):
            legacy = {"seq_len": packed["seq_len"]} if "seq_len" in packed else {}
            compare(meta, packed, legacy, wanted["pack_tokens"], "packing", "tokenizer.name", packed_dir)


def _flat(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_meta(path: Path) -> dict:
    """A JSON record, or {} if there is none or it cannot be read (its rule rebuilds it)."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def check_local_dataset(config: dict, root: str | os.PathLike | None = None) -> None:
    """With `dataset.source: local`, check the two story files it names; raises naming the key and the
    file. Relative paths are read from `root` (None: the current directory, where Snakemake runs)."""
    ds = config["dataset"]
    if ds["source"] != "local":
        return

    def at(path):
        return os.path.join(root, path) if path and root is not None else path

    paths = check_local_files(at(ds["local"]["train"]), at(ds["local"]["validation"]), ds["text_column"])
    check_local_files_fill_a_row(paths, config["packing"]["seq_len"])


def check_inputs(config: dict, *, raw_dir: str, tokenizer_dir: str, packed_dir: str, splits: list[str]) -> None:
    """Check the inputs on disk against their records before any job runs; raises naming the file.

    Snakemake deletes a job's outputs before the job checks its inputs, so a rerun failing on a bad
    input would already have lost the last good model. Cheap: only the tokenizer (small) is hashed;
    a packed split is checked by size and the tokenizer sha256 its meta records, and only when
    Snakemake would use it as it is (no input newer or missing: else it is repacked anyway); it is
    hashed only where it is newer than its meta file (written to after packing recorded it).
    """
    _check_local_sources_kept(config, Path(raw_dir))
    check_local_dataset(config)
    check_raw_splits_fill_a_row(config, Path(raw_dir))
    tokenizer = Path(tokenizer_dir) / "tokenizer.json"
    if not (tokenizer.is_file() and tokenizer.with_name("tokenizer_meta.json").is_file()):
        return  # rebuilt by train_tokenizer
    train_text = Path(raw_dir) / "train.txt"
    if train_text.is_file() and train_text.stat().st_mtime <= tokenizer.stat().st_mtime:  # else retrained
        _check_made_from(tokenizer, tokenizer.with_name("tokenizer_meta.json"), "train_text", train_text)
    sha = tokenizer_sha256(tokenizer)
    for split in splits:
        packed = Path(packed_dir) / f"{split}.bin"
        inputs = [tokenizer, Path(raw_dir) / f"{split}.txt"]
        if not packed.is_file() or any(not p.is_file() or p.stat().st_mtime > packed.stat().st_mtime for p in inputs):
            continue
        check_packed(packed, tokenizer_sha256=sha, tokenizer_path=tokenizer)
        _check_made_from(packed, packed.with_suffix(".meta.json"), "text", inputs[1])
        check_packed_unchanged(packed)


def check_raw_splits_fill_a_row(config: dict, raw_dir: Path) -> None:
    """Refuse raw splits already built that are too small to fill one packed row of this config's
    packing.seq_len (a longer one than they were built for), by the sizes meta.json records, before a
    tokenizer is trained or a split packed for it. Only where Snakemake uses them as they are: every
    split there, and no dataset.local file newer than the record (else the download job rebuilds them,
    and checks them as it writes them). A packed split of this seq_len fills a row, so its raw split passes."""
    meta_file = raw_dir / "meta.json"
    meta, ds = read_meta(meta_file), config["dataset"]
    splits = meta.get("splits")
    if not isinstance(splits, dict) or any(not (raw_dir / f"{s}.txt").is_file() for s in ("train", "validation", "test")):
        return
    if ds["source"] == "local" and any(p and os.path.isfile(p) and os.path.getmtime(p) > meta_file.stat().st_mtime
                                       for p in ds["local"].values()):
        return
    seq_len, lines = config["packing"]["seq_len"], []
    for split in ("validation", "test", "train"):
        # the record's dataset settings are this config's (check_data_settings, before this)
        more = recorded_more_stories(split, meta)
        try:
            short = split_short_of_a_row(split, splits[split], seq_len, more, built=True)
        except (KeyError, TypeError):
            continue  # a record without the sizes: pack_tokens says it
        if short:
            lines.append(f"{meta_file}: {short}")
    if lines:
        raise ConfigError("\n".join(lines))


def _check_local_sources_kept(config: dict, raw_dir: Path) -> None:
    """A local source file gone (moved, renamed) after its data was built: the download rule reads it as
    its input, so every command of the config stops; say why, and the two ways on."""
    ds = config["dataset"]
    if ds["source"] != "local" or not (raw_dir / "meta.json").is_file():
        return
    made_from = (read_meta(raw_dir / "meta.json").get("params") or {}).get("local") or {}
    # only where the record says so (one from before the parameters were recorded does not)
    gone = [(split, path) for split in ("train", "validation")
            if (path := ds["local"][split]) and made_from.get(split) == path and not os.path.exists(path)]
    if len(gone) == 1:
        (split, path), = gone
        raise DataError(f"{path}: dataset.local.{split} file not found; {raw_dir} was made from it, and the "
                        f"workflow reads it to tell whether that is up to date: put the file back; to read it "
                        f"from its new place, set dataset.local.{split} there and give the dataset a new "
                        f"dataset.name (its data is then built again under that name)")
    if gone:
        lines = "\n".join(f"{path}: dataset.local.{split} file not found" for split, path in gone)
        raise DataError(f"{lines}\n{raw_dir} was made from these files, and the workflow reads them to tell whether "
                        f"it is up to date: put the files back; to read them from their new place, set "
                        f"{' and '.join(f'dataset.local.{split}' for split, _ in gone)} to their new paths and give "
                        f"the dataset a new dataset.name (its data is then built again under that name)")


def _check_made_from(path: Path, meta: Path, key: str, expected: Path) -> None:
    """Refuse a tokenizer or packed split whose meta records text other than `expected`: one copied in
    from another dataset's folder, or packed from another split's file, agrees with its own records and
    would be trained on as it is (verify.made_from_elsewhere, which `tinylm verify` shares). Records
    without the path (older ones) pass, and so do records that cannot be read (read_meta: check_packed
    refuses a packed split's)."""
    if (why := made_from_elsewhere(read_meta(meta), key, expected)) is not None:
        raise DataError(f"{path}: {why} ({meta.name} records what it was made from)")


# Folders every config's results_dir holds (and artifacts/tokenizers, shared): a results_dir
# named after one of them could land inside another config's results.
RESERVED_DIRS = ("runs", "plots", "logs", "benchmarks", "tokenizers")
RUN_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_results_dir(value: str) -> None:
    """results_dir must be a folder of its own: not data/, not inside another config's results. An absolute
    path inside the current directory (where Snakemake runs) is checked as written from there."""
    path = PurePosixPath(value)
    if path.is_absolute():
        rel = os.path.relpath(value)
        if rel != ".." and not rel.startswith("../"):
            path = PurePosixPath(rel)
    bad = [part for part in path.parts if part in (*RESERVED_DIRS, "..")]
    if not path.parts or path.parts[0] == "data" or bad:  # PurePosixPath(".").parts is empty
        raise ConfigError(f"results_dir = {value!r}: name a folder of its own, e.g. artifacts/my-experiment "
                          f"(not data/, not '..', and no part named {', '.join(RESERVED_DIRS)}: those hold "
                          f"another config's results)", key="results_dir")


OWNER_RECORD = "config-owner.json"


def results_owner(base: str | Path, files: Sequence[str | Path]) -> str:
    """The config file whose runs go to this results_dir: the last of `files` (the --configfile list) that
    sets results_dir, else `base`; as a path relative to the current folder (absolute outside it).
    Override files layered without a results_dir of their own leave the owner as it was: they change
    settings on purpose, as an edit would. `--config results_dir=...` moves that file's runs and brings
    no settings, so the file stays the owner: the owner's file pointed at its own folder that way passes,
    and two files given one folder that way are told apart."""
    owner = next((p for p in reversed(files) if "results_dir" in read_config_file(Path(p))), base)
    return _from_here(os.path.realpath(owner), os.path.realpath(os.getcwd()))


def _from_here(path: str, here: str) -> str:
    """Absolute `path` relative to the folder `here` where it lies inside it, else as it is."""
    return os.path.relpath(path, here) if path.startswith(here + os.sep) else path


def build_command(configfiles: Sequence[str | Path], config_args: Sequence[str]) -> str:
    """The command that builds everything this config makes, as verify names it when nothing is built yet:
    plain `snakemake`, with the run's --configfile files (relative to the current folder inside it) and
    --config settings."""
    files = [_from_here(os.path.abspath(f), os.getcwd()) for f in configfiles]
    return shlex.join(["snakemake", "--cores", "4", *(["--configfile", *files] if files else []),
                       *(["--config", *config_args] if config_args else [])])


def check_results_owner(results_dir: str, owner: str, set_by: str | None = None) -> None:
    """Refuse a second config that names the results_dir another one recorded (record_results_owner): it
    would retrain that config's runs with its own settings, and Snakemake deletes a job's outputs first.
    `set_by`: what gave `owner` this results_dir when not the file itself (`--config results_dir=...`)."""
    record = Path(results_dir) / OWNER_RECORD
    try:
        recorded = json.loads(record.read_text(encoding="utf-8"))["config"]
        if not isinstance(recorded, str):
            raise TypeError
    except FileNotFoundError:
        return  # a first run here, or results made before the record existed
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{record}: not the record tinylm writes ({{\"config\": <the config file that names "
                          f"this results_dir>}}); delete it, and the next run records its own config",
                          key="results_dir") from None
    if recorded != owner:
        raise ConfigError(
            f"results_dir = {results_dir!r} holds the results of {recorded} ({record}), and {owner}"
            f"{f' (with {set_by})' if set_by else ''} names it too: its runs would retrain over those, with its own settings. Give {owner} a results_dir of its "
            f"own (e.g. artifacts/{Path(owner).stem}), or, if it "
            f"takes over those results on purpose (a renamed or moved config file), delete {record}",
            key="results_dir",
        )


def record_results_owner(results_dir: str, owner: str) -> None:
    """Write <results_dir>/config-owner.json naming `owner`, unless it already does (before jobs run)."""
    record = Path(results_dir) / OWNER_RECORD
    if read_meta(record).get("config") == owner:
        return
    write_json(record, {"config": owner,
                        "note": "the config that names this results_dir; another config naming it is refused"})


def model_seeds(config: dict, model: str) -> list[int]:
    """The seeds `model` runs at by itself: its `seeds:`, else its train.seed; [] = none."""
    seeds = config["models"][model].get("seeds")
    return [train_params(config, model)["seed"]] if seeds is None else list(seeds)


def same_runs(runs: dict[str, dict]) -> list[tuple[str, str]]:
    """Pairs (first, later) of runs in `runs` (expand_runs) with one model, settings and seed under two
    names: a sweep's grid point at a model's own values and seed, or points that differ only in what a
    run records (config.RECORD_ONLY_KEYS: log_every, ...). Each trains the same model again; the
    workflow warns, and leaves it (a sweep plot may want that point). Model settings are compared with
    their defaults filled in: a key an entry leaves out (x-default) swept at its default is no change."""
    first: dict[str, str] = {}
    pairs = []
    for name, run in runs.items():
        model = GPTConfig.from_dict(run["model_config"]).to_dict()
        key = json.dumps([model, split_record_only(run["train_config"])[0]], sort_keys=True)
        if key in first:
            pairs.append((first[key], name))
        else:
            first[key] = name
    return pairs


def same_runs_warnings(runs: dict[str, dict]) -> list[str]:
    """What the workflow and check-config say of each pair of same_runs(runs)."""
    return [f"warning: run {again} has the model, settings and seed of run {first} and trains the same model "
            f"again; to train it once, leave that value out of the sweep's grid or that seed out of one of them"
            for first, again in same_runs(runs)]


def schedule_warnings(runs: dict[str, dict]) -> list[str]:
    """A warm-up as long as the run (train.max_steps lowered under the default warm-up): the learning
    rate climbs for the whole run, reaching train.lr at the last step at most (when the two are equal),
    and never decays. Legal, so a warning, once per setting."""
    by_setting: dict[str, list[str]] = {}
    for name, run in runs.items():
        by_setting.setdefault(run["setting"], []).append(name)
    warnings = []
    for names in by_setting.values():
        train = runs[names[0]]["train_config"]
        warmup, max_steps, lr = train["warmup_steps"], train["max_steps"], train["lr"]
        if warmup >= max_steps:
            last = lr * max_steps / warmup  # step.lr_at at the last step, max_steps - 1
            warnings.append(f"warning: run{'s' * (len(names) > 1)} {', '.join(names)}: train.warmup_steps = {warmup} "
                            f"is not below train.max_steps = {max_steps}: the learning rate warms up for the whole "
                            f"run (to {last:g} at its last step; train.lr = {lr:g}) and never decays; lower "
                            f"train.warmup_steps (or raise max_steps) unless that is what you want")
    return warnings


def summary_figures(plots: str, sweeps: Iterable[str], moe_runs: Iterable[str]) -> tuple[dict, dict]:
    """Rule summarize's figures in the folder `plots`: (sweep -> png, MoE run -> {"expert_load": png,
    "dropped": png}). Model, run and sweep names share one folder, so two figures can get one name (a
    model named sweep and a sweep named expert_load: sweep_expert_load.png), and the later would
    overwrite the earlier; ConfigError then, naming both."""
    sweep_plots = {s: f"{plots}/sweep_{s}.png" for s in sweeps}
    moe_plots = {r: {kind: f"{plots}/{r}_{kind}.png" for kind in ("expert_load", "dropped")} for r in moe_runs}
    owners: dict[str, list[str]] = {}
    for s, path in sweep_plots.items():
        owners.setdefault(path, []).append(f"the figure of sweep {s}")
    for r, paths in moe_plots.items():
        for kind, path in paths.items():
            owners.setdefault(path, []).append(f"the {kind} figure of MoE run {r}")
    if clashes := {path: who for path, who in owners.items() if len(who) > 1}:
        raise ConfigError("; ".join(f"{path} would be both {' and '.join(who)}" for path, who in clashes.items())
                          + ": rename the sweep or the model")
    return sweep_plots, moe_plots


def data_warnings(source: str, raw_dir: str | os.PathLike) -> list[str]:
    """What the workflow warns of in built data it reuses: raw splits made before the test split skipped
    stories that are also in validation (meta.json without test_left_out), from a source that may repeat
    stories (not the synthetic generator)."""
    meta_file = Path(raw_dir) / "meta.json"
    meta = read_meta(meta_file)
    if not meta or "test_left_out" in meta or source == "synthetic":
        return []
    return [f"{meta_file}: built before tinylm kept the test split apart from validation, so its test split may "
            f"share stories with the validation split (the source repeats some); to rebuild it, delete "
            f"{raw_dir}/ and run again (every run made from it then retrains)"]


def run_warnings(runs: dict[str, dict]) -> list[str]:
    """What the workflow and check-config warn of in a config's runs (expand_runs)."""
    return same_runs_warnings(runs) + schedule_warnings(runs)


def training_order(runs: dict[str, dict], seq_len: int) -> dict[str, int]:
    """Each run's rank by its estimated training compute (FLOPs per token, MoE capacity padding
    included, x batch x max_steps): 1 for the cheapest, equal estimates sharing a rank. The workflow
    gives it to train_model and evaluate_model as their priority, so trainings that wait for one GPU
    start costliest first, and the workflow ends on the cheapest run's short evaluation rather than a
    long run's (falcon's evaluation job takes about twice condor's)."""
    cost = {}
    for name, run in runs.items():
        train = run["train_config"]
        per_token = GPTConfig.from_dict(run["model_config"]).flops_per_token(seq_len, padded=True)
        cost[name] = per_token * train["batch_size"] * seq_len * train["max_steps"]
    rank = {c: i for i, c in enumerate(sorted(set(cost.values())), start=1)}
    return {name: rank[c] for name, c in cost.items()}


def expand_runs(config: dict, schema_path: str | Path | None = None) -> dict[str, dict]:
    """Every training run of `config` (defaults filled in), by run name, in a fixed order: each model at
    each of its seeds, then each sweep's grid at each of the sweep's seeds.

    A run is {"model", "setting", "seed", "sweep", "values", "model_config", "train_config",
    "eval_batch_size", "seq_len"} (the last two: eval.batch_size and packing.seq_len): `setting`
    is the name without its seed part (what seeds are grouped by), `sweep` the sweep's name or None,
    `values` the swept keys' values. Names do not change when runs are added:
        condor                    a model at its own train.seed
        condor-seed7              ... at another seed
        condor-lr0.001-seed1      a sweep run: `-<key><value>` per swept key (the key's last part,
                                  keys in sorted order), then the seed part as above
    Raises ConfigError for an unknown model or grid key, a value that cannot be part of a name, two
    runs with one name, or one setting made in two places (a model and a sweep, or two sweeps).
    """
    root = schema.load_schema(Path(schema_path) if schema_path is not None else schema.SCHEMA_PATH)
    runs: dict[str, dict] = {}
    origin: dict[str, str] = {}  # run -> where in the config it comes from
    setting_origin: dict[str, str] = {}

    def add(model: str, values: dict, seed: int, sweep: str | None, where: str) -> None:
        entry = with_values(config["models"][model], values)
        resolved = {**config, "models": {model: entry}}
        setting = model + "".join(f"-{key.rsplit('.', 1)[-1]}{_label(value)}" for key, value in values.items())
        name = setting if seed == train_params(config, model)["seed"] else f"{setting}-seed{seed}"
        if not RUN_NAME.fullmatch(name):
            raise ConfigError(f"{where}: run name {name!r} may hold only letters, digits, '_', '.' and '-'; "
                              f"change the value that brings in the other characters")
        if name in runs:
            raise ConfigError(f"{origin[name]} and {where} both make run {name!r}; drop the repeated "
                              f"model, seed or grid value from one of them")
        if setting_origin.setdefault(setting, where) != where:  # the summary groups runs by setting
            others = [r for r in runs if runs[r]["setting"] == setting]
            raise ConfigError(f"{setting_origin[setting]} and {where} both make setting {setting!r} (runs "
                              f"{', '.join([*others, name])}), which the summary would average as one; "
                              f"rename the model, or drop the grid value from one and list all its seeds "
                              f"in one of them")
        origin[name] = where
        runs[name] = {"model": model, "setting": setting, "seed": seed, "sweep": sweep, "values": values,
                      "model_config": with_floats(model_params(resolved, model), "model", "moe"),
                      "train_config": with_floats({**train_params(resolved, model), "seed": seed}, "train"),
                      "eval_batch_size": (config.get("eval") or {}).get("batch_size"),
                      "seq_len": (config.get("packing") or {}).get("seq_len")}  # its rows' (a resume checks it)

    for model in config["models"]:
        for seed in model_seeds(config, model):
            add(model, {}, seed, None, f"models.{model}")
    schema.refuse(*_grid_problems(config, root))  # the sweeps' models, grid keys and values
    for name, sweep in (config.get("sweeps") or {}).items():
        where, model = f"sweeps.{name}", sweep["model"]
        keys = sorted(sweep["grid"])
        seeds = sweep.get("seeds") or [train_params(config, model)["seed"]]
        for combo in itertools.product(*(sweep["grid"][key] for key in keys)):
            for seed in seeds:
                add(model, dict(zip(keys, combo, strict=True)), seed, name, where)
    if not runs:
        raise ConfigError("no runs: every model has `seeds: []` and no sweep is declared; give a model "
                          "seeds or declare a sweep")
    return runs


def with_values(entry: dict, values: dict) -> dict:
    """A copy of a model entry with dotted keys ("d_model", "moe.top_k", "train.lr") set."""
    entry = copy.deepcopy(entry)
    for key, value in values.items():
        *parents, last = key.split(".")
        node = entry
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return entry


def grid_key_schema(root: dict, key: str, where: str) -> dict:
    """The schema of a swept key, a path into a model entry; ConfigError for anything else."""
    if key in ("seeds", "train.seed"):
        raise ConfigError(f"{where}: {key} cannot be swept in a grid; list the seeds under the sweep's "
                          f"`seeds:` instead", key=f"{where}.{key}")
    model = node = root["$defs"]["model"]
    for part in key.split("."):
        if node is model and part == "train":
            node = root["$defs"]["train"]
        elif part in node.get("properties", {}):
            node = schema.follow(root, node["properties"][part])
        else:
            leaves = _leaf_keys(root)  # a train or MoE key written without its section (lr for train.lr)
            within = [f"{section}.{key}" for section in ("train", "moe") if f"{section}.{key}" in leaves]
            raise ConfigError(f"{where}: unknown key {key!r} (a grid key is a model key such as d_model, "
                              f"moe.<key> or train.<key>: $defs in config/schema.yaml)"
                              + (f"; did you mean {within[0]!r}?" if within else _did_you_mean(key, leaves)),
                              key=f"{where}.{key}")
    if node.get("type") == "object":
        raise ConfigError(f"{where}: {key!r} is a section; sweep one of its keys ({key}.<key>)", key=f"{where}.{key}")
    return node


def _leaf_keys(root: dict) -> list[str]:
    model = root["$defs"]["model"]["properties"]
    keys = [k for k in model if k not in ("moe", "train", "seeds")]
    keys += [f"moe.{k}" for k in root["$defs"]["moe"]["properties"]]
    return keys + [f"train.{k}" for k in root["$defs"]["train"]["properties"] if k != "seed"]


def _did_you_mean(word: str, choices) -> str:
    close = schema.closest_key(word, choices)
    return f"; did you mean {close!r}?" if close else ""


def _label(value) -> str:
    """A swept value as it appears in a run name: 0.001, 128, moe, true."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value).replace("+", "")  # 1e+20 -> 1e20
    return str(value)


# How null is written in YAML (and None in Python): as text, a value given with --config.
YAML_NULLS = ("null", "Null", "NULL", "~", "None", "none")


def reference_setting(config: dict, runs: dict[str, dict]) -> str | None:
    """The setting the summary compares every other setting with (`runs`: expand_runs): compare_to,
    else baseline where the config has that setting, else None. ConfigError for a compare_to that
    names no setting of the config."""
    settings = list(dict.fromkeys(run["setting"] for run in runs.values()))
    wanted = config.get("compare_to")
    if wanted is None:
        return "baseline" if "baseline" in settings else None
    if wanted not in settings:
        # `--config compare_to=null` passes text; null there is `compare_to=`, nothing after the '='
        default = "compare with baseline" if "baseline" in settings else "no comparison"
        text = (f"; {wanted!r} is text (--config passes text), not null: for null ({default}, the default here) give "
                f"--config compare_to= (nothing after the '='), or compare_to: null in a config file"
                if wanted in YAML_NULLS else "")
        raise ConfigError(f"compare_to = {wanted!r} is not a setting of this config ({', '.join(settings)}); "
                          f"name one of them (a run name without its -seed<N> part), or null"
                          f"{_did_you_mean(wanted, settings)}{text}")
    return wanted


def _check_swept_settings(config: dict, root: dict, runs: dict[str, dict]) -> None:
    """Each swept setting, as a model entry, passes check_model; seeds change nothing it checks. Names
    every setting refused, not only the first."""
    checked, problems = set(), []
    for name, run in runs.items():
        if run["sweep"] is None or run["setting"] in checked:
            continue
        checked.add(run["setting"])
        entry = config["models"][run["model"]]
        try:
            check_model({**config, "models": {run["model"]: with_values(entry, run["values"])}}, run["model"], root)
        except ConfigError as e:
            model, sweep = run["model"], run["sweep"]
            # an MoE setting that only the grid gives a dense model: the fix is in the grid, not in the entry
            moe = [k for k in run["values"] if k.split(".")[0] in ("moe", "moe_fused_blocks")
                   and e.key == f"models.{model}.{k.split('.')[0]}" and entry.get(k.split(".")[0]) in (None, {})]
            why = (f"sweeps.{sweep}.grid.{moe[0]}: an MoE setting swept on model {model}, which has ffn: dense (no "
                   f"experts); drop it from sweeps.{sweep}.grid, or sweep it on an MoE model") if moe else e
            problems.append(f"sweeps.{sweep}, run {name}: {why}")
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} swept settings refused:" + "".join(f"\n  {p}" for p in problems))
