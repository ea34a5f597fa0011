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

Which GPUs: CUDA_VISIBLE_DEVICES's entries when it is set (indices or UUIDs, as the user wrote them),
else the UUIDs `nvidia-smi` lists. Jobs coordinate when they see the list written the same way.
Not claimed: train.device set to the CPU or to one GPU (cuda:N), and runs of train.gpus > 1, whose
torchrun processes take the first N visible GPUs.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import IO

log = logging.getLogger("tinylm.gpu_claim")

_held: list[IO] = []  # this process's claim, open for its whole life


def default_lock_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"tinylm-gpu-claims-{os.getuid()}"


def visible_gpus(env: Mapping[str, str]) -> list[str]:
    """The GPUs a CUDA process started with `env` would see, named as CUDA_VISIBLE_DEVICES names them,
    or by nvidia-smi's UUIDs where it is unset; [] without a driver."""
    if "CUDA_VISIBLE_DEVICES" in env:
        return [g.strip() for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
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


def claim(gpus: list[str], lock_dir: Path) -> tuple[int, IO, int]:
    """(index into `gpus` of the GPU with the fewest held slots, the open file holding its new slot, how
    many other slots of it were held). Close the file to give the claim back."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / "choose.lock", "a") as choosing:
        fcntl.flock(choosing, fcntl.LOCK_EX)  # one claimer at a time; released when the file closes
        files = [p.name for p in lock_dir.iterdir()]
        best = None
        for i, gpu in enumerate(gpus):
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", gpu)
            slots = sorted(int(m.group(1)) for f in files if (m := re.fullmatch(rf"{re.escape(name)}\.(\d+)\.lock", f)))
            held = []
            for slot in slots:
                probe = _try_lock(lock_dir / f"{name}.{slot}.lock")
                if probe is None:
                    held.append(slot)
                else:
                    probe.close()  # it was free: closing gives the probe's lock back
            free = min(set(range(len(slots) + 1)) - set(held))
            if best is None or len(held) < best[1]:
                best = (i, len(held), lock_dir / f"{name}.{free}.lock")
        i, n_held, path = best
        f = _try_lock(path)
        assert f is not None, path  # free above, and every claimer waits for `choosing`
        return i, f, n_held


def claim_gpu_for_job(device_setting: str, env: MutableMapping[str, str] | None = None,
                      lock_dir: Path | None = None) -> str | None:
    """Claim a GPU for this one-process training job and show it alone to CUDA (module docstring): the
    GPU's name as CUDA_VISIBLE_DEVICES now holds it, or None where nothing was claimed. Call it before
    anything starts CUDA in this process."""
    env = os.environ if env is None else env
    if device_setting not in ("auto", "cuda") or int(env.get("WORLD_SIZE", "1")) > 1 or os.name != "posix":
        return None  # (flock is POSIX's)
    gpus = visible_gpus(env)
    if len(gpus) < 2:
        return None
    i, f, others = claim(gpus, lock_dir or default_lock_dir())
    _held.append(f)
    env["CUDA_VISIBLE_DEVICES"] = gpus[i]
    log.info("GPU %d of the %d visible (%s), %s other training job%s on it", i, len(gpus), gpus[i],
             others, "" if others == 1 else "s")
    return gpus[i]
