"""What the fused ops share: Triton (when installed), the one switch, and the autocast check."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import ConfigError

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the fallback paths need no Triton
    triton = tl = None

SWITCH = "TINYLM_KERNELS"  # 0: the plain PyTorch paths everywhere; 1 (or unset): the kernels
LOW = (torch.bfloat16, torch.float16)


def enabled() -> bool:
    """Whether the environment allows the Triton kernels (TINYLM_KERNELS unset, empty or 1).

    Read at every call, so a test's monkeypatch.setenv takes effect at once; torch.compile reads it
    when it traces, so a compiled function keeps what it saw then.
    """
    value = os.environ.get(SWITCH) or "1"
    if value not in ("0", "1"):
        raise ConfigError(
            f"environment variable {SWITCH}={value!r}; set it to 0 (the plain PyTorch paths "
            "everywhere) or 1 (the Triton kernels where eligible), or unset it"
        )
    return value == "1"


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """TINYLM_KERNELS=0 inside the block (what the tests compare the kernels with), then as before."""
    before = os.environ.get(SWITCH)
    os.environ[SWITCH] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(SWITCH, None)
        else:
            os.environ[SWITCH] = before


def autocast_low(x: torch.Tensor) -> bool:
    """Kernels on, Triton present, and x on CUDA under bf16/fp16 autocast."""
    return (
        enabled()
        and triton is not None
        and x.is_cuda
        and torch.is_autocast_enabled("cuda")
        and torch.get_autocast_dtype("cuda") in LOW
    )


KERNELS_DIR = Path(__file__).resolve().parent


@functools.cache
def source_digest(folder: Path = KERNELS_DIR) -> str:
    """sha256 (16 hex digits) of the kernel modules' sources (`*.py` in `folder`, by name).

    step.compile_model puts it in torch's compile-cache key. A compiled graph loaded from torch's
    caches runs the launch code it was compiled with (tiles, grid, warps, output buffers of the
    `triton_op` wrappers below), and torch's own key covers only the Triton kernels' source.
    """
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


enabled()  # a bad value fails here, with its message, rather than inside a compiled graph
