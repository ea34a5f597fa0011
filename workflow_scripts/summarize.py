"""Rule summarize: every run's records -> the summary tables, the report's pages and its figures.

    python workflow_scripts/summarize.py \
        --runs '[{"run": "condor-seed1", "history": "artifacts/runs/condor-seed1/metrics.jsonl",
                  "config": "artifacts/runs/condor-seed1/config.json",
                  "metrics": "artifacts/runs/condor-seed1/metrics.json", "model": "condor",
                  "setting": "condor", "seed": 1, "sweep": null, "values": {}}]' \
        --runs-csv artifacts/summary.csv --by-setting-csv artifacts/summary_by_setting.csv \
        --comparison-csv artifacts/summary_vs_reference.csv --reference baseline \
        --table artifacts/plots/summary.html --run-settings artifacts/plots/run_settings.html \
        --samples artifacts/plots/samples.html --loss-vs-step artifacts/plots/loss_vs_step.png \
        --loss-vs-time artifacts/plots/loss_vs_time.png \
        --sweeps '{"lr": {"plot": "artifacts/plots/sweep_lr.png", "keys": ["lr"]}}' \
        --moe-plots '{"falcon": {"expert_load": "artifacts/plots/falcon_expert_load.png", "dropped": "..."}}'
"""

import argparse
import json

from tinylm.cli import parse_params, run_script


def json_runs(text: str) -> dict:
    """--runs: a JSON list of runs, each an object with its "run" name, in the order to show them."""
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(e, dict) and "run" in e for e in value):
        raise ValueError(text)
    return {entry["run"]: {k: v for k, v in entry.items() if k != "run"} for entry in value}


def main(args: argparse.Namespace) -> None:
    from tinylm.report import summarize_runs

    summarize_runs(
        args.runs,
        runs_csv=args.runs_csv,
        by_setting_csv=args.by_setting_csv,
        comparison_csv=args.comparison_csv,
        table=args.table,
        run_settings=args.run_settings,
        loss_vs_step=args.loss_vs_step,
        loss_vs_time=args.loss_vs_time,
        samples=args.samples,
        sweeps=parse_params(args.sweeps, parser, "--sweeps"),
        moe_plots=parse_params(args.moe_plots, parser, "--moe-plots"),
        reference=args.reference,
    )


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument(
    "--runs",
    type=json_runs,
    required=True,
    help="JSON: [{run, history, config, metrics (paths), model, setting, seed, sweep, values}]",
)
parser.add_argument("--runs-csv", required=True, help="CSV to write: one row per run")
parser.add_argument("--by-setting-csv", required=True, help="CSV to write: one row per setting")
parser.add_argument(
    "--comparison-csv",
    required=True,
    help="CSV to write: each other setting against the reference, one row per metric",
)
parser.add_argument(
    "--reference", default=None, help="the setting the others are compared with (left out: none)"
)
parser.add_argument("--table", required=True, help="HTML page of the three tables to write")
parser.add_argument(
    "--run-settings", required=True, help="HTML page of each run's settings to write"
)
parser.add_argument("--samples", required=True, help="HTML page of the generated samples to write")
parser.add_argument("--loss-vs-step", required=True, help="PNG to write")
parser.add_argument("--loss-vs-time", required=True, help="PNG to write")
parser.add_argument(
    "--sweeps",
    default="{}",
    help='JSON: sweep -> {"plot": png to write, "keys": swept keys, the first along x}',
)
parser.add_argument(
    "--moe-plots",
    default="{}",
    help='JSON: MoE run -> {"expert_load": png, "dropped": png}, the PNGs to write',
)

if __name__ == "__main__":
    run_script(main, parser)
