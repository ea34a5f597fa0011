"""Re-hash every artifact that a meta file records, and report every mismatch at once.

The convention for every step that writes outputs: a JSON meta file with a section
    "files": {"<path relative to the meta file's folder>": {"sha256": "<hex>", "bytes": <int>}}
Any *.json below the roots with such a section counts (meta.json, tokenizer_meta.json,
train.meta.json, checkpoint metas, ...).

    tinylm verify data artifacts
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import DataError
from .io import sha256_file

log = logging.getLogger("tinylm.verify")

_MAX_META_BYTES = 16 << 20  # meta files are small; bigger JSON files are data, not metas


def _meta_files(roots: Iterable[str | os.PathLike]) -> Iterable[tuple[Path, dict]]:
    for root in roots:
        for path in sorted(Path(root).rglob("*.json")):
            if not path.is_file() or path.stat().st_size > _MAX_META_BYTES:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            if '"files"' not in text:
                continue
            try:
                meta = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}: a meta file that is not valid JSON ({e}); rebuild it"
                ) from e
            if isinstance(meta, dict) and isinstance(meta.get("files"), dict):
                yield path, meta["files"]


def verify_artifacts(roots: Sequence[str | os.PathLike] = ("data", "artifacts")) -> list[str]:
    """Check size and sha256 of every file recorded in a "files" section below `roots`.

    Returns the verified paths; raises DataError listing every missing or changed file.
    """
    verified: list[str] = []
    problems: list[str] = []
    for meta_path, files in _meta_files(roots):
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
            elif (sha := sha256_file(path)) != rec["sha256"]:
                problems.append(f"{path}: sha256 {sha}, {meta_path} records {rec['sha256']}")
            else:
                verified.append(str(path))
                log.info("ok %s", path)
    if problems:
        raise DataError(
            f"{len(problems)} artifact(s) changed or missing; rebuild them (snakemake reruns the rule "
            "once the file is deleted):\n  " + "\n  ".join(problems)
        )
    return verified


def _main(args: argparse.Namespace) -> None:
    paths = verify_artifacts(args.roots)
    print(f"verified {len(paths)} file(s) below {', '.join(args.roots)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinylm verify", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "roots", nargs="*", default=["data", "artifacts"], help="folders to search for meta files"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    from .cli import run_script

    run_script(_main, build_parser(), argv)
