"""Refuse SLURM jobs that no node can run, before anything is submitted.

SLURM accepts a job that asks for more CPUs than any node of its partition has, or a longer time
limit than its partition allows, and keeps it pending for ever (reason PartitionConfig or
PartitionTimeLimit); Snakemake then waits without a word. (Too much memory
or too many GPUs sbatch refuses, but without saying what the nodes have.) rules/common.smk calls
`check_jobs_fit` when the slurm executor runs, with every job's request as
snakemake-executor-plugin-slurm would submit it and the nodes as `sinfo` lists them.
"""

from __future__ import annotations

import math
import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .errors import ConfigError

SINFO = ["sinfo", "--noheader", "--Node", "--format=%N %P %c %m %l %G"]
# gpu:2, gpu:a100:4 or gpu:a100:4(S:0-1), among other GRES separated by commas
GPU_GRES = re.compile(r"(?:^|,)gpu(?::([^:,(]+))?:(\d+)")


@dataclass(frozen=True)
class Node:
    name: str
    partition: str
    default: bool  # the partition is the cluster's default (sinfo marks it with *)
    cpus: int
    mem_mb: int
    gpus: dict[str, int]  # GPU type -> count ("" when the GRES names none)
    time_limit_sec: int | None = None  # the partition's time limit; None: none


@dataclass(frozen=True)
class Request:
    """What one job asks of one node: one task, as every rule of this workflow runs."""

    rule: str
    partition: str | None
    cpus: int
    mem_mb: int
    gpus: int
    gpu_model: str | None = None
    cpus_from: str = "its threads"  # the setting the CPU count comes from, for the error message
    minutes: int = 0  # its time limit (the runtime resource, which the plugin passes as --time); 0: none


def time_limit_sec(text: str) -> int | None:
    """Seconds of a time limit as sinfo writes it (minutes, minutes:seconds, hours:minutes:seconds,
    days-hours, days-hours:minutes, days-hours:minutes:seconds); None for none (infinite, UNLIMITED)."""
    days, _, rest = text.rpartition("-")
    parts = rest.split(":")
    if not all(p.isdigit() for p in parts) or not (days == "" or days.isdigit()) or len(parts) > 3:
        return None
    values = [int(p) for p in parts]
    if days:  # days-hours[:minutes[:seconds]]
        values += [0] * (3 - len(values))
        return ((int(days) * 24 + values[0]) * 60 + values[1]) * 60 + values[2]
    hours, minutes, seconds = {1: (0, values[0], 0), 2: (0, *values), 3: values}[len(values)]
    return (hours * 60 + minutes) * 60 + seconds


def parse_sinfo(text: str) -> list[Node]:
    """Nodes from SINFO's output: one line per node and partition."""
    nodes = []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, partition, cpus, mem, limit, gres = line.split(maxsplit=5)
        gpus: dict[str, int] = {}
        for m in GPU_GRES.finditer(gres):
            gpus[m.group(1) or ""] = gpus.get(m.group(1) or "", 0) + int(m.group(2))
        nodes.append(Node(name, partition.rstrip("*"), partition.endswith("*"),
                          int(cpus.rstrip("+")), int(mem.rstrip("+")), gpus, time_limit_sec(limit)))
    return nodes


