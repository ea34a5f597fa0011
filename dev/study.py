"""Run the whole study through Snakemake and print each rule's wall time and the total.

    python3 dev/study.py [--configfile config/study.yaml] [--gpu-slots 2] [-- extra snakemake arguments]

Runs `snakemake --profile profiles/local --resources gpu=SLOTS --configfile CONFIG` from the
repository root, then, if it succeeded and was not a dry run (-n), `snakemake --report <results_dir>/report.html` with the same profile and config (the
report the README describes). It reads the `benchmark:` files the run wrote (benchmarks/ for the
data rules, <results_dir>/benchmarks/ for training and evaluation) and prints one line per job with
its seconds, then the sum over jobs, the wall time of the workflow, that of the report, and the
total of the two (jobs that overlap make the sum over jobs the larger). Figures: docs/performance.md.

SLOTS (2 by default) is how many training jobs share the one GPU. The local profile allows one, which
keeps each run's own speed figures (tokens/s, loss against time) free of the others; two let one
job's compiling and start-up, CPU work, run while the other's steps keep the GPU busy. On one H100
the whole study took 295.2 s with one, 221.7 s with two and 235.6 s with three (docs/performance.md,
"Two trainings on one GPU").
"""

from __future__ import annotations

import argparse
import csv
import re
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


# The options this command gives snakemake, each with the shortest abbreviation snakemake takes for
# it (argparse takes any unambiguous prefix: --reso for --resources, as --res is an alias of its own
# and --rest starts --restart-times).
OWN_OPTIONS = {"--resources": "--reso", "--res": "--res", "--configfile": "--configf",
               "--configfiles": "--configf", "--profile": "--pro"}


def sets_own_option(arg: str) -> bool:
    opt = arg.split("=", 1)[0]
    return any(full.startswith(opt) and len(opt) >= len(short) for full, short in OWN_OPTIONS.items())


def is_dry_run(arg: str) -> bool:
    """-n, or short flags that include it (-np), or --dry-run and its abbreviations (--dryrun too)."""
    return bool(re.fullmatch(r"-[A-Za-z]*n[A-Za-z]*", arg)) or arg.startswith("--dry")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configfile", default="config/study.yaml")
    ap.add_argument("--gpu-slots", type=int, default=2, metavar="N",
                    help="training jobs at once on the GPU (Snakemake's gpu resource; default 2)")
    ap.add_argument("snakemake_args", nargs="*", help="after --, passed to snakemake as they are")
    args = ap.parse_args()
    results = yaml.safe_load((ROOT / args.configfile).read_text()).get("results_dir", "artifacts")
    if args.gpu_slots < 1:
        ap.error(f"--gpu-slots {args.gpu_slots}: give 1 or more")
    for a in args.snakemake_args:
        if sets_own_option(a):
            # the command's own, which comes later, would override it without a word
            ap.error(f"{a}: this command sets snakemake's --profile, --resources and --configfile itself; "
                     "give --gpu-slots N or --configfile FILE before --")
    # the extra arguments first: --resources and --configfile take every word up to the next option,
    # targets included
    cmd = ["snakemake", *args.snakemake_args, "--profile", "profiles/local",
           "--resources", f"gpu={args.gpu_slots}", "--configfile", args.configfile]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    status = subprocess.call(cmd, cwd=ROOT)
    wall = time.time() - t0
    report_wall = None
    dry_run = any(is_dry_run(a) for a in args.snakemake_args)
    if status == 0 and not dry_run:  # a dry run made no results to report on
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
