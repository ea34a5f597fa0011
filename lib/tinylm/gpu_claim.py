"""One GPU for each one-GPU training job on a machine with several: the least used, held to the job's end.

Snakemake's local executor counts GPUs (`--resources gpu=N`) but does not say which one a job gets
(snakemake/snakemake#281), so every job would train on the first visible GPU. Before CUDA starts, a
training job of one process on a machine with two or more visible GPUs claims one and sets
CUDA_VISIBLE_DEVICES to it alone; from there on it runs as on a one-GPU machine.

A claim is an exclusive flock on a file per GPU and slot (`<gpu>.<slot>.lock` in a folder of this
user's temporary directory), taken while holding a lock that makes the choice one claimer at a time.
The GPU with the fewest slots held wins (ties: the first in the visible order), so N jobs on N GPUs get
one each and 2N share them two by two (docs/performance.md, "Two trainings on one GPU"). The kernel
drops a process's locks when it ends, however it ends, so no claim outlives its job.

Which GPUs: CUDA_VISIBLE_DEVICES's entries when it is set (indices or UUIDs, as the user wrote them;
CUDA ignores everything from the first entry that is neither), else the UUIDs `nvidia-smi` lists.
Jobs coordinate when they see the list written the same way. A job that names its GPU, one process
of a train.gpus > 1 run (torchrun's LOCAL_RANK; the config's train.device takes no GPU number, but a
`device_setting` of cuda:N names one too), chooses nothing and keeps what CUDA shows it, but holds a
slot on that GPU so that jobs choosing after it count it. Where
there is nothing to choose (the CPU, one visible GPU, a system without flock) nothing is claimed,
and a claim that fails (a lock folder that cannot be written) says so and leaves the job on the
first visible GPU, as before.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # not a POSIX system: no claims
    fcntl = None

log = logging.getLogger("tinylm.gpu_claim")

_held: list[IO] = []  # this process's claim, open for its whole life
_CUDA_NAME = re.compile(r"\d+|(GPU|MIG)-[0-9A-Za-z/-]+")


def default_lock_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"tinylm-gpu-claims-{os.getuid()}"


def visible_gpus(env: Mapping[str, str]) -> list[str]:
    """The GPUs a CUDA process started with `env` would see, named as CUDA_VISIBLE_DEVICES names them,
    or by nvidia-smi's UUIDs where it is unset; [] without a driver."""
    if "CUDA_VISIBLE_DEVICES" in env:
        gpus = []
        for entry in env["CUDA_VISIBLE_DEVICES"].split(","):
            if not _CUDA_NAME.fullmatch(entry.strip()):
                break  # CUDA shows no device from here on
            gpus.append(entry.strip())
        return gpus
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60, env=dict(env))
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def _try_lock(path: Path) -> IO | None:
    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def claim(gpus: list[str], lock_dir: Path, only: int | None = None) -> tuple[int, IO, int]:
    """(index into `gpus` of the GPU with the fewest held slots, or `only`; the open file holding a
    new slot of it; how many other slots of it were held). Close the file to give the claim back."""
    lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(lock_dir / "choose.lock", "a") as choosing:
        fcntl.flock(choosing, fcntl.LOCK_EX)  # one claimer at a time; released when the file closes
        files = [p.name for p in lock_dir.iterdir()]
        best = None
        for i, gpu in enumerate(gpus):
            if only is not None and i != only:
                continue
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", gpu)
            slots = sorted(int(m.group(1)) for f in files if (m := re.fullmatch(rf"{re.escape(name)}\.(\d+)\.lock", f)))
            held = []
            for slot in slots:
                probe = _try_lock(lock_dir / f"{name}.{slot}.lock")
                if probe is None:
                    held.append(slot)
                else:
                    probe.close()  # it was free: closing gives the probe's lock back
            if best is None or len(held) < len(best[2]):
                best = (i, name, held)
        i, name, held = best
        # The lowest slot not held. Only a claimer that ignored `choosing` (its file deleted and made
        # anew in between) could take it first: then the next one.
        slot = min(set(range(len(held) + 1)) - set(held))
        while (f := _try_lock(lock_dir / f"{name}.{slot}.lock")) is None:
            slot += 1
        return i, f, len(held)


def _cuda_started() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_initialized()


def claim_gpu_for_job(device_setting: str, env: MutableMapping[str, str] | None = None,
                      lock_dir: Path | None = None) -> str | None:
    """Claim a GPU for this training process (module docstring) and, where it chose one, show that one
    alone to CUDA: the claimed GPU's name, or None where nothing was claimed. Call it before anything
    starts CUDA in this process."""
    env = os.environ if env is None else env
    if fcntl is None or device_setting == "cpu":
        return None
    if _cuda_started():
        log.warning("CUDA had started before the GPU claim: this job keeps the GPU it has")
        return None
    gpus = visible_gpus(env)
    if len(gpus) < 2:
        return None
    named = re.fullmatch(r"cuda:(\d+)", device_setting)
    if int(env.get("WORLD_SIZE") or 1) > 1:
        only = int(env.get("LOCAL_RANK") or 0)  # torchrun's rank r takes GPU r
    elif named:
        only = int(named.group(1))
    elif device_setting in ("auto", "cuda"):
        only = None
    else:
        return None
    if only is not None and only >= len(gpus):
        return None  # the run itself says that this GPU is not there
    try:
        i, f, others = claim(gpus, lock_dir or default_lock_dir(), only)
    except OSError as e:
        log.warning("could not claim a GPU (%s): this job trains on the first visible GPU", e)
        return None
    _held.append(f)
    jobs = f"{others} other training job{'' if others == 1 else 's'} on it"
    if only is None:
        env["CUDA_VISIBLE_DEVICES"] = gpus[i]
        log.info("GPU %d of the %d visible (%s), %s", i, len(gpus), gpus[i], jobs)
    else:
        log.info("GPU %d of the %d visible (%s) as set, %s", i, len(gpus), gpus[i], jobs)
    return gpus[i]
