"""A training run's files and signals: where it writes, metrics.jsonl and its W&B mirror, checkpoints
written in the background, the log of each attempt, and the stop signals that end a run resumably."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import schema
from .checkpoint import save_checkpoint, weights_sha256
from .errors import CheckpointError, TinyLMError
from .io import atomic_open, no_room_is_named, remove_stale_temps, sha256_file, write_json

log = logging.getLogger("tinylm.train")

# SIGHUP: a lost terminal (an SSH session without tmux) signals Snakemake and its jobs alike. A trainer
# started under nohup ignores it, and keeps ignoring it.
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT", "SIGHUP")
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again", the retry resumes


@dataclass(frozen=True)
class RunPaths:
    """Where a run writes: the best checkpoint, metrics.jsonl and config.json, and a folder for the
    rest (the resumable checkpoints/last.pt, W&B's files)."""

    best: Path
    history: Path
    config: Path
    run_dir: Path

    @property
    def last(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    @property
    def evaluation(self) -> Path:
        """metrics.json, where rule evaluate_model writes its evaluation of the best checkpoint."""
        return self.run_dir / "metrics.json"

    @classmethod
    def in_run_dir(cls, run_dir: str | os.PathLike, *, best: str | os.PathLike | None = None,
                   history: str | os.PathLike | None = None, config: str | os.PathLike | None = None) -> RunPaths:
        """The paths given; any not given where rule train_model puts it, in run_dir."""
        run_dir = Path(run_dir)
        return cls(best=Path(best or run_dir / "checkpoints" / "best_model.pt"),
                   history=Path(history or run_dir / "metrics.jsonl"), config=Path(config or run_dir / "config.json"),
                   run_dir=run_dir)


class RunFiles:
    """Everything a run writes, from the main process only (elsewhere each method does nothing).

    metrics.jsonl holds one JSON object per line (kinds train, eval, resume, stopped, diverged, done). `history`
    holds every line so far and travels in the resumable checkpoint: a resumed run starts the file over
    from it, so the file never repeats a step. The best checkpoint is written once, when training ends
    (until then the best weights travel in last.pt).
    """

    def __init__(self, paths: RunPaths, main: bool):
        self.paths, self.main = paths, main
        self.history: list[dict] = []
        self.resolved: dict = {}
        self.wandb: WandB | None = None
        self._writer: threading.Thread | None = None
        self._write_error: BaseException | None = None

    def start(self, history: list[dict], resolved: dict, wandb_cfg: dict, name: str, *, resumed: bool) -> None:
        """Write config.json (`resolved`), start metrics.jsonl over from `history`, open W&B. `resumed`:
        the run goes on from last.pt, and so does its W&B run; else it starts from step 0, and first
        removes the W&B files of the attempt before, if any."""
        if not self.main:
            return
        self.history = history
        self.resolved = resolved
        if not resumed:
            remove_earlier_wandb(self.paths.run_dir)
        self.wandb = WandB(wandb_cfg, name, resolved, self.paths.run_dir, resumed=resumed)
        write_json(self.paths.config, resolved)
        with atomic_open(self.paths.history, "w", encoding="utf-8") as f:
            for row in history:
                f.write(json.dumps(row) + "\n")

    def record(self, row: dict) -> None:
        if not self.main:
            return
        self.history.append(row)
        with (no_room_is_named(self.paths.history, "the run resumes from its last.pt, if one was saved"),
              open(self.paths.history, "a", encoding="utf-8") as f):
            f.write(json.dumps(row) + "\n")
        self.wandb.log(row)

    def save_last(self, checkpoint: dict, *, wait: bool = False) -> None:
        """Write last.pt in a background thread while training goes on; `checkpoint` must hold host
        copies only (Run.checkpoint), never tensors the run still changes. One write at a time: this
        first waits for the one before. `wait`: return once the file is on disk (the process exits next).

        A write takes about 0.2 s for the baseline (126 MB); in the run's loop that was GPU time lost
        20 times in a 40-second run. The write is atomic (temp file, then rename): a process killed
        while writing keeps the last.pt before."""
        if not self.main:
            return
        # A stop signal's save (wait=True) is still tried after an earlier write failed.
        self.wait_for_writes(raise_error=not wait)
        if self._write_error is not None:
            log.warning("an earlier write of %s failed (%s); writing it again", self.paths.last, self._write_error)
            self._write_error = None
        self._writer = threading.Thread(target=self._write, args=(self.paths.last, checkpoint),
                                        name="tinylm-save-last")
        self._writer.start()
        if wait:
            self.wait_for_writes()

    def _write(self, path: Path, checkpoint: dict) -> None:
        try:
            save_checkpoint(path, checkpoint)
        except BaseException as e:  # raised in the run's thread by wait_for_writes
            if not isinstance(e, CheckpointError):
                e = CheckpointError(f"could not write {path}: {e}; the file there before, if any, is kept")
            self._write_error = e
            log.warning("at step %s, %s. The next save stops the run unless the run finishes first",
                        checkpoint.get("step"), e)

    def wait_for_writes(self, *, raise_error: bool = True) -> None:
        """Block until the background write of last.pt (if any) is done; raise what it raised."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if (error := self._write_error) is not None and raise_error:
            self._write_error = None
            raise error

    def save_best(self, checkpoint: dict) -> None:
        """Write best_model.pt, then record its sha256 in config.json ("files", the record convention
        of tinylm.verify): evaluation and generation check it on loading (checkpoint.check_recorded)."""
        if not self.main:
            return
        best = self.paths.best
        save_checkpoint(best, checkpoint)
        name = os.path.relpath(best, self.paths.config.parent)
        record = {"sha256": sha256_file(best), "bytes": best.stat().st_size}
        # the file's sha256 also covers the run's wall times; the weights' alone match between identical runs
        write_json(self.paths.config, {**self.resolved, "files": {name: record},
                                       "weights_sha256": weights_sha256(checkpoint["model"])})

    def close(self, *, finished: bool) -> None:
        """Wait for checkpoint writes and close W&B; once training finished, then remove last.pt (nothing
        is left to resume) and the temporary files of killed writes of it. last.pt goes last: a job
        killed while W&B uploads (seconds) fails, and Snakemake deletes its outputs; it resumes from it.
        A failed write of last.pt is raised, unless training finished: then best_model.pt and the done
        record are written, and last.pt is of no more use."""
        if not self.main:
            return
        self.wait_for_writes(raise_error=not finished)
        self._write_error = None
        self.wandb.finish()
        if finished:
            self.paths.last.unlink(missing_ok=True)
            remove_stale_temps(self.paths.last)  # of a write of it that was killed, which no later save removed


@contextlib.contextmanager
def attempt_log(log_dir: Path) -> Iterator[Path]:
    """Copy this process's log lines to log_dir/attempt-<N>.log, N one above the last attempt's.

    Snakemake deletes a job's log before it runs the job again; these stay. Lines are formatted as
    in the job log; how an attempt ended (an error, a stop) is its last line."""
    log_dir.mkdir(parents=True, exist_ok=True)
    done = [int(m[1]) for p in log_dir.iterdir() if (m := re.fullmatch(r"attempt-(\d+)\.log", p.name))]
    path = log_dir / f"attempt-{max(done, default=0) + 1}.log"
    root = logging.getLogger()
    handler = logging.FileHandler(path, mode="x", encoding="utf-8")
    handler.setFormatter(next((h.formatter for h in root.handlers if h.formatter), None)
                         or logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    log.info("this attempt's log is also kept in %s", path)
    try:
        yield path
    except BaseException as e:
        # For this file only: the job log gets the error from the script (or the traceback) already.
        if not isinstance(e, SystemExit):
            handler.handle(root.makeRecord(log.name, logging.ERROR, __file__, 0, "ended by %s: %s",
                                           (type(e).__name__, e), None if isinstance(e, TinyLMError) else
                                           (type(e), e, e.__traceback__)))
        raise
    finally:
        root.removeHandler(handler)
        handler.close()


class WandB:
    """Optional Weights & Biases mirror of metrics.jsonl (settings: train.wandb, unset keys at their
    config/schema.yaml defaults). Any failure disables it; training goes on."""

    def __init__(self, cfg: dict, run_name: str, config: dict, run_dir: Path, resumed: bool = False):
        """`resumed`: this attempt continues the run from last.pt, so it continues its W&B run too: the
        id lives in <run_dir>/wandb/run-id, written when training starts from step 0."""
        self.run = None
        cfg = {**schema.defaults("train", "wandb"), **cfg}
        if not cfg["enabled"]:
            return
        try:
            load_dotenv()
            import wandb

            id_file = Path(run_dir) / "wandb" / "run-id"
            run_id = id_file.read_text().strip() if resumed and id_file.exists() else None
            if run_id is None:
                run_id = secrets.token_hex(4)  # W&B ids: letters and digits
                id_file.parent.mkdir(parents=True, exist_ok=True)
                with atomic_open(id_file, "w") as f:
                    f.write(run_id + "\n")
            self.run = wandb.init(project=cfg["project"], entity=cfg["entity"], name=run_name, config=config,
                                  dir=str(run_dir), mode=cfg["mode"], id=run_id, resume="allow", reinit="finish_previous")
        except Exception as e:  # no key, no network, bad project: keep training
            # W&B's own words for a missing key point at `wandb login`; say where tinylm looked (never the
            # key itself). Other failures (network, project) get no key advice: a `wandb login` may hold it.
            no_key = "api key" in str(e).lower() and not os.environ.get("WANDB_API_KEY")
            hint = "" if not no_key or cfg["mode"] == "offline" else (
                f" (no WANDB_API_KEY in the environment or in {Path.cwd() / '.env'}; set it there, or use "
                "train.wandb.mode: offline)")
            log.warning("W&B disabled for this run: %s: %s%s", type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "", hint)

    def log(self, row: dict) -> None:
        """A row with a step is logged at that step; the final `done` row goes to the run's summary."""
        if self.run is None:
            return
        values = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        try:
            if "step" in row:
                self.run.log(values, step=row["step"])
            else:
                self.run.summary.update(values)
        except Exception as e:
            log.warning("W&B logging failed, disabling it: %s", e)
            self.run = None

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:
                log.warning("W&B finish failed: %s", e)


def remove_earlier_wandb(run_dir: Path) -> None:
    """Remove <run_dir>/wandb, the W&B files of an earlier attempt of a run that now starts from step 0
    (`snakemake --forceall`, a deleted last.pt): its runs were of a training that is discarded (the
    rerun rewrites metrics.jsonl), `wandb sync` of the folder would upload them beside the new one,
    and its run-id would be continued by a later resume even where W&B is off for this attempt.
    Removed, not moved aside: kept anywhere in the run folder, each rebuild would add to it. A
    failure is warned of; training goes on, as for any W&B failure."""
    folder = Path(run_dir) / "wandb"
    if not folder.is_dir():
        return
    runs = sum(1 for p in folder.glob("*run-*") if p.is_dir() and not p.is_symlink())  # not latest-run
    try:
        shutil.rmtree(folder)  # refuses a link to a folder elsewhere: not this run's to empty
    except OSError as e:
        log.warning("could not remove %s, the W&B files of this run's attempt before (%s); `wandb sync` of "
                    "it would upload that attempt's runs too", folder, e)
        return
    log.info("this run starts from step 0: removed %s, the W&B files of the attempt before (%d run%s)", folder,
             runs, "" if runs == 1 else "s")


def load_dotenv() -> None:
    """Read WANDB_API_KEY and friends from ./.env (the working directory's) if present; the environment
    wins. python-dotenv's own search would start beside this file and walk up from there."""
    try:
        from dotenv import load_dotenv as load
    except ImportError:
        return
    if (path := Path.cwd() / ".env").is_file():
        # One that cannot be read (not UTF-8: PowerShell 5's `echo ... > .env` writes UTF-16; not this
        # user's) is named, and W&B goes on: the key may be in the environment, offline mode needs none.
        try:
            load(path, override=False, encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            if isinstance(e, UnicodeDecodeError):  # its message holds no text of the file
                why = f"not UTF-8 text ({e.reason} at byte {e.start})"
            else:
                why = e.strerror or str(e)
            log.warning("could not read %s: %s; W&B goes on without it (save it as UTF-8 text this user "
                        "may read, or set its variables in the environment)", path, why)


class StopFlag:
    """Turns SIGTERM/SIGUSR1/SIGINT/SIGHUP into a flag the loop checks between steps (SIGHUP only
    where it is not ignored: nohup)."""

    def __init__(self):
        self.signal: str | None = None
        self._old = {}

    def __enter__(self):
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None and not (name == "SIGHUP" and signal.getsignal(sig) is signal.SIG_IGN):
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not in the main thread
                    pass
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
