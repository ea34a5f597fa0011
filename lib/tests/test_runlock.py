"""The run lock: one trainer per run directory, and the probe the workflow runs before scheduling."""

import os

import pytest

from tinylm.errors import TrainingError
from tinylm.runlock import RunLock, held_by


def test_a_held_run_is_reported_and_refused_and_a_stale_lock_file_is_not(tmp_path):
    run = tmp_path / "runs" / "condor"
    assert held_by(run) is None  # no directory, no file
    run.mkdir(parents=True)
    # left by a kill -9, a longer record than the next trainer's: that one replaces it whole
    (run / ".lock").write_text('{"pid": 1, "host": "%s", "started": "then"}\n' % ("gone" * 50))
    assert held_by(run) is None
    with RunLock(run):
        who, stop = held_by(run)
        assert f"pid {os.getpid()}" in who and f"kill {os.getpid()}" in stop
        with pytest.raises(TrainingError, match=r"in use by another trainer \(pid \d+ on .*\).*kill \d+"):
            RunLock(run).__enter__()
        assert held_by(run) is not None  # the probe did not take the lock away
    assert held_by(run) is None and not (run / ".lock").exists()
    with RunLock(run):  # the probe left nothing behind that blocks the next trainer
        pass


def test_a_trainer_starting_while_a_probe_looks_is_not_refused(tmp_path):
    """held_by (a dry run, the check before the first job) takes a shared lock for an instant; a trainer
    that starts in that instant waits it out rather than stopping with "in use by another trainer"
    and the stale record of a trainer long gone."""
    import fcntl
    import threading

    run = tmp_path / "condor"
    run.mkdir()
    (run / ".lock").write_text('{"pid": 1, "host": "gone", "started": "then"}\n')  # left by a kill -9
    fd = os.open(run / ".lock", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a probe, held longer than a real one to be caught
    threading.Timer(0.2, os.close, (fd,)).start()
    with RunLock(run):
        who, _ = held_by(run)
        assert f"pid {os.getpid()}" in who


def test_a_trainer_that_opened_a_lock_file_its_last_holder_removed_locks_the_new_one(tmp_path, monkeypatch):
    """A holder finishing removes .lock while still holding it; a trainer that opened the file just before
    then locks a file no longer there, and a third trainer would create and lock another: it must open
    .lock again."""
    import fcntl

    from tinylm import runlock

    run = tmp_path / "condor"
    run.mkdir()
    (run / ".lock").write_text('{"pid": 1, "host": "gone", "started": "then"}\n')
    real_flock, removed = fcntl.flock, []

    def flock(fd, op):
        if op & fcntl.LOCK_EX and not removed:  # the holder finished between this open and this lock
            removed.append(True)
            (run / ".lock").unlink()
        return real_flock(fd, op)

    monkeypatch.setattr(runlock.fcntl, "flock", flock)
    with RunLock(run):
        who, _ = held_by(run)  # the file at the path is the one held
        assert removed and f"pid {os.getpid()}" in who


def test_a_dry_run_warns_of_a_held_run(tmp_path):
    """`snakemake -n` skips the check made before the first job; it warns of a held run instead."""
    from tinylm.workflow import check_runs_free, dry_run_warnings

    run = tmp_path / "condor"
    run.mkdir()
    runs = {"condor": {}, "baseline": {}}
    assert dry_run_warnings(runs, tmp_path) == []
    with RunLock(run):
        with pytest.raises(Exception, match="is being trained"):
            check_runs_free([run])
        warning, = dry_run_warnings(runs, tmp_path)
    assert warning.startswith(f"{run} is being trained (pid {os.getpid()}")
    assert (f"without -n, Snakemake stops before any job when it is to train run condor: wait for that training "
            f"to finish, or stop it (`kill {os.getpid()}`") in warning, warning


def test_a_dry_run_warns_of_a_progress_interval_training_would_refuse(tmp_path, monkeypatch):
    """The real run refuses a bad $TINYLM_PROGRESS_SEC before the first training job; a dry run warns."""
    from tinylm.workflow import dry_run_warnings

    runs = {"condor": {}}
    monkeypatch.setenv("TINYLM_PROGRESS_SEC", "10")
    assert dry_run_warnings(runs, tmp_path) == []
    monkeypatch.setenv("TINYLM_PROGRESS_SEC", "-5")
    warning, = dry_run_warnings(runs, tmp_path)
    assert warning.startswith("TINYLM_PROGRESS_SEC = '-5': give the seconds between progress lines"), warning
    assert warning.endswith("; without -n, Snakemake stops before any job when it is to train a run"), warning


def test_a_dry_run_warns_of_a_best_checkpoint_changed_since_training(tmp_path):
    """A real run refuses, before any job, to evaluate a best_model.pt whose sha256 is not the one its
    training recorded (Snakemake would rerun the evaluation of the newer file and delete the last good
    metrics.json first). A dry run warns of it. Only a checkpoint newer than its metrics.json, whose
    evaluation Snakemake reruns, is hashed."""
    import hashlib
    import json

    from tinylm.workflow import dry_run_warnings

    run = tmp_path / "condor"
    best = run / "checkpoints" / "best_model.pt"
    best.parent.mkdir(parents=True)
    best.write_bytes(b"weights")
    record = {"files": {"checkpoints/best_model.pt": {"sha256": hashlib.sha256(b"weights").hexdigest()}}}
    (run / "config.json").write_text(json.dumps(record))
    runs = {"condor": {}}
    assert dry_run_warnings(runs, tmp_path) == []  # trained, not evaluated yet: the file as recorded
    best.write_bytes(b"weights, changed")
    warning, = dry_run_warnings(runs, tmp_path)
    assert warning.startswith(f"{best}: sha256 ") and "recorded" in warning, warning
    assert warning.endswith("; without -n, Snakemake stops before any job when it is to evaluate run condor "
                            "as it is"), warning
    metrics = run / "metrics.json"
    metrics.write_text("{}")
    os.utime(metrics, (best.stat().st_mtime + 10,) * 2)  # evaluated after the change: not rerun, not hashed
    assert dry_run_warnings(runs, tmp_path) == []


def another_users_lock(monkeypatch, path, readable: bool = True):
    """Open `path` as another user's .lock opens for this one: not for writing (the trainer's 0644
    file), and not at all where that user's umask made it 0600. Root ignores modes, so the tests
    stand in for the kernel's refusal."""
    real_open = os.open

    def open_(p, flags, *args, **kwargs):
        if os.fspath(p) == os.fspath(path) and os.path.exists(p) and (flags & os.O_RDWR or not readable):
            raise PermissionError(13, "Permission denied", os.fspath(p))
        return real_open(p, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)


def test_another_users_lock_is_replaced_when_stale_and_refused_when_held(tmp_path, monkeypatch):
    """A .lock left by another user's trainer (killed with -9, or stopped before it removed it) raised
    PermissionError from os.open: a traceback instead of a run. A stale one is replaced; one that a live
    trainer holds is named as in use."""
    import fcntl

    run = tmp_path / "condor"
    run.mkdir()
    lock = run / ".lock"
    lock.write_text('{"pid": 1, "host": "gone", "started": "then"}\n')
    with monkeypatch.context() as m:
        another_users_lock(m, lock)
        assert held_by(run) is None
        with RunLock(run):
            assert f"pid {os.getpid()}" in held_by(run)[0]  # the trainer holds a lock file of its own
    lock.write_text('{"pid": 4242, "host": "there", "started": "now"}\n')
    fd = os.open(lock, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another user's trainer, alive
    try:
        with monkeypatch.context() as m:
            another_users_lock(m, lock)
            with pytest.raises(TrainingError, match=r"in use by another trainer \(pid 4242 on there"):
                RunLock(run).__enter__()
    finally:
        os.close(fd)
    assert lock.exists()


def test_another_users_lock_that_cannot_be_read_or_replaced_is_named(tmp_path, monkeypatch):
    """Whether its trainer is alive cannot be told from a lock this user cannot read: the run counts as
    in use, named with the file's owner; a stale lock in a folder this user cannot change is named
    with what to do."""
    import pwd

    run = tmp_path / "condor"
    run.mkdir()
    lock = run / ".lock"
    lock.write_text('{"pid": 1, "host": "gone", "started": "then"}\n')
    owner = pwd.getpwuid(lock.stat().st_uid).pw_name
    with monkeypatch.context() as m:
        another_users_lock(m, lock, readable=False)
        who, stop = held_by(run)
        assert owner in who and str(lock) in stop
        with pytest.raises(TrainingError, match=rf"{lock}.*{owner}"):
            RunLock(run).__enter__()
    real_unlink = type(lock).unlink

    def unlink(self, *args, **kwargs):
        if self == lock:
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, *args, **kwargs)

    with monkeypatch.context() as m:
        another_users_lock(m, lock)
        m.setattr(type(lock), "unlink", unlink)
        with pytest.raises(TrainingError, match=rf"{lock}.*{owner}.*remove it"):
            RunLock(run).__enter__()
    assert lock.exists()


def test_a_run_folder_this_user_cannot_write_is_named_not_retried_for_ever(tmp_path, monkeypatch):
    """Another user's run folder whose trainer has finished (its .lock removed): creating .lock fails
    with PermissionError, as opening another user's .lock does, and the trainer retried for ever."""
    run = tmp_path / "condor"
    run.mkdir()
    real_open, real_access = os.open, os.access
    creating = []

    def open_(p, flags, *args, **kwargs):
        if os.fspath(p) == os.fspath(run / ".lock") and flags & os.O_CREAT:
            creating.append(p)
            raise PermissionError(13, "Permission denied", os.fspath(p))
        return real_open(p, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if p == run else real_access(p, mode, **kw))
    with pytest.raises(TrainingError, match=rf"cannot create {run / '.lock'}: this user may not write in {run}"):
        RunLock(run).__enter__()
    monkeypatch.setattr(os, "access", real_access)  # a folder that says it is writable, yet refuses
    with pytest.raises(TrainingError, match=rf"cannot open {run / '.lock'} for writing"):
        RunLock(run).__enter__()
    assert len(creating) == 1 + 11


def test_another_users_live_lock_on_nfs_is_not_replaced(tmp_path, monkeypatch):
    """On NFS, flock is emulated with POSIX locks, and an exclusive one needs a file opened for writing
    (flock(2)): another user's .lock, opened read-only, gave EBADF, taken for a filesystem without locks,
    and the live trainer's lock file was removed, so that a second trainer ran beside it."""
    import errno
    import fcntl

    from tinylm import runlock

    run = tmp_path / "condor"
    run.mkdir()
    lock = run / ".lock"
    lock.write_text('{"pid": 4242, "host": "there", "started": "now"}\n')
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another user's trainer, alive
    real_flock = fcntl.flock

    def nfs_flock(f, op):
        if op & fcntl.LOCK_EX and fcntl.fcntl(f, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real_flock(f, op)

    try:
        with monkeypatch.context() as m:
            another_users_lock(m, lock)
            m.setattr(runlock.fcntl, "flock", nfs_flock)
            with pytest.raises(TrainingError, match=r"in use by another trainer \(pid 4242 on there"):
                RunLock(run).__enter__()
    finally:
        os.close(fd)
    assert lock.exists()


def test_a_run_folder_on_a_read_only_filesystem_is_named(tmp_path, monkeypatch):
    """A results_dir on a filesystem mounted read-only (or remounted so after disk errors) ended the
    trainer in an OSError traceback from its lock (EROFS), though it is the user's to fix, not a bug. The
    lock lets the error through, naming the file, and the trainer's run_script words it as every job's
    (cli.refused_by_the_system): the file and what to do, without a traceback."""
    import errno
    from pathlib import Path

    from tinylm.cli import refused_by_the_system

    run = tmp_path / "condor"
    run.mkdir()
    real_open = os.open

    def open_(p, flags, *args, **kwargs):
        if os.fspath(p) == os.fspath(run / ".lock"):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(p))
        return real_open(p, flags, *args, **kwargs)

    what_to_do = "a folder this job writes to cannot be written: make it writable (or give results_dir a writable place)"
    monkeypatch.setattr(os, "open", open_)
    with pytest.raises(OSError) as e:
        RunLock(run).__enter__()
    assert refused_by_the_system(e.value) == f"{run / '.lock'}: Read-only file system; {what_to_do}, then run again"

    def mkdir(self, *args, **kwargs):  # a run folder not there yet
        raise OSError(errno.EROFS, "Read-only file system", os.fspath(self))

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(OSError) as e:
        RunLock(tmp_path / "new").__enter__()
    assert refused_by_the_system(e.value) == f"{tmp_path / 'new'}: Read-only file system; {what_to_do}, then run again"
