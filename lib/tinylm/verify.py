"""Check every artifact: re-hash what meta files record, check training histories, report every problem.

The convention for every step that writes outputs: a JSON meta file with a section
    "files": {"<path relative to the meta file's folder>": {"sha256": "<hex>", "bytes": <int>}}
Any *.json below the roots with such a section counts (meta.json, tokenizer_meta.json,
train.meta.json, metrics.json, ...). Every metrics.jsonl below the roots must be a finished
training history: JSON lines, steps in order, one `done` row at the end.

An output must also still match the inputs it was made from, where its record names them with their
sha256 ("train_text" of tokenizer_meta.json, "text" of a packed split's meta: {"path", "sha256"};
"made_from", a list of those, in a run's config.json (its packed splits) and metrics.json (the
splits it evaluated); "tokenizer_path" and "tokenizer_sha256"): data rebuilt since leaves every output
made from the old data out of date, each file of it intact.

With --expected (rule verify passes every output the config implies), a file on that list that
is missing is an error too, so a deleted meta file no longer hides a changed file it recorded. With
--raw-dir (the config's dataset folder, which rule verify passes too), a tokenizer or packed split on
that list whose record names text other than its file in that folder is an error: it was made for
another dataset and copied in, or packed from another split's file, and agrees with its own records
(the workflow refuses to use it, by the same judgement: made_from_elsewhere; verify says why).

    tinylm verify data artifacts
    tinylm verify data artifacts --expected data/raw/tinystories/meta.json ...
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from . import runlock
from .errors import DataError
from .io import TMP_PREFIX, killed_writers_output, sha256_file

log = logging.getLogger("tinylm.verify")

_MAX_META_BYTES = 16 << 20  # meta files are small; bigger JSON files are data, not metas
_MAX_HISTORY_PROBLEMS = 5
HISTORY_NAME = "metrics.jsonl"
DEFAULT_ROOTS = ("data", "artifacts")


class NothingToVerify(DataError):
    """No record below the folders named (or no such folder), and no file expected: a wrong folder, or
    nothing built yet."""


def read_record(path: Path) -> dict | None:
    """A JSON record below the roots, read once for both checks; None when `path` is not one (not
    .json, too big to be a record, or not JSON: an error if it holds a "files" section)."""
    if path.suffix != ".json" or not path.is_file() or path.stat().st_size > _MAX_META_BYTES:
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        if '"files"' in text:
            raise DataError(f"{path}: a meta file that is not valid JSON ({e}); rebuild it") from e
        return None
    return meta if isinstance(meta, dict) else None


def cached_sha256(path: Path, shas: dict[Path, str]) -> str:
    """sha256 of `path`, hashed once per verify (a split's text is both a record and an input)."""
    key = path.resolve()
    if key not in shas:
        shas[key] = sha256_file(path)
    return shas[key]


def check_records(meta_path: Path, files: dict, shas: dict[Path, str]) -> tuple[list[str], list[str]]:
    """(verified paths, problems) for the files one meta file records; `shas` caches sha256 by resolved path."""
    verified, problems = [], []
    for name, rec in files.items():
        path = meta_path.parent / name
        if not isinstance(rec, dict) or "sha256" not in rec:
            problems.append(f"{meta_path}: entry {name!r} has no sha256")
        elif not path.is_file():
            problems.append(f"{path}: missing (recorded in {meta_path})")
        elif "bytes" in rec and path.stat().st_size != rec["bytes"]:
            problems.append(
                f"{path}: {path.stat().st_size} bytes, {meta_path} records {rec['bytes']}"
            )
        elif (sha := cached_sha256(path, shas)) != rec["sha256"]:
            problems.append(f"{path}: sha256 {sha}, {meta_path} records {rec['sha256']}")
        else:
            verified.append(str(path))
    return verified, problems


def made_from(meta: dict) -> list[tuple[str, str]]:
    """(path, sha256) of the inputs a record says its outputs were made from."""
    inputs = [meta[k] for k in ("train_text", "text") if isinstance(meta.get(k), dict)]
    inputs += meta["made_from"] if isinstance(meta.get("made_from"), list) else []
    links = [(i.get("path"), i.get("sha256")) for i in inputs if isinstance(i, dict)]
    links.append((meta.get("tokenizer_path"), meta.get("tokenizer_sha256")))
    return [(p, sha) for p, sha in links if isinstance(p, str) and isinstance(sha, str)]


def check_made_from(meta_path: Path, meta: dict, shas: dict[Path, str], unseen: list[str] | None = None) -> list[str]:
    """Problems: inputs of the outputs `meta` (read from `meta_path`) records that have changed since
    (`shas` caches the inputs' sha256 by resolved path). An input that is gone is not this check's to
    report (data deleted to save space); its recorded path is appended to `unseen`."""
    problems = []
    for name, sha in made_from(meta):
        path = Path(name)
        if not path.is_file():
            if unseen is not None:
                unseen.append(name)
            continue
        if (now := cached_sha256(path, shas)) != sha:
            problems.append(f"{meta_path}: made from {path} (sha256 {sha[:16]}...), which has changed since (now "
                            f"{now[:16]}...): what it records is out of date; run snakemake again with the config "
                            f"that made it to rebuild it from the data as it is now, or delete it")
    return problems


# Which text a tokenizer or packed split was made from: its meta file's key, and the dataset file.
def recorded_text(meta_name: str) -> tuple[str, str] | None:
    """(key, text file name) of the text a meta file named `meta_name` records: tokenizer_meta.json's
    "train_text" is train.txt, <split>.meta.json's "text" is <split>.txt; None for other files."""
    if meta_name == "tokenizer_meta.json":
        return "train_text", "train.txt"
    if meta_name.endswith(".meta.json"):
        return "text", meta_name.removesuffix(".meta.json") + ".txt"
    return None


def made_from_elsewhere(meta: dict, key: str, expected: Path) -> str | None:
    """Why the output `meta` records (a tokenizer: key "train_text", a packed split: "text") was not made
    from `expected`, the file this config makes it from; None if it was, or if the record names no path
    (older records). One copied in from another dataset's folder, or packed from another split's file,
    agrees with its own records and would be used as it is: the workflow refuses it before any job
    (workflow.check_inputs) and verify reports it, both with this judgement and these words."""
    text = meta.get(key)
    recorded = text.get("path") if isinstance(text, dict) else None
    if not isinstance(recorded, str) or Path(recorded).resolve() == expected.resolve():
        return None
    verb = "trained on" if key == "train_text" else "packed from"
    if Path(recorded).resolve().parent == expected.resolve().parent:
        return (f"{verb} {recorded}, but this config's dataset reads {expected} for it: it was made from "
                f"another file of this dataset; delete it and rerun to rebuild it from {expected}")
    return (f"{verb} {recorded}, but this config's dataset reads {expected}: it was made for another dataset "
            f"and copied in; delete it and rerun to rebuild it from {expected}, or set dataset.name to the "
            "dataset it was made for")


def check_read_from(meta_path: Path, meta: dict, raw_dir: Path) -> list[str]:
    """Problems: the text a tokenizer's or packed split's meta records its output was made from, when it
    is not this config's file for it in the dataset folder `raw_dir` (made_from_elsewhere)."""
    if (which := recorded_text(meta_path.name)) is None:
        return []
    key, name = which
    why = made_from_elsewhere(meta, key, raw_dir / name)
    return [] if why is None else [f"{meta_path}: {why}"]


def check_history(path: Path) -> list[str]:
    """Problems of one training history: JSON lines, steps in order (train and eval rows each
    strictly increasing, no row going back, a `resume` row included), exactly one `done` row, last."""
    problems: list[str] = []
    last_step, last_of_kind, done_lines = None, {}, []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"{path}: line {n} is not valid JSON: {line[:80]!r}")
            continue
        kind = row.get("kind") if isinstance(row, dict) else None
        if kind is None:
            problems.append(f"{path}: line {n} is not a row with a 'kind': {line[:80]!r}")
            continue
        if kind == "done":
            done_lines.append(n)
            continue
        step = row.get("step")
        if not isinstance(step, int):
            problems.append(f"{path}: line {n} ({kind} row) has no integer step")
            continue
        if last_step is not None and step < last_step:
            problems.append(f"{path}: {kind} row at step {step} after step {last_step} (line {n})")
        elif kind in ("train", "eval") and kind in last_of_kind and step <= last_of_kind[kind]:
            problems.append(
                f"{path}: {kind} row at step {step} after step {last_of_kind[kind]} (line {n})"
            )
        last_step = step if last_step is None else max(step, last_step)
        last_of_kind[kind] = step
    if not done_lines and (held := runlock.held_by(path.parent)) is not None:
        problems.append(f"{path}: no 'done' row: its training is still running ({held[0]}); verify again "
                        f"once it ends")
    elif not done_lines:
        problems.append(
            f"{path}: no 'done' row; training did not finish (run snakemake again to resume it)"
        )
    elif len(done_lines) > 1:
        problems.append(f"{path}: {len(done_lines)} 'done' rows (lines {done_lines})")
    elif done_lines[0] != len(lines):
        problems.append(
            f"{path}: the 'done' row is line {done_lines[0]} of {len(lines)}, not the last"
        )
    if len(problems) > _MAX_HISTORY_PROBLEMS:  # two writers make one per row: the first few say it
        more = len(problems) - _MAX_HISTORY_PROBLEMS + 1
        problems[_MAX_HISTORY_PROBLEMS - 1 :] = [f"{path}: {more} more problem(s) like these"]
    return problems