def query_nodes() -> list[Node]:
    """The cluster's nodes from `sinfo`; ConfigError when it does not answer."""
    try:
        out = subprocess.run(SINFO, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise ConfigError(f"`{' '.join(SINFO)}` failed ({e}); the slurm executor needs SLURM's "
                          "client tools on this machine") from e
    return parse_sinfo(out)


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def job_request(rule: str, threads: int, resources: Mapping) -> Request:
    """The request the slurm plugin submits for a job: --cpus-per-task (cpus_per_task, else
    threads) or --cpus-per-gpu, --mem or --mem-per-cpu, and --gpus or --gres=gpu:..."""
    gpus, model = _int(resources.get("gpu")) or 0, resources.get("gpu_model")
    gres = resources.get("gres")
    if not gpus and isinstance(gres, str):
        m = GPU_GRES.search(gres)
        gpus, model = (int(m.group(2)), m.group(1)) if m else (0, model)
    per_task, per_gpu = _int(resources.get("cpus_per_task")), _int(resources.get("cpus_per_gpu"))
    if per_task:  # below 0 (and cpus_per_gpu below 1) the plugin sends no CPU count at all
        cpus, cpus_from = max(per_task, 0), f"set-resources: {rule}: cpus_per_task"
    elif gpus and per_gpu:
        cpus, cpus_from = max(per_gpu, 0) * gpus, f"set-resources: {rule}: cpus_per_gpu"
    else:
        cpus, cpus_from = threads, "its threads, or cap every rule's with max-threads"
    mem = _int(resources.get("mem_mb")) or 0
    if per_cpu := _int(resources.get("mem_mb_per_cpu")):
        mem = per_cpu * max(cpus, 1)
    partition = resources.get("slurm_partition")
    return Request(rule, str(partition) if partition else None, cpus, mem, gpus, model, cpus_from,
                   max(_int(resources.get("runtime")) or 0, 0))


def problem(req: Request, nodes: list[Node]) -> str | None:
    """Why no node of the request's partition can run it, or None when one can."""
    # sbatch -p a,b: the job runs in whichever listed partition can start it soonest
    wanted = req.partition.split(",") if req.partition else []
    where = f"partition{'s' * (len(wanted) > 1)} {req.partition}" if wanted else "the default partition"
    if missing := [p for p in wanted if all(n.partition != p for n in nodes)]:
        return f"rule {req.rule} asks for partition {','.join(missing)}, which sinfo does not list"
    pool = [n for n in nodes if (n.partition in wanted if wanted else n.default)]
    if not pool and not wanted:
        pool = nodes  # no default partition: sbatch picks one, any node may run the job
    if not pool:
        return None

    def gpus(n: Node) -> int:
        return n.gpus.get(req.gpu_model, 0) if req.gpu_model else sum(n.gpus.values())

    def minutes(n: Node) -> float:
        return math.inf if n.time_limit_sec is None else n.time_limit_sec / 60

    gpu_name = f"{req.gpu_model} GPUs" if req.gpu_model else "GPUs"
    asks = [  # (what, amount, what a node has, the setting that asks for it)
        ("CPUs", req.cpus, lambda n: n.cpus, req.cpus_from),
        ("MB of memory", req.mem_mb, lambda n: n.mem_mb, f"set-resources: {req.rule}: mem_mb"),
        (gpu_name, req.gpus, gpus, "its gpu resource: train.gpus, or train.device: cpu for none"),
        ("minutes of run time", req.minutes, minutes, f"set-resources: {req.rule}: runtime"),
    ]
    if any(all(have(n) >= amount for _, amount, have, _ in asks) for n in pool):
        return None
    too_much = []
    for what, amount, have, setting in asks:
        biggest = max(pool, key=have)
        if have(biggest) < amount:
            has = (f"partition {biggest.partition} allows {have(biggest):g}" if have is minutes
                   else f"node {biggest.name} has {have(biggest)}")
            too_much.append(f"{amount} {what}, {has} (lower {setting})")
    if not too_much:
        wanted = ", ".join(f"{amount} {what}" for what, amount, _, _ in asks if amount)
        return f"rule {req.rule} asks for {wanted} on one node; no node in {where} has all of them"
    return f"rule {req.rule} asks for more than any node in {where} has: " + "; ".join(too_much)


def check_jobs_fit(requests: Iterable[Request], nodes: list[Node]) -> None:
    """ConfigError naming every rule that asks for more than a node has (it would pend for ever)."""
    problems = list(dict.fromkeys(p for req in requests if (p := problem(req, nodes))))
    if problems:
        raise ConfigError(
            "SLURM would queue these jobs for ever, so none was submitted (the profile is "
            "profiles/slurm/config.yaml; slurm_partition picks bigger nodes):\n  "
            + "\n  ".join(problems)
        )
