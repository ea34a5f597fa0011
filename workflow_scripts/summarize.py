"""Rule summarize: every run's metrics -> artifacts/summary.csv and the report's plots and pages.

    python workflow_scripts/summarize.py \
        --runs '{"condor": {"history": "artifacts/runs/condor/metrics.jsonl", "metrics": "artifacts/runs/condor/metrics.json"}}' \
        --csv artifacts/summary.csv --table artifacts/plots/summary.html --samples artifacts/plots/samples.html \
        --loss-vs-step artifacts/plots/loss_vs_step.png --loss-vs-time artifacts/plots/loss_vs_time.png \
        --moe-plots '{"falcon": {"expert_load": "artifacts/plots/falcon_expert_load.png", "dropped": "..."}}'
"""

import argparse
import json
import sys

from tinylm.errors import TinyLMError
from tinylm.io import setup_logging


def json_object(text: str) -> dict:
    """--runs, --moe-plots: a JSON object."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(text)
    return value


def main(args: argparse.Namespace) -> None:
    from tinylm.report import summarize_runs

    setup_logging()
    summarize_runs(args.runs, csv=args.csv, table=args.table, loss_vs_step=args.loss_vs_step,
                   loss_vs_time=args.loss_vs_time, samples=args.samples, moe_plots=args.moe_plots)


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--runs", type=json_object, required=True,
                    help='JSON: model -> {"history": metrics.jsonl, "metrics": metrics.json}')
parser.add_argument("--csv", required=True, help="summary table to write")
parser.add_argument("--table", required=True, help="HTML page of the summary table to write")
parser.add_argument("--samples", required=True, help="HTML page of the generated samples to write")
parser.add_argument("--loss-vs-step", required=True, help="PNG to write")
parser.add_argument("--loss-vs-time", required=True, help="PNG to write")
parser.add_argument("--moe-plots", type=json_object, default={},
                    help='JSON: MoE model -> {"expert_load": png, "dropped": png}, the PNGs to write')

if __name__ == "__main__":
    try:
        main(parser.parse_args())
    except TinyLMError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
