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
from collections.abc import Sequence
from pathlib import Path

from . import schema
from .config import progress_interval
from .errors import ConfigError
from .workflow import check_config, check_local_dataset, check_yaml_syntax, expand_runs

DEFAULTS = schema.SCHEMA_PATH.parent / "config.yaml"  # what the Snakefile reads first
CHECKOUT = schema.SCHEMA_PATH.parent.parent  # the workflow's directory: relative data paths start here


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


def culprit(base: str | Path, files: Sequence[str | Path], error: ConfigError) -> str:
    """'FILE: ' for the first of `files` that, merged alone over `base`, fails with the same message as
    all of them together, else '' (the mistake lies in `base` itself, or in how the files combine)."""
    try:
        check_config(load_merged(base, []))
    except ConfigError as alone:
        if str(alone) == str(error):
            return ""  # the base's own mistake: its message names the key
    for path in files:
        try:
            check_config(load_merged(base, [path]))
        except ConfigError as alone:
            if str(alone) == str(error):
                return f"{path}: "
    return ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinylm check-config", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("files", nargs="*", help="config files merged over --base, in order (as --configfile)")
    p.add_argument("--base", default=str(DEFAULTS),
                   help="the defaults the files are merged over (default: this checkout's config/config.yaml)")
    return p


def _main(args: argparse.Namespace) -> None:
    from snakemake.utils import validate

    config = load_merged(args.base, args.files)
    try:
        check_config(config)
    except ConfigError as e:
        raise ConfigError(f"{culprit(args.base, args.files, e)}{e}") from e
    validate(config, str(schema.SCHEMA_PATH))  # the defaults filled in, as the workflow has them
    check_local_dataset(config, CHECKOUT)  # relative paths from the checkout, as `snakemake` run there reads them
    progress_interval()  # read by training from the environment; the workflow checks it when it starts
    runs = expand_runs(config)
    names = ", ".join(runs) or "none"
    print(f"config ok: {len(runs)} run{'s' * (len(runs) != 1)} under {config.get('results_dir', 'artifacts')}/runs: "
          f"{names}")


def main(argv: Sequence[str] | None = None) -> None:
    from .cli import run_script

    run_script(_main, build_parser(), argv)
