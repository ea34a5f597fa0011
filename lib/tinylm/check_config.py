"""Check config files as the workflow will read them, without running Snakemake.

A YAML mistake is named by file, line and column (Snakemake reads every --configfile before the
workflow, and its message for one names neither); then the files are merged as Snakemake merges them,
every key is checked against config/schema.yaml and the workflow's cross-key rules, and the story
files a `source: local` dataset names are checked (relative paths from this checkout, where
`snakemake` runs), as `snakemake` does before any job; then the
runs the config makes are listed. What it does not check is the data the workflow built (with other
settings, changed since): `snakemake -n` does that.

    tinylm check-config my.yaml                 config/config.yaml with my.yaml merged over it
    tinylm check-config a.yaml b.yaml           merged in this order, as --configfile a.yaml b.yaml
    tinylm check-config --base other.yaml a.yaml
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import schema
from .config import progress_interval
from .errors import ConfigError
from .workflow import (
    check_config,
    check_configfiles,
    check_local_dataset,
    config_error_source,
    expand_runs,
    load_merged,
    run_warnings,
)

DEFAULTS = schema.SCHEMA_PATH.parent / "config.yaml"  # what the Snakefile reads first
CHECKOUT = schema.SCHEMA_PATH.parent.parent  # the workflow's directory: relative data paths start here


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinylm check-config", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("files", nargs="*", help="config files merged over --base, in order (as --configfile)")
    p.add_argument("--configfile", nargs="+", default=[], metavar="FILE",
                   help="the same files, in snakemake's spelling (after the ones given without it)")
    p.add_argument("--base", default=str(DEFAULTS),
                   help="the defaults the files are merged over (default: this checkout's config/config.yaml)")
    return p


def _main(args: argparse.Namespace) -> None:
    from snakemake.utils import validate

    args.files = [*args.files, *args.configfile]
    # a target typed after --configfile, as snakemake refuses it (a target of a relative path from here)
    check_configfiles([os.path.abspath(f) for f in args.files], os.getcwd())
    config = load_merged(args.base, args.files)
    try:
        check_config(config)
    except ConfigError as e:
        raise ConfigError(f"{config_error_source(args.base, args.files, e)}{e}", key=e.key) from e
    validate(config, str(schema.SCHEMA_PATH))  # the defaults filled in, as the workflow has them
    check_local_dataset(config, CHECKOUT)  # relative paths from the checkout, as `snakemake` run there reads them
    progress_interval()  # read by training from the environment; the workflow checks it before training
    runs = expand_runs(config)
    for warning in run_warnings(runs):
        print(warning, file=sys.stderr)
    names = ", ".join(runs) or "none"
    print(f"config ok: {len(runs)} run{'s' * (len(runs) != 1)} under {os.path.normpath(config.get('results_dir', 'artifacts'))}/runs: "
          f"{names}")


def main(argv: Sequence[str] | None = None) -> None:
    from .cli import run_script

    run_script(_main, build_parser(), argv)
