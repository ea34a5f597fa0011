"""Run the whole study through Snakemake and print each rule's wall time and the total.

    python3 dev/study.py [--configfile config/study.yaml] [-- extra snakemake arguments]

Runs `snakemake --profile profiles/local --configfile CONFIG` from the repository root, then, if it
succeeded, `snakemake --report <results_dir>/report.html` with the same profile and config (the
report the README describes). It reads the `benchmark:` files the run wrote (benchmarks/ for the
data rules, <results_dir>/benchmarks/ for training and evaluation) and prints one line per job with
its seconds, then the sum over jobs, the wall time of the workflow, that of the report, and the
total of the two (jobs that overlap make the sum over jobs the larger). Figures: docs/performance.md.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def benchmark_rows(dirs: list[Path], since: float) -> list[tuple[str, float]]:
    """(job, seconds) for every benchmark file under `dirs` written after `since`, in the order written."""
    files = [p for d in dirs if d.is_dir() for p in d.rglob("*.tsv") if p.stat().st_mtime >= since]
    rows = []
    for path in sorted(files, key=lambda p: p.stat().st_mtime):
        with open(path, newline="") as f:
            last = list(csv.DictReader(f, delimiter="\t"))[-1]
        rows.append((str(path.relative_to(ROOT)), float(last["s"])))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configfile", default="config/study.yaml")
    ap.add_argument("snakemake_args", nargs="*", help="after --, passed to snakemake as they are")
    args = ap.parse_args()
    results = yaml.safe_load((ROOT / args.configfile).read_text()).get("results_dir", "artifacts")
    cmd = ["snakemake", "--profile", "profiles/local", "--configfile", args.configfile, *args.snakemake_args]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    status = subprocess.call(cmd, cwd=ROOT)
    wall = time.time() - t0
    report_wall = None
    if status == 0:
        report = [*cmd, "--report", f"{results}/report.html"]  # the same config arguments
        print("$", " ".join(report), flush=True)
        t1 = time.time()
        status = subprocess.call(report, cwd=ROOT)
        report_wall = time.time() - t1
    rows = benchmark_rows([ROOT / "benchmarks", ROOT / results / "benchmarks"], t0 - 1)
    width = max((len(job) for job, _ in rows), default=10)
    print(f"\n{'job (benchmark file)':<{width}}  seconds")
    for job, sec in rows:
        print(f"{job:<{width}}  {sec:8.1f}")
    print(f"{'sum over jobs':<{width}}  {sum(s for _, s in rows):8.1f}")
    print(f"{'wall time of the workflow':<{width}}  {wall:8.1f}")
    if report_wall is not None:
        print(f"{'wall time of the report':<{width}}  {report_wall:8.1f}")
        print(f"{'total':<{width}}  {wall + report_wall:8.1f}")
    print(f"exit status {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
