"""One training step and what decides it: the optimizer, the learning-rate schedule, the batch order.

Speed (see docs/performance.md): on CUDA the split's tokens live on the GPU, batches are gathered
there, and the whole step (forward, backward, clipping, AdamW) is torch.compile'd and captured in
one CUDA graph; the host only reads values back when it logs or evaluates. On the CPU the same step
runs eagerly, which is what the tests exercise. Both paths compute the same math on the same batches.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch._functorch.config

from . import kernels
from .config import GPTConfig, TrainConfig
from .devices import on_side_stream, precision_on
from .distributed import DistInfo, all_reduce_mean_, all_reduce_min_
from .errors import TrainingError

log = logging.getLogger("tinylm.step")

UPLOAD_STEPS = 1000  # row indices are uploaded to the device this many steps at a time


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def decay_groups(model: torch.nn.Module) -> tuple[list, list]:
    """(decayed, undecayed) trainable parameters: weight decay on weight matrices only (embeddings,
    projections, the router, the experts' w1 and w2), not on biases and LayerNorm parameters. A module
    names its biases that are not 1-d in `no_weight_decay` (MoE: b1 and b2, one row per expert)."""
    stacked = {id(getattr(m, n)) for m in model.modules() for n in getattr(m, "no_weight_decay", ())}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and id(p) not in stacked]
    chosen = {id(p) for p in decay}
    return decay, [p for p in params if id(p) not in chosen]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW as training runs it: weight decay on matrices only (decay_groups); on CUDA fused and
    capturable with a tensor learning rate, so the optimizer step can live inside the step's CUDA graph."""
    cuda = device.type == "cuda"
    decay, no_decay = decay_groups(model)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=torch.tensor(cfg.lr, device=device) if cuda else cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), fused=True if cuda else None, capturable=cuda)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, model: torch.nn.Module) -> None:
    """optimizer.load_state_dict(saved) for make_optimizer(model, ...), also from a last.pt written
    before 2026-12-07, whose decayed group held every parameter of 2 or more dimensions (the MoE experts'
    biases too): its per-parameter state is moved into today's groups, each group keeping its settings."""
    params = [p for p in model.parameters() if p.requires_grad]
    then = [[p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]]  # the old groups
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    now = [len(g["params"]) for g in optimizer.param_groups]
    if sizes != now and sizes == [len(g) for g in then]:
        index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
        saved_ids = [i for g in saved["param_groups"] for i in g["params"]]  # in the order of `then`
        moved = {i: index[id(p)] for i, p in zip(saved_ids, then[0] + then[1], strict=True)}
        starts = [sum(now[:j]) for j in range(len(now))]
        saved = {"state": {moved[i]: s for i, s in saved["state"].items()},
                 "param_groups": [{**g, "params": list(range(start, start + n))}
                                  for g, start, n in zip(saved["param_groups"], starts, now, strict=True)]}
    optimizer.load_state_dict(saved)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate in place: a captured CUDA graph reads the tensor it was recorded with."""
    for g in optimizer.param_groups:
        if torch.is_tensor(g["lr"]):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


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

    def batches(self, first_step: int, stop_step: int, rows: slice, device: torch.device) -> Iterator:
        """(step, this rank's `rows` of the step's batch) for each step; on CUDA uploaded in blocks,
        so no step waits on a host-to-device copy."""
        for start in range(first_step, stop_step, UPLOAD_STEPS):
            block = self.indices(start, min(UPLOAD_STEPS, stop_step - start))[:, rows]
            if device.type == "cuda":
                block = torch.from_numpy(np.ascontiguousarray(block)).to(device)
            for i in range(len(block)):
                yield start + i, block[i]


class StepStats:
    """Loss statistics summed on the device between reads, so steps never wait on the host.

    `sums` holds [loss, ce_loss, balance, z, dropped], `load` the expert load per (layer, expert), and
    `bad_step` the first step whose loss was not finite (-1 if none): the loop learns of a bad step
    when it next synchronizes, and still names the step.
    """

    N = 5

    def __init__(self, config: GPTConfig, device: torch.device, first_step: int = 0):
        n_moe_layers = config.n_layers if config.ffn == "moe" else 0
        self.sums = torch.zeros(self.N, device=device)
        self.load = torch.zeros(max(n_moe_layers, 1), max(config.n_experts, 1), device=device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.step_t = torch.full((), first_step, dtype=torch.long, device=device)  # the run's step, not the process's

    def add(self, out: dict) -> None:
        """Add one step's model outputs (runs inside the step, and inside its CUDA graph)."""
        loss = out["loss"].detach()
        zero = loss.new_zeros(())
        stats = torch.stack([loss, out["ce_loss"].detach(), out.get("balance_loss", zero).detach(),
                             out.get("z_loss", zero).detach(), out.get("dropped_frac", zero).detach()]).float()
        self.sums.add_(stats)
        if "expert_load" in out:
            self.load.add_(out["expert_load"].detach().float())
        finite = torch.isfinite(loss)
        self.bad_step.copy_(torch.where((~finite) & (self.bad_step < 0), self.step_t, self.bad_step))
        self.step_t.add_(1)

    def first_bad_step(self, dist_info: DistInfo) -> int:
        """The first step whose loss was not finite on any rank (-1 if none); every rank must call it.
        Ranks see a NaN at different steps (one's batch first, the others' through the gradients), and
        all of them must stop at once: one going on would wait in a collective the others never join."""
        if not dist_info.enabled:
            return int(self.bad_step.item())
        none = torch.iinfo(torch.long).max
        t = torch.where(self.bad_step < 0, none, self.bad_step).reshape(1)
        first = int(all_reduce_min_(t, dist_info).item())
        return -1 if first == none else first

    def averaged(self, dist_info: DistInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of (sums, load) averaged across ranks; every rank must call it."""
        sums, load = self.sums.clone(), self.load.clone()
        all_reduce_mean_([sums, load], dist_info)
        return sums, load

    def read(self, dist_info: DistInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the averaged sums and start new ones."""
        out = self.averaged(dist_info)
        self.sums.zero_()
        self.load.zero_()
        return out

    def restore(self, sums: list, load: list) -> None:
        """Continue the sums a checkpoint saved, so a resumed run logs the window it was in."""
        self.sums.copy_(torch.tensor(sums))
        self.load.copy_(torch.tensor(load))


class Stepper:
    """Runs training steps on pre-sampled row indices: forward, backward, clipping, AdamW.

    With CUDA and train.compile the model is compiled; with one process and no fp16 gradient scaler
    the step is then captured in a CUDA graph after three eager warm-up steps and replayed.
    """

    WARMUP_STEPS = 3

    def __init__(self, model, optimizer, cfg: TrainConfig, device, dist_info: DistInfo, tokens, first_step: int = 0):
        """`first_step`: the step the run goes on from (a resumed run's), for the steps StepStats names."""
        self.model, self.opt, self.cfg, self.device, self.dist = model, optimizer, cfg, device, dist_info
        self.tokens = tokens  # torch tensor on device (CUDA) or numpy memmap (CPU)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.cuda = device.type == "cuda"
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision_on(device, cfg.precision))
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.stats = StepStats(model.config, device, first_step)
        self.local_b = cfg.batch_size // dist_info.world_size
        self.idx = torch.zeros(self.local_b, dtype=torch.long, device=device)
        self.cpu_idx = None
        fast = self.cuda and cfg.compile
        self.compiled = compile_model(model, self.autocast_dtype) if fast else model
        self.graph = None
        self.eager_steps_left = self.WARMUP_STEPS if fast and not dist_info.enabled and self.scaler is None else None

    def step(self, step: int, row_idx) -> None:
        """One optimizer step on rows `row_idx` (this rank's slice of the global batch)."""
        set_lr(self.opt, lr_at(step, self.cfg))
        if self.cuda:
            self.idx.copy_(row_idx)
        else:
            self.cpu_idx = row_idx
        if self.graph is not None:
            self.graph.replay()
            return
        self.opt.zero_grad(set_to_none=True)
        if self.eager_steps_left is None:
            self._body()
            return
        # Eager warm-up steps (real steps on their own batches; they also trigger compilation) run on
        # a side stream, as graph capture requires; then the next step is captured and replayed.
        on_side_stream(self._body)
        self.eager_steps_left -= 1
        if self.eager_steps_left == 0:
            self._capture()

    def read_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return and reset the accumulated sums (all ranks average them)."""
        return self.stats.read(self.dist)

    def _batch(self):
        if self.cuda:
            rows = self.tokens.index_select(0, self.idx).long()
        else:  # the memmap read in file order, then the rows put back in the sampled order, which an MoE
            # layer's capacity depends on (it is filled in token order)
            unique, order = np.unique(self.cpu_idx, return_inverse=True)
            rows = torch.from_numpy(np.asarray(self.tokens[unique], dtype=np.int64)[order])
        return rows[:, :-1], rows[:, 1:]

    def _body(self):
        x, y = self._batch()
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None, cache_enabled=False):
            out = self.compiled(x, y)
        if self.scaler is not None:
            self.scaler.scale(out["loss"]).backward()
        else:
            out["loss"].backward()
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
        self.stats.add(out)

    def _capture(self) -> None:
        """Record the step into a CUDA graph. Capture runs nothing: the first replay is the next step."""
        torch.cuda.synchronize()
        self.opt.zero_grad(set_to_none=True)  # gradients get static buffers in the graph's pool
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._body()
        self.graph = g
        log.info("training step captured in a CUDA graph")


def compile_model(model: torch.nn.Module, autocast_dtype: torch.dtype | None) -> torch.nn.Module:
    """torch.compile with static shapes: the training batch and the (padded) evaluation batch compile
    one graph each. `autocast_dtype`: the autocast dtype it will run under (None: autocast off)."""
    # Every model compiles the same GPT.forward, and dynamo keeps at most `recompile_limit` (8) compiled
    # versions of a function per process, then runs it uncompiled with only a log warning. A run compiles
    # two (its training step and its evaluation batch), so a process training a fifth model shape (a sweep
    # from Python) would have trained it uncompiled, 3 to 13 times slower (docs/performance.md). Each run
    # starts from a clean slate, as a workflow job does.
    torch.compiler.reset()
    allow_cached_training_graphs(autocast_dtype)
    return torch.compile(model, dynamic=False)


def allow_cached_training_graphs(autocast_dtype: torch.dtype | None) -> None:
    """Let a process that finds this model's compiled graphs in torch's on-disk caches (a rerun,
    another seed, the same shape in a sweep) load its training graph instead of tracing it again, as
    it already loads its evaluation graph. With warm caches baseline's first step on an H200 took
    7.50 s before, 2.70 s after (docs/performance.md).

    torch's AOTAutograd cache skips graphs holding a custom autograd.Function (tinylm.kernels and the
    MoE gathers use several) unless allowed. Their forward and backward bodies are part of the traced
    graph and so of the cache key. Not in the key: the launch code of the `triton_op` wrappers (tiles,
    grid, warps), and in torch 2.11 the autocast dtype (only whether autocast is on), so an fp16 run
    loaded the graph a bf16 run of the same model had cached. Both go into torch's `cache_key_tag`
    (after a tag the user set), replacing those of an earlier call: the digest of tinylm.kernels'
    sources and the dtype. Without that tag (a torch that lacks it) the setting stays off."""
    if not hasattr(torch.compiler, "config") or not hasattr(torch.compiler.config, "cache_key_tag"):
        return
    autocast = str(autocast_dtype).removeprefix("torch.") if autocast_dtype is not None else "off"
    ours = f"tinylm-kernels-{kernels.source_digest()}-autocast-{autocast}"
    users = [t for t in torch.compiler.config.cache_key_tag.split("+") if t and not t.startswith("tinylm-")]
    torch.compiler.config.cache_key_tag = "+".join([*users, ours])
    torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True