def verify_artifacts(
    roots: Sequence[str | os.PathLike] = DEFAULT_ROOTS,
    expected: Iterable[str | os.PathLike] = (),
    raw_dir: str | os.PathLike | None = None,
    build_command: str | None = None,
) -> list[str]:
    """Check every meta file and training history below `roots`, and every file in `expected`.

    Without `expected`, every root must be a folder. A file in `expected` must exist; the meta files and
    histories among them are checked too, and with `raw_dir` their records must name their own text file
    in that folder (check_read_from). When none of `expected` exists, nothing is built yet: one line says
    so and names `build_command` (the command that builds them) instead of a line for each file.
    Returns the verified paths; raises DataError listing every missing or changed file.
    """
    expected = [Path(p) for p in expected]
    if not expected and (absent := [str(r) for r in roots if not Path(r).is_dir()]):  # (rule verify names its files)
        raise NothingToVerify(f"{', '.join(absent)}: no such folder below {Path.cwd()}; run tinylm verify in the "
                        f"folder the workflow ran in, or name the folders to check")
    ours = {p.resolve() for p in expected}
    found, temporary = _walk(roots)
    verified: list[str] = []
    recorded: set[Path] = set()  # resolved paths of the files some meta file records
    missing = [p for p in expected if not p.is_file()]
    problems = [f"{p}: missing (the config implies it)" + (_resumes(p) or _remake_data(p)) for p in missing]
    if nothing_built := bool(expected) and len(missing) == len(expected):
        problems = [f"nothing this config makes is built yet (none of the {len(expected)} files it implies "
                    f"exists, e.g. {expected[0]}); {_build_first(build_command)}"]
    checked: set[Path] = set()  # a file below a root and on the list is checked once
    shas: dict[Path, str] = {}  # inputs' sha256, each file hashed once
    unseen: list[str] = []  # recorded inputs not found from here
    for path in [*expected, *found]:
        if not path.is_file() or path.resolve() in checked:
            continue
        checked.add(path.resolve())
        if path.name == HISTORY_NAME:
            bad = check_history(path)
            problems += bad
            verified += [] if bad else [str(path)]
        elif (record := read_record(path)) is not None:
            problems += check_made_from(path, record, shas, unseen)
            if raw_dir is not None and path.resolve() in ours:
                problems += check_read_from(path, record, Path(raw_dir))
            if not isinstance(files := record.get("files"), dict):
                continue
            recorded.update((path.parent / name).resolve() for name in files)
            ok, bad = check_records(path, files, shas)
            verified += ok
            problems += bad
    # The rest of the list (meta files, config.json, a file whose meta is missing) can only be
    # checked to exist.
    verified += [
        str(p)
        for p in expected
        if p.is_file() and p.name != HISTORY_NAME and p.resolve() not in recorded
    ]
    verified = list(dict.fromkeys(verified))  # a file two records name (best_model.pt) is one file
    if not expected and not verified and not problems:  # "verified 0 file(s)" would pass a wrong folder
        raise NothingToVerify(f"{', '.join(map(str, roots))}: no record tinylm writes below it (meta files, runs' "
                        "metrics.jsonl), so nothing to verify; name the folders the workflow wrote (data, artifacts)")
    if unseen := list(dict.fromkeys(unseen)):
        # Records name inputs as the workflow saw them (relative to the folder it ran in): from another
        # folder, or once deleted, they cannot be compared.
        log.warning("%d recorded input(s) not found from %s, so not compared: %s%s; run tinylm verify in the "
                    "folder the workflow ran in to check them", len(unseen), Path.cwd(), ", ".join(unseen[:5]),
                    ", ..." if len(unseen) > 5 else "")
    if orphans := [str(p) for p in temporary if killed_writers_output(p) is not None]:
        # a job killed mid-write; the next write of the same output removes it, but that may never come
        log.warning("%d temporary file(s) left by a killed writer, not outputs: %s%s; delete them (a rerun of "
                    "the job that writes the output removes its own)", len(orphans), ", ".join(orphans[:5]),
                    ", ..." if len(orphans) > 5 else "")
    for path in verified:
        log.info("ok %s", path)
    if nothing_built and len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        raise DataError(
            f"{len(problems)} problem(s): artifacts changed or missing; run snakemake to build what is missing, "
            "and delete a changed file for snakemake to rebuild it:\n  " + "\n  ".join(problems)
            + ("\n'The config implies it': a file the config verify ran with makes. To check another "
               "config's results, give its --configfile (snakemake --cores 1 verify --configfile my.yaml)"
               if missing and not nothing_built else "")
        )
    return verified


