"""One training loop for every model variant: a run around the step of tinylm.step.

A run loads the packed splits, builds the model (or resumes it), steps, evaluates before the first
step and every `eval_every` steps on a fixed prefix of the validation split (on CUDA the plain model replayed from a CUDA graph,
or the compiled one with train.compile_eval), keeps the best weights, stops early if asked to, and
writes its records (tinylm.runlog). Under torchrun each process takes a slice of every batch (data
parallel); only the first writes files.

Resume: `checkpoints/last.pt` holds model, optimizer, step, the best weights so far, the early
stopping state and the log history. It is written every `save_every` steps (by a background thread,
while training goes on) and when a stop signal (SIGTERM, SIGUSR1, SIGINT, SIGHUP) arrives, and removed when
training finishes. A run that finds it continues from it if the model, tokenizer, math-relevant
train settings, evaluation batch and packed data (its sha256 and row length) match, and refuses otherwise.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import schema
from .checkpoint import check_resumable, load_checkpoint
from .config import PROGRESS_SEC, TrainConfig, progress_interval
from .data.pack import check_token_ids, made_from_record, open_packed, recorded_sha256
from .devices import describe_device, precision_on, resolve_device, software_versions
from .distributed import (
    DistInfo,
    broadcast_flag,
    init_distributed,
    main_value,
    shutdown_distributed,
)
from .errors import ConfigError, TrainingError
from .evaluate import GraphedLoss, evaluate_loss
from .io import sha256_file
from .lifeline import Lifeline
from .model import GPT, GPTConfig
from .runlock import RunLock
from .runlog import EXIT_PREEMPTED, RunFiles, RunPaths, StopFlag, attempt_log
from .step import RowSampler, Stepper, load_optimizer_state, lr_at, make_optimizer

log = logging.getLogger("tinylm.train")

def train(
    *,
    model_config: dict,
    train_config: dict,
    train_bin: str | os.PathLike,
    val_bin: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    run_dir: str | os.PathLike,
    best_path: str | os.PathLike | None = None,
    history_path: str | os.PathLike | None = None,
    config_path: str | os.PathLike | None = None,
    run_name: str | None = None,
    eval_batch_size: int = schema.defaults("eval")["batch_size"],
    progress_every_sec: float | None = None,
) -> dict:
    """Train one model; returns the summary.

    `model_config` is the flat GPTConfig dict (vocab_size included); `train_config` the resolved train
    section. Writes the best checkpoint to `best_path`, metrics.jsonl to `history_path` and the resolved
    settings to `config_path` (those not given: see RunPaths.in_run_dir); run_dir holds the resumable
    checkpoints/last.pt, W&B's files and logs/attempt-<N>.log. One trainer at a time per run_dir
    (tinylm.runlock); under Snakemake it stops when its job is gone (tinylm.lifeline). A progress line
    goes to the log every `progress_every_sec` seconds (None: progress_interval(); 0: none).
    """
    cfg = TrainConfig.from_dict(dict(train_config))
    every_sec = progress_interval() if progress_every_sec is None else progress_every_sec
    mcfg = GPTConfig.from_dict(dict(model_config))
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    dist_info = init_distributed(device.type)
    try:
        if dist_info.enabled and device.type == "cuda":
            device = torch.device("cuda", dist_info.local_rank)
        if cfg.batch_size % dist_info.world_size:
            raise ConfigError(f"train.batch_size = {cfg.batch_size} must be divisible by the number of processes "
                              f"({dist_info.world_size}, from train.gpus)")
        paths = RunPaths.in_run_dir(run_dir, best=best_path, history=history_path, config=config_path)
        files = RunFiles(paths, dist_info.is_main)
        with contextlib.ExitStack() as guard:
            if dist_info.is_main:  # before any file of the run is read or written
                guard.enter_context(RunLock(run_dir))
                guard.enter_context(attempt_log(run_dir / "logs"))
                drop_stale_evaluation(paths.evaluation)
                # however the run ends, its last.pt write finishes before the lock is released
                guard.callback(files.wait_for_writes, raise_error=False)
            guard.enter_context(Lifeline())
            run = Run(cfg, mcfg, files, run_name or run_dir.name, device, dist_info, eval_batch_size,
                      train_bin, val_bin, tokenizer_path, progress_every_sec=every_sec)
            return run.fit()
    finally:
        shutdown_distributed()


def drop_stale_evaluation(stale: Path) -> None:
    """Remove the run's metrics.json, `stale` (RunPaths.evaluation: rule evaluate_model's record of the best
    model trained before): this attempt replaces that model, and Snakemake deleted its best_model.pt before
    starting the job but keeps the evaluation. Left there, a stopped attempt would leave the old model's numbers beside last.pt, and a
    rerun aimed at that metrics.json (`snakemake .../metrics.json`) would find it present and up to date
    and neither resume the training nor evaluate again."""
    try:
        stale.unlink()
    except FileNotFoundError:
        return
    log.info("removed %s: the evaluation of the model this training replaces", stale)


class Run:
    """One training run: its state, the loop, evaluation and early stopping; tinylm.runlog writes."""

    def __init__(self, cfg: TrainConfig, mcfg: GPTConfig, files: RunFiles, name: str, device: torch.device,
                 dist_info: DistInfo, eval_batch_size: int, train_bin, val_bin, tokenizer_path, *,
                 progress_every_sec: float = PROGRESS_SEC):
        """Load the splits, build the model and optimizer (from last.pt if there is one), start the files."""
        self.cfg, self.mcfg, self.files, self.name = cfg, mcfg, files, name
        self.device, self.dist, self.eval_batch_size = device, dist_info, eval_batch_size
        self.ran_on = {"device": describe_device(device), "precision": precision_on(device, cfg.precision)}
        self.progress_every_sec = progress_every_sec
        # All of it travels in last.pt (as the checkpoint's "extra"), so a resumed run goes on exactly.
        self.state = {"step": 0, "best_val_loss": math.inf, "best_step": -1, "bad_evals": 0, "history": [],
                      "train_sec": 0.0, "eval_sec": 0.0, "tokens": 0}
        self.best_weights = None
        cuda = device.type == "cuda"
        self.tokenizer_path, self.tok_sha = tokenizer_path, sha256_file(tokenizer_path)
        train_np, val_np = (load_split(p, self.tok_sha, self.mcfg, tokenizer_path) for p in (train_bin, val_bin))
        self.seq_len = train_np.shape[1] - 1
        self.data = {"train": (recorded_sha256(train_bin), train_bin), "validation": (recorded_sha256(val_bin), val_bin)}
        val_rows = val_np if cfg.eval_rows is None else val_np[: cfg.eval_rows]
        self.val_rows = torch.from_numpy(np.asarray(val_rows, dtype=np.int32)).to(device) if cuda else val_rows
        torch.manual_seed(cfg.seed)
        self.model = GPT(self.mcfg).to(device)
        self.opt = make_optimizer(self.model, cfg, device)
        saved_random = None
        resumed = self.resuming()
        if resumed:
            self.best_weights, saved_random = resume(self.files.paths.last, self.model, self.opt, self.state, cfg,
                                                     self.tok_sha, eval_batch_size, (self.seq_len, train_bin),
                                                     self.data)
        tokens = torch.from_numpy(np.asarray(train_np, dtype=np.int32)).to(device) if cuda else train_np
        self.stepper = Stepper(self.model, self.opt, cfg, device, self.dist, tokens, first_step=self.state["step"])
        self.restore_random_state(saved_random)
        # The periodic evaluation: compiled with train.compile_eval; else, where the step is compiled and
        # graphed (CUDA, train.compile), the plain model replayed from a CUDA graph; else the plain model.
        self.eval_model = (self.stepper.compiled if cfg.compile_eval
                           else GraphedLoss(self.model) if cuda and cfg.compile else self.model)
        self.sampler = RowSampler(train_np.shape[0], cfg.batch_size, cfg.seed)
        step = self.state["step"]
        self.tokens_per_step, self.log_since = cfg.batch_size * self.seq_len, step
        if pending := self.state.pop("pending_stats", None):
            self.stepper.stats.restore(pending["acc"], pending["load"])
            self.log_since = pending["since"]  # a resumed run's first train line covers the whole window
        threads, setups = self.thread_counts(), self.setups()
        if self.dist.is_main:  # the only process that writes records (software_versions runs git)
            resolved = {"run": self.name, "model_config": self.mcfg.to_dict(), "train_config": cfg.to_dict(),
                        "train_bin": str(train_bin), "val_bin": str(val_bin), "tokenizer_path": str(tokenizer_path),
                        "tokenizer_sha256": self.tok_sha,
                        "made_from": [*made_from_record(train_bin), *made_from_record(val_bin)],
                        **self.ran_on, "world_size": self.dist.world_size,
                        # CPU arithmetic differs with the thread count (snakemake --cores scales the rule's threads)
                        "cpu_threads": torch.get_num_threads(), "software": software_versions(),
                        "n_params": self.model.num_params()}
            if len(threads) > 1:  # resumed at another count: every count its steps computed with
                resolved["cpu_threads_all"] = threads
            if len(setups) > 1:  # resumed on another device, precision, compile or processes: each attempt's
                resolved["ran_on_all"] = setups
            self.files.start(self.state["history"], resolved, cfg.wandb, self.name, resumed=resumed)
        if step > 0:
            self.files.record({"kind": "resume", "step": step})
        if self.dist.is_main:
            log.info("%s: %s parameters (%s), %s %s, %d train rows x %d tokens, batch %d, %d steps", self.name,
                     f"{self.model.num_params():,}", self.mcfg.ffn, *self.ran_on.values(), len(train_np), self.seq_len,
                     cfg.batch_size, cfg.max_steps)

    def thread_counts(self) -> list[int]:
        """The CPU thread counts this run's steps computed with, this attempt's included (kept in last.pt).
        On the CPU the arithmetic differs with the count, so a run resumed at another one (a rerun at
        another `snakemake --cores`) matches no uninterrupted run: it is warned of, and recorded."""
        now = torch.get_num_threads()
        before = self.state.get("cpu_threads_all")  # none: a new run, or a last.pt from before this record
        if before and set(before) != {now} and self.device.type == "cpu" and self.dist.is_main:
            log.warning("%s: resumed on %d CPU thread%s, but its steps so far computed with %s: CPU arithmetic "
                        "differs with the thread count, so this run will match no uninterrupted run (config.json "
                        "records every count); rerun with the cores it had (snakemake --cores) to resume it "
                        "exactly", self.name, now, "" if now == 1 else "s", " and ".join(map(str, before)))
        self.state["cpu_threads_all"] = sorted({*(before or []), now})
        return self.state["cpu_threads_all"]

    def setups(self) -> list[dict]:
        """How this run's attempts ran, this one's included (kept in last.pt): device, precision as run,
        whether the step was compiled (never on the CPU) and processes, once per change, in attempt
        order. train.device, train.compile and train.gpus may change between attempts (README,
        "Interrupting and resuming"), and the arithmetic changes with them: a run that mixed them is
        recorded as such, and the summary flags it (tinylm.report)."""
        now = {**self.ran_on, "compile": self.stepper.compiled is not self.model, "world_size": self.dist.world_size}
        before = self.state.get("ran_on_all") or []  # none: a new run, or a last.pt from before this record
        self.state["ran_on_all"] = before if before[-1:] == [now] else [*before, now]
        return self.state["ran_on_all"]

    def fit(self) -> dict:
        """The loop: step, and on the steps where something is due, do it; returns the summary."""
        cfg, local_b = self.cfg, self.stepper.local_b
        rank_rows = slice(self.dist.rank * local_b, (self.dist.rank + 1) * local_b)
        step, stop_reason = self.state["step"], None
        with StopFlag() as stop:
            if step == 0:
                self.evaluate_untrained(stop)
            self.progress = Progress(self.state, cfg, self.tokens_per_step, step, self.log_since, name=self.name,
                                     every_sec=self.progress_every_sec)
            for s, rows in self.sampler.batches(step, cfg.max_steps, rank_rows, self.device):
                self.stepper.step(s, rows)
                step = s + 1
                self.state["tokens"] += self.tokens_per_step
                if self.wants_sync(step, stop):
                    stop_reason = self.after_steps(step, stop)
                    if stop_reason:
                        log.info("%s: stopping at step %d: %s", self.name, step, stop_reason)
                        break
            # Still under the flag: a stop signal now would only lose the finished run's results.
            return self.finish(step, stop_reason)

    def evaluate_untrained(self, stop: StopFlag) -> None:
        """Step 0: the untrained model's loss starts the validation curve, and its weights are the best so
        far until an evaluation improves on them, so a run that diverges before its first periodic
        evaluation (an lr sweep's highest rates) is recorded as diverged, not failed. A stop signal
        during it (with train.compile_eval it compiles) leaves nothing to save: the job exits as
        preempted and its next attempt starts over."""
        self.evaluate(0)
        if broadcast_flag(stop.signal is not None, self.dist, self.device):
            log.warning("received %s during the evaluation before step 1: nothing to save yet; run again to "
                        "start over", stop.signal or "a stop signal on another rank")
            self.files.close(finished=False)
            raise SystemExit(EXIT_PREEMPTED)

    def due(self, step: int, every: int) -> bool:
        return step % every == 0 or step == self.cfg.max_steps

    def wants_sync(self, step: int, stop: StopFlag) -> bool:
        """Whether to wait for the device after `step` and do what is due (steps otherwise run ahead)."""
        cfg = self.cfg
        if self.due(step, cfg.log_every) or self.due(step, cfg.eval_every) or self.due(step, cfg.save_every):
            return True
        # Processes of one run must synchronize on the same steps (what follows holds collectives), so
        # only a single process also reacts to the clock and to signals at once.
        return not self.dist.enabled and (self.progress.line_due() or stop.signal is not None)

    def after_steps(self, step: int, stop: StopFlag) -> str | None:
        """Check the loss, log, evaluate, checkpoint, obey a stop signal; return why to stop early, if so."""
        cfg, st = self.cfg, self.state
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        tokens_per_sec = self.progress.lap(step)
        if (bad := self.stepper.stats.first_bad_step(self.dist)) >= 0:
            return self.diverged(bad + 1)
        if self.due(step, cfg.log_every):
            self.log_train(step, tokens_per_sec)
        if self.dist.is_main and self.progress.line_due(final=step == cfg.max_steps):
            # One process: the loss so far in the open window. Several: only what the ranks averaged.
            running = None if self.dist.enabled else self.stepper.stats.sums[0].item()
            self.progress.print_line(step, tokens_per_sec, running_loss_sum=running)
        st["step"] = step
        stop_reason = None
        if self.due(step, cfg.eval_every):
            self.evaluate(step)
            if cfg.patience and st["bad_evals"] >= cfg.patience and step >= cfg.min_step:
                by = f" of more than min_delta = {cfg.min_delta:g}" if cfg.min_delta else ""
                stop_reason = f"early stopping: no improvement{by} in {cfg.patience} evaluations"
                if not self.due(step, cfg.log_every):  # the run's last window, as at max_steps
                    self.log_train(step, tokens_per_sec)
        if stop_reason is not None or step == cfg.max_steps:  # the run is over: a stop signal changes nothing
            return stop_reason
        if step % cfg.save_every == 0 and step < cfg.max_steps:
            self.save_last(step)
        if broadcast_flag(stop.signal is not None, self.dist, self.device):
            # recorded first, so last.pt's history holds it too: a resumed run rewrites metrics.jsonl from it
            self.files.record({"kind": "stopped", "step": step, "signal": stop.signal or "peer"})
            self.save_last(step, wait=True)
            log.warning("received %s at step %d: saved %s; run again to resume",
                        stop.signal or "a stop signal on another rank", step, self.files.paths.last)
            self.files.close(finished=False)
            raise SystemExit(EXIT_PREEMPTED)
        self.progress.restart(step)
        return stop_reason

    def log_train(self, step: int, tokens_per_sec: float) -> None:
        """The train line of the steps since the last one (every rank reads the averaged sums)."""
        sums, load = self.stepper.read_stats()
        moe = self.mcfg.ffn == "moe"
        self.files.record(self.progress.train_line(step, sums, load, lr_at(step - 1, self.cfg), tokens_per_sec, moe))

    def diverged(self, bad_step: int) -> str:
        """A non-finite training loss at `bad_step`: the run ends there, keeping its best weights so far (at
        worst the untrained ones, evaluated before step 1), and is recorded as diverged (the summary shows
        it so and leaves it out of every mean). A last.pt from before that evaluation may have none: then
        there is nothing to keep, and the run fails."""
        self.files.record({"kind": "diverged", "step": bad_step})
        hint = ("lower train.lr, or use train.precision bf16 or fp32 (fp16 overflows more easily)"
                if self.ran_on["precision"] == "fp16" else "lower train.lr, or raise train.warmup_steps")
        if self.best_weights is None:
            last = self.files.paths.last
            kept = f"; the last checkpoint before it is {last}" if last.exists() else ""
            raise TrainingError(f"{self.name}: non-finite training loss at step {bad_step}, before any evaluation, so "
                                f"there is no best model to keep{kept} ({hint}; train.eval_every = "
                                f"{self.cfg.eval_every})")
        log.warning("%s: non-finite training loss at step %d; keeping the best model so far (step %d) and "
                    "recording the run as diverged (%s)", self.name, bad_step, self.state["best_step"], hint)
        return f"diverged at step {bad_step}"

    def evaluate(self, step: int) -> None:
        """Validation loss (`self.eval_model`); keep the weights if it improved."""
        st, cfg = self.state, self.cfg
        t0 = time.perf_counter()
        # Not compiled by default: on an empty compile cache, compiling the evaluation costs more than it
        # saves in the default 41 evaluations; replaying the plain model's kernels from a CUDA graph
        # costs nothing to set up and runs at the compiled pace (docs/performance.md).
        res = evaluate_loss(self.eval_model, self.val_rows, batch_size=self.eval_batch_size,
                            device=self.device, precision=cfg.precision, dist_info=self.dist)
        sec = time.perf_counter() - t0
        st["eval_sec"] += sec
        # The best weights are those of the lowest loss. min_delta only decides what early stopping counts
        # as progress: a loss below the last one that counted by more than min_delta (Keras's EarlyStopping).
        # A last.pt from before patience_ref counted from its best loss, which was that loss.
        patience_ref = st.get("patience_ref", st["best_val_loss"])
        improved = res["loss"] < st["best_val_loss"]
        if improved:
            st.update(best_val_loss=res["loss"], best_step=step)
            self.keep_best_weights()
        if res["loss"] < patience_ref - cfg.min_delta:
            st.update(patience_ref=res["loss"], bad_evals=0)
        else:
            st["bad_evals"] += 1
        self.files.record({"kind": "eval", "step": step, "val_loss": res["loss"],
                           "val_ppl": math.exp(min(res["loss"], 50)), "best_val_loss": st["best_val_loss"],
                           "improved": improved, "sec": sec, "elapsed_sec": st["train_sec"] + st["eval_sec"]})
        if self.dist.is_main:
            log.info("%s: step %d: val loss %.4f%s", self.name, step, res["loss"], " (best)" if improved else "")

    def keep_best_weights(self) -> None:
        """Copy the weights into a copy kept on the model's device: no host sync, no disk write while
        training runs. They reach the disk in last.pt (save_every, a stop signal) and as best_model.pt."""
        now = {k: v.detach() for k, v in self.model.state_dict().items()}
        if self.best_weights is None:  # else the same keys: this model's, or from its last.pt
            self.best_weights = {k: v.clone() for k, v in now.items()}
        else:
            torch._foreach_copy_([self.best_weights[k] for k in now], list(now.values()))

    def checkpoint(self, step: int, *, weights=None, resumable: bool = False) -> dict:
        """This run at `step` as a checkpoint: `weights` (default: the model's now), and if `resumable`
        the optimizer and the best weights too."""
        weights = self.share_tied(host_copy(self.model.state_dict() if weights is None else weights))
        best = self.share_tied(host_copy(self.best_weights)) if resumable and self.best_weights else None
        return {"model_config": self.mcfg.to_dict(), "model": weights, "tokenizer_sha256": self.tok_sha,
                "tokenizer_path": str(self.tokenizer_path), "seq_len": self.seq_len, "step": step,
                "data_sha256": {split: sha for split, (sha, _) in self.data.items()},
                "train_config": self.cfg.math_dict(moe=self.mcfg.ffn == "moe"),
                "eval_batch_size": self.eval_batch_size,  # its evaluations pick the best weights; a resume checks it
                "optimizer": host_copy(self.opt.state_dict()) if resumable else None,
                "best_model": best,
                "rng": self.random_state() if resumable else None,
                "extra": jsonable(self.state)}

    def share_tied(self, weights: dict) -> dict:
        """Point every name of a tied parameter (lm_head.weight is tok_emb.weight) at one host tensor,
        so that torch.save writes it once; load_state_dict still finds every name."""
        first: dict[int, str] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if id(p) not in first:
                first[id(p)] = name
            elif name in weights and first[id(p)] in weights:
                weights[name] = weights[first[id(p)]]
        return weights

    def random_state(self) -> dict:
        """What a resumed run must go on drawing from: the generators dropout uses, and the fp16
        gradient scaler's scale (a fresh one would skip steps the uninterrupted run took)."""
        out = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            out["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.stepper.scaler is not None:
            out["scaler"] = self.stepper.scaler.state_dict()
        return out

    def resuming(self) -> bool:
        """Whether this run goes on from its last.pt. Each process opens last.pt itself, so all must see
        one run directory: processes on nodes with disks of their own that decided alone trained from
        different weights and steps, then waited in collectives the others never joined."""
        last = self.files.paths.last
        there = last.exists()
        if self.differs_from_main(int(there)) is not None:
            self.refuse_other_directories(f"{'finds' if there else 'does not find'} {last}, and another rank "
                                          f"{'does not' if there else 'does'}")
        # the same file: every rank then resumes alike, or refuses it alike (check_resumable)
        if there and self.dist.enabled and self.differs_from_main(int(sha256_file(last)[:12], 16)) is not None:
            self.refuse_other_directories(f"finds a {last} other than another rank's")
        return there

    def differs_from_main(self, value: int) -> int | None:
        """Rank 0's `value` (below 2**53) if any rank's differs, else None; the same answer on every
        rank, so that all stop together."""
        if not self.dist.enabled:
            return None
        main = int(main_value(value, self.dist, self.device))
        return main if broadcast_flag(main != value, self.dist, self.device) else None

    def refuse_other_directories(self, seen: str) -> None:
        last = self.files.paths.last
        raise TrainingError(f"the processes of this run do not all see one run directory (rank {self.dist.rank} on "
                            f"{socket.gethostname()} {seen}). Each process reads the run's "
                            f"last.pt itself: put the run directory on a filesystem every node shares "
                            f"(docs/cluster.md). Nothing was trained" + (f"; {last} is kept" if last.exists() else ""))

    def restore_random_state(self, saved: dict | None) -> None:
        """Set what `random_state` saved (a last.pt from before it was saved has none: nothing to set)."""
        if not saved:
            return
        torch.set_rng_state(saved["cpu"].cpu())
        if "cuda" in saved and self.device.type == "cuda":
            torch.cuda.set_rng_state(saved["cuda"].cpu(), self.device)
        if "scaler" in saved and self.stepper.scaler is not None:
            self.stepper.scaler.load_state_dict(saved["scaler"])

    def save_last(self, step: int, *, wait: bool = False) -> None:
        """Resumable checkpoint, written in the background unless `wait`; every rank calls it (the
        pending log window is averaged across ranks)."""
        sums, load = self.stepper.stats.averaged(self.dist)
        # The log line after a resume then averages the same steps as an uninterrupted run's.
        self.state["pending_stats"] = {"acc": sums.tolist(), "load": load.tolist(), "since": self.progress.log_mark}
        if self.dist.is_main:
            self.files.save_last(self.checkpoint(step, resumable=True), wait=wait)

    def finish(self, step: int, stop_reason: str | None) -> dict:
        st = self.state
        summary = {"final_step": step, "best_step": st["best_step"], "best_val_loss": st["best_val_loss"],
                   "train_tokens_per_sec": st["tokens"] / max(st["train_sec"], 1e-9),
                   "train_wall_sec": st["train_sec"] + st["eval_sec"], "train_sec": st["train_sec"],
                   "eval_sec": st["eval_sec"], "tokens": st["tokens"], "stop_reason": stop_reason or "max_steps",
                   **self.ran_on}
        if len(st["ran_on_all"]) > 1:
            summary["ran_on_all"] = st["ran_on_all"]
        if self.dist.is_main:
            if self.best_weights is None:
                raise TrainingError(f"{self.name}: no evaluation ran, so there is no best model; "
                                    f"lower train.eval_every")
            st["summary"] = summary
            self.files.save_best(self.checkpoint(st["best_step"], weights=self.best_weights))
            self.files.record({"kind": "done", **summary})
            self.files.close(finished=True)
            log.info("%s: done: %d steps, best val loss %.4f at step %d, %s tok/s, %.1f s", self.name, step,
                     st["best_val_loss"], st["best_step"], f"{summary['train_tokens_per_sec']:,.0f}",
                     summary["train_wall_sec"])
        return summary


class Progress:
    """Training time, throughput, the train lines of metrics.jsonl and the progress lines: what the
    loop measures each time it waits for the device.

    A progress line names the run and the steps its loss averages: the window of the last train line,
    or the steps since (one process), never a loss before there is one. Lines come every `every_sec`
    seconds (and at the last step); 0 turns them off.
    """

    def __init__(self, state: dict, cfg: TrainConfig, tokens_per_step: int, step: int, log_mark: int, *,
                 name: str, every_sec: float = PROGRESS_SEC, clock=time.perf_counter):
        self.state, self.cfg, self.tokens_per_step = state, cfg, tokens_per_step
        self.name, self.every_sec, self.clock = name, every_sec, clock
        self.step_mark, self.log_mark = step, log_mark  # where the next throughput figure and train line start
        self.t_mark = self.last_print = self.now = clock()
        self.logged: tuple[int, int, float] | None = None  # the last train line: first step, last step, loss

    def line_due(self, *, final: bool = False) -> bool:
        return self.every_sec > 0 and (final or self.clock() - self.last_print >= self.every_sec)

    def lap(self, step: int) -> float:
        """Count the time since the last restart as training time; return tokens/s over it."""
        self.now = self.clock()
        self.state["train_sec"] += self.now - self.t_mark
        return (step - self.step_mark) * self.tokens_per_step / max(self.now - self.t_mark, 1e-9)

    def restart(self, step: int) -> None:
        self.t_mark, self.step_mark = self.clock(), step

    def train_line(self, step: int, sums, load, lr: float, tokens_per_sec: float, moe: bool) -> dict:
        """The train line of metrics.jsonl from the sums over the steps since the last one."""
        st, n = self.state, max(step - self.log_mark, 1)
        mean = (sums / n).tolist()
        self.logged, self.log_mark = (self.log_mark + 1, step, mean[0]), step
        row = {"kind": "train", "step": step, "loss": mean[0], "ce_loss": mean[1], "lr": lr,
               "tokens_per_sec": tokens_per_sec, "elapsed_sec": st["train_sec"] + st["eval_sec"], "tokens": st["tokens"]}
        if moe:
            row.update(balance_loss=mean[2], z_loss=mean[3], dropped_frac=mean[4], expert_load=(load / n).tolist())
        return row

    def print_line(self, step: int, tokens_per_sec: float, *, running_loss_sum: float | None) -> None:
        """Log `name: step S/MAX  loss L (steps A-B)  tok/s  elapsed  ~left`; `running_loss_sum` is the
        loss summed over the steps since the last train line, if known."""
        if step > self.log_mark and running_loss_sum is not None:
            window = (self.log_mark + 1, step, running_loss_sum / (step - self.log_mark))
        else:
            window = self.logged
        if window is None:
            loss = "loss -"
        else:
            first, last, mean = window
            loss = f"loss {mean:.4f} ({f'step {last}' if first == last else f'steps {first}-{last}'})"
        done, max_steps = self.state["train_sec"] + self.state["eval_sec"], self.cfg.max_steps
        log.info("%s: step %d/%d  %s  %s tok/s  %s elapsed  ~%s left", self.name, step, max_steps, loss,
                 f"{tokens_per_sec:,.0f}", fmt_sec(done), fmt_sec((max_steps - step) * done / max(step, 1)))
        self.last_print = self.now


def resume(path: Path, model, optimizer, state: dict, cfg: TrainConfig, tokenizer_sha256: str, eval_batch_size: int,
           seq_len: tuple[int, str | os.PathLike] | None = None, data: dict | None = None
           ) -> tuple[dict | None, dict | None]:
    """Load last.pt into the model, the optimizer and the run's `state`; return the best weights so far
    and the random state (Run.random_state) to go on from.

    Refuses a checkpoint made for another model, tokenizer, math-relevant train setting, evaluation
    batch, row length (`seq_len`: the training rows' length and their file) or packed data (`data`:
    split -> its recorded sha256 and file; checkpoint.check_resumable)."""
    ck = load_checkpoint(path, map_location=next(model.parameters()).device)
    check_resumable(ck, path, model.config, cfg, tokenizer_sha256, eval_batch_size, seq_len, data)
    model.load_state_dict(ck["model"])
    load_optimizer_state(optimizer, ck["optimizer"], model)
    state.update(ck["extra"])
    best = (f"best val loss {state['best_val_loss']:.4f} at step {state['best_step']}" if state["best_step"] >= 0
            else "no evaluation yet")
    log.info("resumed from %s at step %d (%s)", path, state["step"], best)
    return ck.get("best_model"), ck.get("rng")


def load_split(path: str | os.PathLike, tokenizer_sha256: str, mcfg: GPTConfig,
               tokenizer_path: str | os.PathLike | None = None) -> np.ndarray:
    """The packed rows of one split, checked against the tokenizer (of sha256 `tokenizer_sha256`, at
    `tokenizer_path`: the messages name it) and the model's context and vocabulary."""
    rows = open_packed(path, tokenizer_sha256=tokenizer_sha256, tokenizer_path=tokenizer_path)
    check_token_ids(rows, mcfg.vocab_size, path)
    if rows.shape[1] - 1 > mcfg.max_seq_len:
        raise ConfigError(f"packing.seq_len = {rows.shape[1] - 1} (from {path}) is above the model's "
                          f"max_seq_len = {mcfg.max_seq_len}; lower packing.seq_len or raise max_seq_len")
    return rows


def host_copy(obj: Any) -> Any:
    """`obj` (an optimizer's state dict: dicts, lists, tensors, numbers) with every tensor copied to
    the host, so a background write never reads state the next steps change in place."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj


def jsonable(obj: Any) -> Any:
    """Round-trip through JSON so the checkpoint holds only plain types (weights_only=True loads them)."""
    return json.loads(json.dumps(obj, default=float, allow_nan=True))


def fmt_sec(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
