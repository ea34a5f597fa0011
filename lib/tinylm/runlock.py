"""One writer per run directory: a trainer holds an exclusive lock on <run_dir>/.lock while it runs.

The lock is flock(2) on an open file: the kernel releases it when the holder exits in any way,
kill -9 included, so a stale .lock file never blocks a run; only a live holder does. The file names
its holder (pid, host, start time) for the message a second trainer gets. On a network filesystem
flock locks across machines (Linux emulates it with POSIX locks on NFS); one that refuses locks
(Lustre mounted without `flock`) gets a warning and a run without the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from .errors import TrainingError

log = logging.getLogger("tinylm.train")

# How long a starting trainer retries a lock it finds held: held_by's probe holds one for an instant,
# a trainer for its whole run.
PROBE_WAIT_SEC = 1.0


class RunLock:
    """Context manager: hold <run_dir>/.lock, or raise TrainingError naming the trainer that does."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + PROBE_WAIT_SEC
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except PermissionError:  # another user's .lock
                self._replace_foreign_lock()
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 4096, 0)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                    if time.monotonic() < deadline:  # perhaps a probe (held_by): it lets go at once
                        time.sleep(0.02)
                        continue
                    raise TrainingError(self._in_use(holder)) from None
                log.warning("%s: cannot lock it (%s); make sure no other trainer writes to %s", self.path,
                            e.strerror, self.path.parent)
                return self
            # A holder that just finished removed the file we opened: lock the one now there.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        self._fd = fd
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        return self

    def _replace_foreign_lock(self) -> None:
        """.lock belongs to another user: the run is in use if that user's trainer holds it (or if the
        file cannot be read to tell); else it was left by a trainer that has exited, and is removed
        (the folder's permissions allowing) so that the next try creates this user's own."""
        if (held := held_by(self.path.parent)) is not None:
            raise TrainingError(self._in_use_by(*held))
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except PermissionError:
            raise TrainingError(f"{self.path} was left by a trainer of user {_owner(self.path)} that has exited, and "
                                f"this user may neither write it nor remove it. Have that user or an administrator "
                                f"remove it, then run again") from None

    def _in_use(self, holder: bytes) -> str:
        return self._in_use_by(*_describe(holder))

    def _in_use_by(self, who: str, stop: str) -> str:
        return (f"{self.path.parent} is in use by another trainer ({who}), which holds {self.path}. "
                f"Two trainers in one run directory would mix their records. Wait for it to finish, or "
                f"stop it ({stop}), then run again.")

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still held: a waiting opener then retries
            os.close(self._fd)
            self._fd = None


def held_by(run_dir: str | os.PathLike) -> tuple[str, str] | None:
    """(who, how to stop it) if a live trainer holds <run_dir>/.lock, else None (no file, or one left
    by a trainer that has exited). The probe takes a shared lock for an instant; a trainer starting in
    that instant retries for up to PROBE_WAIT_SEC before it calls the run in use."""
    path = Path(run_dir) / ".lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except PermissionError:  # another user's, made unreadable by their umask: it may be held
        return (f"perhaps a trainer of user {_owner(path)}, whose {path.name} this user cannot read",
                f"ask {_owner(path)} to stop it, or to remove {path} if none of their trainers runs")
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
            return _describe(os.pread(fd, 4096, 0))
        return None  # a filesystem without locks: trainers run unlocked there too (with a warning)
    finally:
        os.close(fd)  # closing releases the probe's lock
    return None


def _describe(holder: bytes) -> tuple[str, str]:
    """The holder's record -> (who, how to stop it so that its run resumes)."""
    try:
        h = json.loads(holder)
        who, pid, host = f"pid {h['pid']} on {h['host']}, started {h['started']}", h["pid"], h["host"]
    except (ValueError, KeyError, TypeError):  # it has only just taken the lock
        who, pid, host = "a process that has just started", "<pid>", "its host"
    return who, f"`kill {pid}` on {host}: it saves checkpoints/last.pt and the run resumes from it"


def _owner(path: Path) -> str:
    """The name of the user who owns `path` (its uid where the system has no name for it)."""
    try:
        uid = path.stat().st_uid
    except OSError:
        return "unknown"
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)