def _walk(roots: Sequence[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """(the records and histories, the temporary files of atomic writes) below `roots`, each sorted
    within a root: one walk finds both, listing each folder once (os.walk: Python 3.11's Path.rglob lists
    each folder twice, once to descend and once to match)."""
    found: list[Path] = []
    temporary: list[Path] = []
    for root in roots:
        below = [Path(folder, name) for folder, _, names in os.walk(root) for name in names]
        found += sorted(p for p in below if p.match("*.json*"))
        temporary += sorted(p for p in below if p.match(f"{TMP_PREFIX}*.tmp"))
    return found, temporary


def _build_first(command: str | None) -> str:
    """What to run when nothing is built yet: `command`, else plain snakemake with a word on --configfile."""
    command = command or "snakemake --cores 4 (with the config's --configfile, if it has one)"
    return f"run the workflow first: {command}, then verify again"


def _resumes(missing: Path) -> str:
    """For a missing output of a run that stopped part way (its checkpoints/last.pt is there): how it ends."""
    for folder in list(missing.parents)[:2]:  # the run's folder, or its checkpoints/
        if (last := folder / "checkpoints" / "last.pt").is_file():
            return f"; its run stopped before the end: snakemake resumes it from {last}"
    return ""


def _remake_data(missing: Path) -> str:
    """For a missing data file (no run's: those lie below a runs/ folder, and the default target remakes
    them): how to make it again. Snakemake remakes it only for a job that reads it, so with the runs
    built, plain `snakemake` leaves it missing."""
    if "runs" in missing.parts:
        return ""
    return (f"; snakemake makes a data file again only for a job that reads it: ask for it by path (snakemake "
            f"--cores 1 {missing}, with the same --configfile); being newer then, it makes the next run redo the jobs "
            f"that read it and what follows them, unless it is under 1 MB and the same as before")


def _main(args: argparse.Namespace) -> None:
    # the default folders that are there (the results before the first run are not); named ones must be
    roots = args.roots or [r for r in DEFAULT_ROOTS if Path(r).is_dir()] or DEFAULT_ROOTS
    try:
        paths = verify_artifacts(roots, args.expected, args.raw_dir, args.build_command)
    except NothingToVerify:
        if args.roots or args.expected or not Path("config", "config.yaml").is_file():
            raise
        # a checkout where the workflow never ran (or only failed, leaving logs): this is the folder to
        # verify in, once something is built
        raise DataError(f"nothing is built here yet (no record tinylm writes below {', '.join(DEFAULT_ROOTS)}); "
                        f"{_build_first(args.build_command)}") from None
    print(f"verified {len(paths)} file(s) below {', '.join(roots)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinylm verify", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "roots", nargs="*", help="folders to search for meta files (default: data and artifacts)"
    )
    parser.add_argument(
        "--expected",
        nargs="+",
        default=[],
        metavar="PATH",
        help="files that must exist (rule verify passes every output the config implies)",
    )
    parser.add_argument(
        "--raw-dir",
        metavar="DIR",
        help="the config's dataset folder: tokenizers and packed splits in --expected must be made from it",
    )
    parser.add_argument(
        "--build-command",
        metavar="CMD",
        help="the command that builds what --expected lists, named when none of it exists (rule verify passes it)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    from .cli import run_script

    run_script(_main, build_parser(), argv)
