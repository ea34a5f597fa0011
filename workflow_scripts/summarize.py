"""Rule summarize: every run's metrics -> artifacts/summary.csv and the report's plots and pages.

    python workflow_scripts/summarize.py --csv artifacts/summary.csv --plots artifacts/plots \
        --runs '{"baseline": "artifacts/runs/baseline", "falcon": "artifacts/runs/falcon"}'
"""

import argparse
import json
import sys

from tinylm.errors import TinyLMError
from tinylm.io import setup_logging


def run_dirs(text: str) -> dict:
    """--runs: a JSON object, model name -> run folder."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(text)
    return value


def main(args: argparse.Namespace) -> None:
    from tinylm.report import summarize_runs

    setup_logging()
    summarize_runs(args.runs, args.csv, args.plots)


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--runs", type=run_dirs, required=True, help="JSON: model -> run folder")
parser.add_argument("--csv", required=True, help="summary table to write")
parser.add_argument("--plots", required=True, help="folder for the PNGs and HTML pages")

if __name__ == "__main__":
    try:
        main(parser.parse_args())
    except TinyLMError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
