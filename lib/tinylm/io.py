"""Atomic file output, hashing and logging shared by every step.

Outputs are written to a temporary file in the target's folder and renamed over the target, so a
crash or a kill never leaves a half-written file where a finished one is expected. A killed writer
leaves its temporary file behind (.tinylm-tmp.<pid>.<target name>.<random>.tmp); the next write of
the same target removes it once that process is gone (or, where the pid came back to this process,
a restarted container's job, once this process is not writing it).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import DataError, OutputError

_CHUNK = 1 << 20
_UMASK = os.umask(0)
os.umask(_UMASK)
TMP_PREFIX = ".tinylm-tmp."
TMP_NAME = re.compile(re.escape(TMP_PREFIX) + r"(\d+)\.(.+)\.[a-z0-9_]{8}\.tmp")  # mkstemp's 8 characters
# A write refused for want of room: the user's to fix (free space, a quota, ulimit -f), not a bug
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# The temporary files this process is writing now: one named with its pid that is not here was left by
# an earlier process that had the same pid (a restarted container's job gets its predecessor's)
_WRITING: set[str] = set()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}.{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    _WRITING.add(tmp.name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs are shared like any other file
    try:
        with no_room_is_named(path):
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if tmp.exists():  # the block failed: a writer still open on it (torch.save's, held by the error's
            # traceback) would keep a removed file's bytes on the disk, the room a full disk needs next
            with contextlib.suppress(OSError):
                os.truncate(tmp, 0)
            tmp.unlink(missing_ok=True)
        _WRITING.discard(tmp.name)


@contextlib.contextmanager
def no_room_is_named(path: str | os.PathLike, then: str = "the file there before, if any, is kept") -> Iterator[None]:
    """A write to `path` refused for want of room (ENOSPC, EDQUOT, EFBIG) becomes OutputError, naming
    the file, what to do and `then` (what is left); other errors pass unchanged."""
    try:
        yield
    except OSError as e:
        if e.errno not in _NO_ROOM or isinstance(e, OutputError):
            raise
        error = OutputError(f"could not write {path}: {e.strerror} (a full disk, a quota or a file-size limit); "
                            f"make room there, then run again; {then}")
        error.errno = e.errno  # (without strerror, str(error) stays the message)
        raise error from e


def remove_stale_temps(path: Path) -> None:
    """Remove the temporary files of `path` left by writers that were killed (not those of a live one)."""
    for tmp in path.parent.glob(f"{TMP_PREFIX}*.tmp"):
        if killed_writers_output(tmp) == path.name:
            tmp.unlink(missing_ok=True)


def killed_writers_output(tmp: Path) -> str | None:
    """The name of the output an atomic_path temporary file was for, where its writer was killed: its
    process has ended, or its pid is this process's (a restarted container's job gets its predecessor's)
    and this process is not writing it. None for a live writer's file, or a name atomic_path does not make."""
    if not (m := TMP_NAME.fullmatch(tmp.name)):
        return None
    pid = int(m[1])
    killed = tmp.name not in _WRITING if pid == os.getpid() else not pid_alive(pid)
    return m[2] if killed else None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (one of another user counts, a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS): it exists
        return True
    return stat[stat.rindex(")") + 2] != "Z"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator:
    """open() for writing that only replaces `path` once the file is complete."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def read_json(path: str | os.PathLike):
    """The JSON in `path`; DataError naming the file when it is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); delete it and rebuild it") from e


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Log lines with a timestamp to stderr (Snakemake rules redirect it to the rule's log file)."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    return logging.getLogger("tinylm")
