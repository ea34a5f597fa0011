"""Which device a step runs on: one answer for training, evaluation, generation and the benchmark."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TypeVar

import torch

from .errors import ConfigError

log = logging.getLogger("tinylm.devices")

T = TypeVar("T")


def resolve_device(name: str, *, setting: str = "train.device", warn_cpu: bool = True) -> torch.device:
    """'auto' (CUDA when a GPU is visible, else the CPU), 'cpu', 'cuda' or 'cuda:N'.

    `setting` is what the user set (a config key or a command-line flag), named in errors and in the
    warning that `auto` fell back to the CPU; `warn_cpu=False` silences that warning where the CPU is
    not slow for the job (generation).

    Every job that runs a model starts here, so this is also where a CUDA device gets tinylm's one
    arithmetic (allow_tf32): the evaluate job then computes the losses that training's evaluations
    gave the weights it kept, fp32 products (an MoE router's, an fp32 run's) included.
    """
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto":
        if not torch.cuda.is_available():
            if warn_cpu:
                log.warning("no CUDA GPU found: running on the CPU (slow; set %s to cuda to require a GPU)", setting)
            return torch.device("cpu")
        device = torch.device("cuda", torch.cuda.current_device())
    elif re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            raise ConfigError(f"{setting} = {name!r} but no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES and "
                              f"the driver), or set {setting} to auto to fall back to the CPU")
        device = torch.device(name)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise ConfigError(f"{setting} = {name!r} but only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    else:
        raise ConfigError(f"{setting} = {name!r} is not a device; use auto, cpu, cuda or cuda:N")
    allow_tf32()
    return device


def precision_on(device: torch.device, precision: str) -> str:
    """The precision a step runs in: the setting (bf16, fp16 or fp32) on CUDA; autocast is CUDA only,
    so fp32 anywhere else."""
    return precision if device.type == "cuda" else "fp32"


def describe_device(device: torch.device) -> str:
    """How records name a device: 'cpu', or 'cuda:0 (NVIDIA H200)'."""
    if device.type != "cuda":
        return str(device)
    index = torch.cuda.current_device() if device.index is None else device.index
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def allow_tf32() -> None:
    """Let fp32 matrix products use TF32 tensor cores on CUDA (resolve_device does, for every job)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def on_side_stream(fn: Callable[[], T]) -> T:
    """fn() on a new stream of the current CUDA device, after all the current stream has queued and
    before all it queues next: the eager warm-up that CUDA graph capture asks for (the training step's
    and the graphed evaluation's)."""
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        out = fn()
    current.wait_stream(side)
    return out


def software_versions() -> dict[str, str | None]:
    """The versions a run's numbers depend on, for its records: the same config and seed give the same
    losses only on the same software (and, on the CPU, the same torch thread count)."""
    import platform

    import numpy
    import tokenizers

    from . import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "tokenizers": tokenizers.__version__, "tinylm": __version__, "tinylm_commit": _checkout_commit()}


def _checkout_commit() -> str | None:
    """The commit of the checkout the library runs from (`-dirty` after it if a tracked file was changed
    since), or None outside a git checkout or without git: the version alone does not change with the code."""
    import subprocess
    from pathlib import Path

    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / ".git").exists():  # installed elsewhere: a repository around it is not its source
        return None
    try:
        # --exclude=*: no tag's name ("v1", "v1-3-g<hash>"), the commit's full hash alone
        out = subprocess.run(["git", "-C", str(checkout), "describe", "--always", "--dirty", "--abbrev=40",
                              "--exclude=*"], capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None
