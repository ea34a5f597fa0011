"""One training loop for every model variant.

AdamW, linear warm-up then cosine decay, gradient clipping, periodic validation on a fixed prefix of
the validation split, best/periodic checkpoints, early stopping, resume, preemption signals, and
data parallelism across torchrun processes.

Speed (see docs/performance.md): on CUDA the split's tokens live on the GPU, batches are gathered
there, and the whole step (forward, backward, clipping, AdamW) is torch.compile'd and captured in
one CUDA graph; the host only reads values back when it logs or evaluates. Periodic evaluation runs
the same compiled model (an inference graph per evaluation shape). On the CPU the same step runs
eagerly, which is what the tests exercise. Both paths compute the same math on the same batches.

Resume: `checkpoints/last.pt` holds model, optimizer, step, the best weights so far, the early
stopping state and the log history. It is written every `save_every` steps and when a stop signal
(SIGTERM, SIGUSR1, SIGINT) arrives, and removed when training finishes. A run that finds it continues
from it if the model, tokenizer and math-relevant train settings match, and refuses otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import check_compatible, load_checkpoint, save_checkpoint
from .devices import allow_tf32, resolve_device
from .distributed import (
    DistInfo,
    all_reduce_mean_,
    broadcast_flag,
    init_distributed,
    shutdown_distributed,
)
from .errors import ConfigError, TrainingError
from .evaluate import evaluate_loss
from .io import atomic_open, sha256_file, write_json
from .model import GPT, GPTConfig

log = logging.getLogger("tinylm.train")

# Settings that do not change the math of a run: a resume may differ in these.
_RESUME_FREE_KEYS = ("device", "compile", "gpus", "max_gpus", "log_every", "save_every", "wandb")
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again", the retry resumes


@dataclass
class TrainConfig:
    """Mirrors `$defs/train` in config/schema.yaml (which holds the defaults and descriptions)."""

    device: str = "auto"
    precision: str = "bf16"
    compile: bool = True
    batch_size: int = 64
    max_steps: int = 20000
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 200
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_rows: int | None = 8192
    save_every: int = 1000
    log_every: int = 50
    patience: int = 0
    min_delta: float = 0.0
    min_step: int = 0
    seed: int = 42
    gpus: int = 1
    max_gpus: int = 8
    wandb: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"train: unknown key(s) {unknown}; allowed: {sorted(names)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        checks = [
            (self.device in ("auto", "cuda", "cpu"), "device", "auto, cuda or cpu"),
            (self.precision in ("bf16", "fp16", "fp32"), "precision", "bf16, fp16 or fp32"),
            (self.batch_size >= 1, "batch_size", ">= 1"),
            (self.max_steps >= 1, "max_steps", ">= 1"),
            (self.lr > 0 and self.min_lr >= 0, "lr", "lr > 0 and min_lr >= 0"),
            (self.gpus >= 1, "gpus", ">= 1"),
            (self.gpus <= self.max_gpus, "gpus", f"<= train.max_gpus ({self.max_gpus})"),
            (self.eval_every >= 1 and self.save_every >= 1 and self.log_every >= 1, "eval_every/save_every/log_every", ">= 1"),
        ]
        for ok, key, want in checks:
            if not ok:
                raise ConfigError(f"train.{key} = {getattr(self, key.split('/')[0], None)!r} is invalid: must be {want}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def math_dict(self) -> dict:
        """The settings a resumed run must share with the interrupted one."""
        return {k: v for k, v in self.to_dict().items() if k not in _RESUME_FREE_KEYS}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


class RowSampler:
    """The order rows are read in: a fresh permutation of all rows per epoch, seeded by (seed, epoch).

    Step s reads global positions [s*B, (s+1)*B) of that endless stream, so the batch of any step is a
    pure function of (seed, step): a resumed run reads exactly what an uninterrupted one would, and
    rank r of W reads the r-th slice of each global batch.
    """

    def __init__(self, n_rows: int, batch_size: int, seed: int):
        if n_rows < 1:
            raise TrainingError("the training split holds no rows; use more data or a smaller packing.seq_len")
        self.n, self.b, self.seed = n_rows, batch_size, seed
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k >= epoch - 1}
            self._cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._cache[epoch]

    def indices(self, first_step: int, n_steps: int) -> np.ndarray:
        """Row indices for steps [first_step, first_step + n_steps): shape (n_steps, batch_size)."""
        start, stop = first_step * self.b, (first_step + n_steps) * self.b
        out, pos = [], start
        while pos < stop:
            epoch, off = divmod(pos, self.n)
            take = min(stop - pos, self.n - off)
            out.append(self._perm(epoch)[off : off + take])
            pos += take
        return np.concatenate(out).reshape(n_steps, self.b)


class _StopFlag:
    """Turns SIGTERM/SIGUSR1/SIGINT into a flag the loop checks between steps."""

    def __init__(self):
        self.signal: str | None = None
        self._old = {}

    def __enter__(self):
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
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


class _WandB:
    """Optional Weights & Biases mirror of metrics.jsonl. Any failure disables it; training goes on."""

    def __init__(self, cfg: dict, run_name: str, config: dict, run_dir: Path):
        self.run = None
        if not cfg.get("enabled"):
            return
        try:
            _load_dotenv()
            import wandb

            self.run = wandb.init(project=cfg.get("project", "tinylm"), entity=cfg.get("entity"),
                                  name=run_name, config=config, dir=str(run_dir),
                                  mode=cfg.get("mode", "online"), reinit=True)
        except Exception as e:  # no key, no network, bad project: keep training
            log.warning("W&B disabled for this run: %s: %s", type(e).__name__, str(e).splitlines()[0] if str(e) else "")

    def log(self, row: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"},
                         step=row["step"])
        except Exception as e:
            log.warning("W&B logging failed, disabling it: %s", e)
            self.run = None

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:
                log.warning("W&B finish failed: %s", e)


def _load_dotenv() -> None:
    """Read WANDB_API_KEY and friends from ./.env if present; the environment wins."""
    try:
        from dotenv import load_dotenv
    except ImportError:
        return
    load_dotenv(override=False)


def _load_tokens(bin_path: str | os.PathLike, tokenizer_sha256: str, vocab_size: int):
    from .data.pack import check_token_ids, open_packed

    arr = open_packed(bin_path, tokenizer_sha256=tokenizer_sha256)
    check_token_ids(arr, vocab_size, bin_path)
    return arr


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW as training runs it: weight decay on matrices only; on CUDA fused and capturable with a
    tensor learning rate, so the optimizer step can live inside the step's CUDA graph."""
    cuda = device.type == "cuda"
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=torch.tensor(cfg.lr, device=device) if cuda else cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), fused=True if cuda else None, capturable=cuda)


