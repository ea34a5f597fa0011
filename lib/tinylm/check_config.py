"""Check config files as the workflow will read them, without running Snakemake.

A YAML mistake is named by file, line and column (Snakemake reads every --configfile before the
workflow, and its message for one names neither); then every key is checked against
config/schema.yaml and the workflow's cross-key rules, as `snakemake` does before any job, and the
runs the config makes are listed.

    tinylm check-config my.yaml                 config/config.yaml with my.yaml merged over it
    tinylm check-config a.yaml b.yaml           merged in this order, as --configfile a.yaml b.yaml
    tinylm check-config --base other.yaml a.yaml
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import yaml

from . import schema
from .errors import ConfigError
from .workflow import check_config, check_yaml_syntax, expand_runs, merge_config

DEFAULTS = schema.SCHEMA_PATH.parent / "config.yaml"  # what the Snakefile reads first


def load_merged(paths: Sequence[str | Path]) -> dict:
    """The files read and merged in order, as Snakemake merges --configfile over the Snakefile's config."""
    config: dict = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"{path}: no such file")
        check_yaml_syntax(path)
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if data is None:
            continue
        if not isinstance(data, dict):
            raise ConfigError(f"{path} holds a {type(data).__name__}, not a mapping of settings "
                              f"(key: value lines, as in config/config.yaml)")
        merge_config(config, data)
    return config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinylm check-config", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("files", nargs="*", help="config files merged over --base, in order (as --configfile)")
    p.add_argument("--base", default=str(DEFAULTS),
                   help="the defaults the files are merged over (default: this checkout's config/config.yaml)")
    return p


def _main(args: argparse.Namespace) -> None:
    config = load_merged([args.base, *args.files])
    check_config(config)
    runs = expand_runs(config)
    names = ", ".join(runs) or "none"
    print(f"config ok: {len(runs)} run{'s' * (len(runs) != 1)} under {config.get('results_dir', 'artifacts')}/runs: "
          f"{names}")


def main(argv: Sequence[str] | None = None) -> None:
    from .cli import run_script

    run_script(_main, build_parser(), argv)
