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
        # A folder the system refuses to write (a read-only filesystem) raises its OSError as it is: the
        # trainer's run_script words it as every job's (cli.refused_by_the_system).
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + PROBE_WAIT_SEC
        replaced = 0
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except PermissionError as e:  # another user's .lock
                if replaced == 10:  # removed, yet still not ours to open
                    raise TrainingError(f"cannot open {self.path} for writing ({e.strerror}): give this user "
                                        f"write access to {self.path.parent}, or train in another results_dir") from None
                self._replace_foreign_lock()
                replaced += 1
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
        """.lock could not be opened for writing: another user's. Held by a live trainer of theirs, the
        run is in use; left by one that has exited, it is removed while this process holds a shared lock on
        it (a trainer opening it meanwhile waits, then finds it gone), so that the next try creates this
        user's own. Refused where this user cannot read it (whether it is held cannot be told), may not
        remove it, or cannot create one (a run folder this user may not write)."""
        owner = _owner(self.path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            if os.access(self.path.parent, os.W_OK):
                return  # removed since: try again
            raise TrainingError(f"cannot create {self.path}: this user may not write in {self.path.parent} (owned by "
                                f"user {_owner(self.path.parent)}). Train in a run folder of your own (another "
                                f"results_dir), or have its owner give you write access") from None
        except PermissionError:
            raise TrainingError(f"cannot tell whether {self.path.parent} is in use: {self.path} belongs to user "
                                f"{owner} and this user cannot read it. If no trainer of theirs runs there, have "
                                f"them remove it, then run again") from None
        try:
            try:  # shared: NFS, which emulates flock with POSIX locks, refuses an exclusive one on a read-only file
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                    raise TrainingError(self._in_use(os.pread(fd, 4096, 0))) from None
                # a filesystem without locks: replaced unlocked, as trainers run there (with a warning)
            if _same_file(fd, self.path):
                self.path.unlink()
        except FileNotFoundError:
            pass
        except PermissionError:
            raise TrainingError(f"{self.path} was left by a trainer of user {owner} that has exited, and this user "
                                f"may neither write it nor remove it. Have that user or an administrator remove "
                                f"it, then run again") from None
        finally:
            os.close(fd)

    def _in_use(self, holder: bytes) -> str:
        who, stop = _describe(holder)
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
        owner = _owner(path)
        return (f"perhaps, by user {owner}: {path} is theirs and cannot be read here to tell",
                f"if no trainer of {owner}'s runs there, have them remove {path}")
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