class _Stepper:
    """Runs training steps on pre-sampled row indices; accumulates loss statistics on the device.

    `acc` holds running sums since the last read: [loss, ce_loss, balance, z, dropped] plus the expert
    load; `bad_step` holds the first step whose loss was not finite (-1 if none), so the loop can
    stop with the step number without synchronizing every step.
    """

    N_STATS = 5

    def __init__(self, model, optimizer, cfg: TrainConfig, device, dist_info: DistInfo, tokens):
        n_moe_layers = model.config.n_layers if model.config.ffn == "moe" else 0
        n_experts = model.config.n_experts
        self.model, self.opt, self.cfg, self.device, self.dist = model, optimizer, cfg, device, dist_info
        self.tokens = tokens  # torch tensor on device (CUDA) or numpy memmap (CPU)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.cuda = device.type == "cuda"
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision) if self.cuda else None
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.acc = torch.zeros(self.N_STATS, device=device)
        self.load_acc = torch.zeros(max(n_moe_layers, 1), max(n_experts, 1), device=device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.step_t = torch.zeros((), dtype=torch.long, device=device)
        self.local_b = cfg.batch_size // dist_info.world_size
        self.idx = torch.zeros(self.local_b, dtype=torch.long, device=device)
        self.cpu_idx = None
        self.compiled = model
        fast = self.cuda and cfg.compile
        use_graph = fast and not dist_info.enabled and self.scaler is None
        if fast:
            # Every model compiles the same GPT.forward, and dynamo keeps at most `recompile_limit` (8)
            # compiled versions of a function per process, then runs it uncompiled with only a log
            # warning. A run compiles two (its training step and its evaluation batch), so a process
            # training a fifth model shape (a sweep from Python) would have trained it uncompiled, 3 to 13
            # times slower (docs/performance.md). Each run starts from a clean slate, as a workflow job does.
            torch.compiler.reset()
            # Static shapes: the training batch and the (padded) evaluation batch compile one graph each.
            self.compiled = torch.compile(model, dynamic=False)
        self.graph = None
        self._want_graph = use_graph
        self._eager_steps = 0

    def _batch(self):
        if self.cuda:
            rows = self.tokens.index_select(0, self.idx).long()
        else:  # sorted reads from the memmap; the row order inside a batch does not change the mean loss
            rows = torch.from_numpy(np.asarray(self.tokens[np.sort(self.cpu_idx)], dtype=np.int64))
        return rows[:, :-1], rows[:, 1:]

    def _body(self):
        x, y = self._batch()
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None, cache_enabled=False):
            out = self.compiled(x, y)
        loss = out["loss"]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if self.dist.enabled:
            all_reduce_mean_([p.grad for p in self.params], self.dist)
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip, foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        zero = loss.new_zeros(())
        stats = torch.stack([loss.detach(), out["ce_loss"].detach(), out.get("balance_loss", zero).detach(),
                             out.get("z_loss", zero).detach(), out.get("dropped_frac", zero).detach()]).float()
        self.acc.add_(stats)
        if "expert_load" in out:
            self.load_acc.add_(out["expert_load"].detach().float())
        finite = torch.isfinite(loss.detach())
        self.bad_step.copy_(torch.where((~finite) & (self.bad_step < 0), self.step_t, self.bad_step))
        self.step_t.add_(1)

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            if torch.is_tensor(g["lr"]):
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr

    def step(self, step: int, row_idx) -> None:
        """One optimizer step on rows `row_idx` (this rank's slice of the global batch)."""
        self.set_lr(lr_at(step, self.cfg))
        if self.cuda:
            self.idx.copy_(row_idx)
        else:
            self.cpu_idx = row_idx
        if self.graph is not None:
            self.graph.replay()
            return
        self.opt.zero_grad(set_to_none=True)
        if not self._want_graph:
            self._body()
            return
        # Three eager warm-up steps (real steps on their own batches; they also trigger compilation)
        # on a side stream, as graph capture requires; then the next step is captured and replayed.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._body()
        torch.cuda.current_stream().wait_stream(side)
        self._eager_steps += 1
        if self._eager_steps == 3:
            self._capture()

    def _capture(self) -> None:
        """Record the step into a CUDA graph. Capture runs nothing: the first replay is the next step."""
        torch.cuda.synchronize()
        self.opt.zero_grad(set_to_none=True)  # gradients get static buffers in the graph's pool
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._body()
        self.graph = g
        log.info("training step captured in a CUDA graph")

    def read_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return and reset the accumulated sums (all ranks average them)."""
        acc, load = self.acc.clone(), self.load_acc.clone()
        self.acc.zero_()
        self.load_acc.zero_()
        all_reduce_mean_([acc, load], self.dist)
        return acc, load


def train(
    *,
    model_config: dict,
    train_config: dict,
    train_bin: str | os.PathLike,
    val_bin: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    run_dir: str | os.PathLike,
    run_name: str | None = None,
    eval_batch_size: int = 512,
) -> dict:
    """Train one model; writes run_dir/{config.json,metrics.jsonl,checkpoints/}. Returns the summary.

    `model_config` is the flat GPTConfig dict (vocab_size included); `train_config` the resolved train
    section. The best weights go to run_dir/checkpoints/best_model.pt.
    """
    cfg = TrainConfig.from_dict(dict(train_config))
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
        run = _Run(cfg, mcfg, run_dir, run_name or run_dir.name, device, dist_info, eval_batch_size)
        return run.fit(train_bin, val_bin, tokenizer_path)
    finally:
        shutdown_distributed()


class _Run:
    """State and side effects (files, logs, W&B) of one training run; `fit` is the loop."""

    def __init__(self, cfg, mcfg, run_dir, name, device, dist_info, eval_batch_size):
        self.cfg, self.mcfg, self.run_dir, self.name = cfg, mcfg, run_dir, name
        self.device, self.dist, self.main = device, dist_info, dist_info.is_main
        self.eval_batch_size = eval_batch_size
        self.best_path = run_dir / "checkpoints" / "best_model.pt"
        self.last_path = run_dir / "checkpoints" / "last.pt"
        self.jsonl = run_dir / "metrics.jsonl"
        self.state = {"step": 0, "best_val_loss": math.inf, "best_step": -1, "bad_evals": 0, "history": [],
                      "train_sec": 0.0, "eval_sec": 0.0, "tokens": 0}
        self.best_weights = None
        self.saver = _BackgroundSaver()

    # -- files ---------------------------------------------------------------------------------
    def record(self, row: dict) -> None:
        if self.main:
            self.state["history"].append(row)
            with open(self.jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            self.wandb.log(row)

    def ckpt(self, step: int, *, weights=None, with_optimizer: bool) -> dict:
        extra = _jsonable({k: v for k, v in self.state.items()})
        model_sd = weights if weights is not None else {k: v.detach().to("cpu", copy=True)
                                                         for k, v in self.model.state_dict().items()}
        return {"model_config": self.mcfg.to_dict(), "model": model_sd, "tokenizer_sha256": self.tok_sha,
                "tokenizer_path": str(self.tokenizer_path), "step": step, "train_config": self.cfg.math_dict(),
                "optimizer": self.opt.state_dict() if with_optimizer else None,
                "best_model": self.best_weights if with_optimizer else None, "extra": extra}

    def save_last(self, step: int) -> None:
        """Resumable checkpoint; every rank calls it (the pending log window is averaged across ranks)."""
        acc, load = self.stepper.acc.clone(), self.stepper.load_acc.clone()
        all_reduce_mean_([acc, load], self.dist)
        # The log line after a resume then averages the same steps as an uninterrupted run's.
        self.state["pending_stats"] = {"acc": acc.tolist(), "load": load.tolist(), "since": self.log_mark}
        if self.main:
            self.saver.flush()
            save_checkpoint(self.last_path, self.ckpt(step, with_optimizer=True))

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, train_bin, val_bin, tokenizer_path) -> None:
        cfg, mcfg, device = self.cfg, self.mcfg, self.device
        cuda = device.type == "cuda"
        self.tokenizer_path = tokenizer_path
        self.tok_sha = sha256_file(tokenizer_path)
        train_np = _load_tokens(train_bin, self.tok_sha, mcfg.vocab_size)
        val_np = _load_tokens(val_bin, self.tok_sha, mcfg.vocab_size)
        self.seq_len = train_np.shape[1] - 1
        if self.seq_len > mcfg.max_seq_len:
            raise ConfigError(f"packing.seq_len = {self.seq_len} (from {train_bin}) is above the model's "
                              f"max_seq_len = {mcfg.max_seq_len}; lower packing.seq_len or raise max_seq_len")
        val_rows = val_np if cfg.eval_rows is None else val_np[: cfg.eval_rows]

        torch.manual_seed(cfg.seed)
        self.model = GPT(mcfg).to(device)
        if cuda:
            allow_tf32()
        self.opt = make_optimizer(self.model, cfg, device)
        if self.last_path.exists():
            ck = load_checkpoint(self.last_path, map_location=device)
            check_compatible(ck, self.last_path, model_config=mcfg.to_dict(), tokenizer_sha256=self.tok_sha,
                             train_config=cfg.math_dict())
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["optimizer"])
            self.state.update(ck["extra"])
            self.best_weights = ck.get("best_model")
            log.info("resumed from %s at step %d (best val loss %.4f at step %d)", self.last_path,
                     self.state["step"], self.state["best_val_loss"], self.state["best_step"])

        tokens = torch.from_numpy(np.asarray(train_np, dtype=np.int32)).to(device) if cuda else train_np
        self.val_rows = torch.from_numpy(np.asarray(val_rows, dtype=np.int32)).to(device) if cuda else val_rows
        self.stepper = _Stepper(self.model, self.opt, cfg, device, self.dist, tokens)
        self.log_mark = self.state["step"]
        pending = self.state.pop("pending_stats", None)
        if pending:
            self.stepper.acc.copy_(torch.tensor(pending["acc"]))
            self.stepper.load_acc.copy_(torch.tensor(pending["load"]))
            self.log_mark = pending["since"]
        self.sampler = RowSampler(train_np.shape[0], cfg.batch_size, cfg.seed)
        self.tokens_per_step = cfg.batch_size * self.seq_len

        resolved = {"run": self.name, "model_config": mcfg.to_dict(), "train_config": cfg.to_dict(),
                    "train_bin": str(train_bin), "val_bin": str(val_bin), "tokenizer_path": str(tokenizer_path),
                    "tokenizer_sha256": self.tok_sha, "device": str(device), "world_size": self.dist.world_size,
                    "n_params": self.model.num_params()}
        self.wandb = _WandB(cfg.wandb if self.main else {}, self.name, resolved, self.run_dir)
        if self.main:
            write_json(self.run_dir / "config.json", resolved)
            _rewrite_jsonl(self.jsonl, self.state["history"])
            if self.state["step"] > 0:
                self.record({"kind": "resume", "step": self.state["step"]})
            log.info("%s: %s parameters (%s), %s, %d train rows x %d tokens, batch %d, %d steps", self.name,
                     f"{self.model.num_params():,}", mcfg.ffn, device, train_np.shape[0], self.seq_len,
                     cfg.batch_size, cfg.max_steps)

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, step: int) -> None:
        st, cfg = self.state, self.cfg
        t0 = time.perf_counter()
        res = evaluate_loss(self.stepper.compiled, self.val_rows, batch_size=self.eval_batch_size,
                            device=self.device, precision=cfg.precision, dist_info=self.dist)
        st["eval_sec"] += time.perf_counter() - t0
        improved = res["loss"] < st["best_val_loss"] - cfg.min_delta
        if improved:
            st.update(best_val_loss=res["loss"], best_step=step, bad_evals=0)
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            if self.main:  # written by a background thread: the GPU does not wait for the disk
                self.saver.submit(self.best_path, self.ckpt(step, weights=self.best_weights, with_optimizer=False))
        else:
            st["bad_evals"] += 1
        self.record({"kind": "eval", "step": step, "val_loss": res["loss"], "val_ppl": math.exp(min(res["loss"], 50)),
                     "best_val_loss": st["best_val_loss"], "improved": improved,
                     "elapsed_sec": st["train_sec"] + st["eval_sec"]})
        if self.main:
            log.info("step %d: val loss %.4f%s", step, res["loss"], " (best)" if improved else "")

    # -- the loop --------------------------------------------------------------------------------
    def fit(self, train_bin, val_bin, tokenizer_path) -> dict:
        self.setup(train_bin, val_bin, tokenizer_path)
        cfg, st, cuda = self.cfg, self.state, self.device.type == "cuda"
        r0, r1 = self.dist.rank * self.stepper.local_b, (self.dist.rank + 1) * self.stepper.local_b
        step = st["step"]
        stop_reason = None
        last_loss = math.nan
        t_mark = last_print = time.perf_counter()
        step_mark = step
        chunk, chunk_start = None, step
        with _StopFlag() as stop:
            while step < cfg.max_steps:
                if chunk is None or step - chunk_start >= len(chunk):
                    # Row indices for the next (up to) 1000 steps, uploaded once: no host copy per step.
                    chunk_start = step
                    chunk = self.sampler.indices(step, min(1000, cfg.max_steps - step))[:, r0:r1]
                    if cuda:
                        chunk = torch.from_numpy(np.ascontiguousarray(chunk)).to(self.device)
                self.stepper.step(step, chunk[step - chunk_start])
                step += 1
                st["tokens"] += self.tokens_per_step
                def at(every: int, step: int = step) -> bool:
                    return step % every == 0 or step == cfg.max_steps

                boundary = at(cfg.log_every) or at(cfg.eval_every) or at(cfg.save_every)
                # Processes of one run must enter the block below on the same steps (it holds
                # collectives), so only a single process also reacts to the clock and to signals at once.
                if not boundary and (self.dist.enabled or (time.perf_counter() - last_print < 5.0 and not stop.signal)):
                    continue
                if cuda:
                    torch.cuda.synchronize()
                now = time.perf_counter()
                st["train_sec"] += now - t_mark
                bad = int(self.stepper.bad_step.item())
                if bad >= 0:
                    self.saver.flush()
                    good = self.last_path if self.last_path.exists() else self.best_path
                    raise TrainingError(f"{self.name}: non-finite training loss at step {bad + 1}; stopped. The last "
                                        f"good checkpoint is {good} (lower train.lr or use precision bf16/fp32)")
                tps = (step - step_mark) * self.tokens_per_step / max(now - t_mark, 1e-9)
                if at(cfg.log_every):
                    acc, load = self.stepper.read_stats()
                    n = max(step - self.log_mark, 1)
                    acc = (acc / n).tolist()
                    last_loss = acc[0]
                    row = {"kind": "train", "step": step, "loss": acc[0], "ce_loss": acc[1],
                           "lr": lr_at(step - 1, cfg), "tokens_per_sec": tps,
                           "elapsed_sec": st["train_sec"] + st["eval_sec"], "tokens": st["tokens"]}
                    if self.mcfg.ffn == "moe":
                        row.update(balance_loss=acc[2], z_loss=acc[3], dropped_frac=acc[4],
                                   expert_load=(load / n).tolist())
                    self.record(row)
                    self.log_mark = step
                if self.main and (now - last_print >= 5.0 or at(cfg.log_every)):
                    done = st["train_sec"] + st["eval_sec"]
                    left = (cfg.max_steps - step) * done / max(step - st.get("resumed_at", 0), 1)
                    log.info("step %d/%d  loss %.4f  %s tok/s  %s elapsed  ~%s left", step, cfg.max_steps,
                             last_loss, f"{tps:,.0f}", _fmt_sec(done), _fmt_sec(left))
                    last_print = now
                st["step"] = step
                if at(cfg.eval_every):
                    self.evaluate(step)
                    if cfg.patience and st["bad_evals"] >= cfg.patience and step >= cfg.min_step:
                        stop_reason = f"early stopping: no improvement in {cfg.patience} evaluations"
                if step % cfg.save_every == 0 and step < cfg.max_steps and stop_reason is None:
                    self.save_last(step)
                if broadcast_flag(stop.signal is not None, self.dist, self.device):
                    self.save_last(step)
                    self.record({"kind": "stopped", "step": step, "signal": stop.signal or "peer"})
                    log.warning("received %s at step %d: saved %s; run again to resume", stop.signal or "a stop "
                                "signal on another rank", step, self.last_path)
                    self.wandb.finish()
                    raise SystemExit(EXIT_PREEMPTED)
                if stop_reason:
                    log.info("%s at step %d", stop_reason, step)
                    break
                t_mark, step_mark = time.perf_counter(), step
        return self.finish(step, stop_reason)

    def finish(self, step: int, stop_reason: str | None) -> dict:
        st = self.state
        summary = {"final_step": step, "best_step": st["best_step"], "best_val_loss": st["best_val_loss"],
                   "train_tokens_per_sec": st["tokens"] / max(st["train_sec"], 1e-9),
                   "train_wall_sec": st["train_sec"] + st["eval_sec"], "train_sec": st["train_sec"],
                   "eval_sec": st["eval_sec"], "tokens": st["tokens"], "stop_reason": stop_reason or "max_steps"}
        if self.main:
            if self.best_weights is None:
                raise TrainingError(f"{self.name}: no evaluation ran, so there is no best model; "
                                    f"lower train.eval_every")
            st["summary"] = summary
            self.saver.flush()
            save_checkpoint(self.best_path, self.ckpt(st["best_step"], weights=self.best_weights,
                                                      with_optimizer=False))
            self.record({"kind": "done", **summary})
            self.last_path.unlink(missing_ok=True)
            log.info("done: %d steps, best val loss %.4f at step %d, %s tok/s, %.1f s", step, st["best_val_loss"],
                     st["best_step"], f"{summary['train_tokens_per_sec']:,.0f}", summary["train_wall_sec"])
        self.wandb.finish()
        return summary


class _BackgroundSaver:
    """Writes checkpoints on a worker thread; a newer request replaces one not yet started."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, path, state) -> None:
        with self._lock:
            self._pending = (path, state)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                item, self._pending = self._pending, None
                if item is None:
                    self._thread = None
                    return
            try:
                save_checkpoint(*item)
            except BaseException as e:  # reported by flush() on the training thread
                self._error = e

    def flush(self) -> None:
        while True:
            with self._lock:
                t = self._thread
            if t is None:
                break
            t.join()
        if self._error is not None:
            err, self._error = self._error, None
            raise TrainingError(f"writing a checkpoint failed: {err}") from err


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON so the checkpoint holds only plain types (weights_only=True loads them)."""
    return json.loads(json.dumps(obj, default=float, allow_nan=True))


def _rewrite_jsonl(path: Path, history: list[dict]) -> None:
    """Start metrics.jsonl over from the checkpoint's history, so a resumed run repeats no step."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")


def _fmt_sec(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
