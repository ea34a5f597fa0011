"""Evaluation: loss, perplexity and bits per byte over packed splits, and the run's metrics.json.

Bits per byte = (summed token negative log-likelihood in nats) / ln 2 / (UTF-8 bytes of the predicted
tokens), so models with different tokenizers compare. Special tokens (<bos>, <eos>) decode to no
bytes: their loss still counts in the numerator, as it does in the token-level loss.
"""

from __future__ import annotations

import logging
import math
import os
import time

import numpy as np
import torch

from . import kernels, schema
from .checkpoint import (
    checkpoint_tokenizer,
    model_from_checkpoint,
    saved_model_config,
    trained_length,
    weights_sha256,
)
from .data.pack import check_token_ids, made_from_record, open_packed
from .data.tokenizer import load_tokenizer, token_byte_lengths
from .devices import describe_device, on_side_stream, precision_on, resolve_device
from .distributed import DistInfo, all_reduce_sum_
from .generate import complete
from .io import sha256_file, write_json
from .kernels import IGNORE  # F.cross_entropy's ignore_index: padded rows

log = logging.getLogger("tinylm.evaluate")

# Defaults of the settings below are the config's (config/schema.yaml), as the workflow passes them.
EVAL, TRAIN = schema.defaults("eval"), schema.defaults("train")


class GraphedLoss:
    """`model(x, y)` for evaluation, replayed from a CUDA graph: the same kernels without the host.

    The plain model evaluates on CUDA at the pace the host launches its kernels, not at the GPU's: on
    an H200, baseline's 8,192 validation rows at batch 512 took 95 ms a pass of which the GPU worked 58
    ms (130 kernels a batch), falcon's 400 ms for 179 (dev/eval-in-loop.py). Here the first call runs
    its batch once eagerly (a warm-up that builds the Triton kernels; its result is dropped), records
    the model's forward into a CUDA graph, and from then on each batch is copied into the graph's
    inputs and the graph replayed. Nothing is compiled, so the first evaluation costs no compile time.
    The graph reads the parameters where they are: the optimizer updates them in place, so each
    replay evaluates the current weights.

    Stands in for the model in `evaluate_loss` (it has `training`, `eval()`, `train()`). The plain model
    runs instead off CUDA, in training mode, or with autograd on. A batch of another shape or dtype,
    another autocast setting, or the kernels switched on or off (tinylm.kernels.enabled) records a
    new graph in place of the old one. Returns {"ce_loss": ...}: a tensor of the graph's, overwritten
    by the next replay, so read it (or queue work on it) before the next call.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.graph, self.key = None, None
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.ce: torch.Tensor | None = None

    @property
    def training(self) -> bool:
        return self.model.training

    def eval(self) -> GraphedLoss:
        self.model.eval()
        return self

    def train(self, mode: bool = True) -> GraphedLoss:
        self.model.train(mode)
        return self

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        if not x.is_cuda or self.model.training or torch.is_grad_enabled():
            return self.model(x, y)
        # What the recording fixes: shapes, dtypes, device, autocast (the weights' casts are replayed)
        # and which path the model's ops take (tinylm's kernels or the plain ones).
        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        key = (x.shape, y.shape, x.dtype, y.dtype, x.device, *autocast, kernels.enabled())
        # On the batch's own GPU: a capture records the current device's streams only, so a graph
        # recorded with another GPU current would record nothing (`tinylm evaluate --device cuda:1`).
        with torch.cuda.device(x.device):
            if key != self.key:
                self._record(x, y, *autocast)
                self.key = key
            self.inputs[0].copy_(x)
            self.inputs[1].copy_(y)
            self.graph.replay()
        return {"ce_loss": self.ce}

    def _record(self, x: torch.Tensor, y: torch.Tensor, enabled: bool, dtype: torch.dtype) -> None:
        """Record the forward under autocast (`enabled`, `dtype`) on the current device (x's)."""
        self.graph = self.key = self.ce = None  # let a graph of another shape go first
        self.inputs = (x.clone(), y.clone())

        def loss():
            # Autocast's cache of cast weights is off: a cached cast from before the capture would be
            # read by every replay, stale after the next optimizer step.
            with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
                return self.model(*self.inputs)["ce_loss"]

        on_side_stream(loss)  # the warm-up: Triton builds, cuBLAS workspaces
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.ce = loss()
        self.graph = graph


@torch.no_grad()
def evaluate_loss(
    model,
    rows,
    *,
    batch_size: int = EVAL["batch_size"],
    device: torch.device | str = "cpu",
    precision: str = TRAIN["precision"],
    dist_info: DistInfo | None = None,
    byte_lengths: np.ndarray | torch.Tensor | None = None,
) -> dict:
    """Mean next-token loss over every position of `rows` (N, T+1), plus bpb if byte_lengths is given.

    Batches have one fixed shape (the last is padded and masked), so a compiled model compiles once;
    sums stay on the device and are read back once at the end.
    """
    device = torch.device(device)
    dist_info = dist_info or DistInfo()
    n = len(rows)
    if n == 0:  # else a loss of 0.0 and perplexity 1.0: a perfect score for nothing
        raise ValueError("evaluate_loss: no rows to evaluate")
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        return _loss_sums(model, rows, n, batch_size, device, precision, dist_info, byte_lengths)
    finally:  # a failed evaluation too: a caller that goes on trains with dropout as before
        if was_training:
            model.train()


def _loss_sums(model, rows, n, batch_size, device, precision, dist_info, byte_lengths) -> dict:
    """evaluate_loss's pass over the rows, on a model in eval mode."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, bytes
    if byte_lengths is not None:
        byte_lengths = torch.as_tensor(np.asarray(byte_lengths), dtype=torch.float64, device=device)
    precision = precision_on(device, precision)
    autocast = precision in ("bf16", "fp16")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    bs = min(batch_size, max(n, 1))
    for i, start in enumerate(range(0, n, bs)):
        if i % dist_info.world_size != dist_info.rank:
            continue
        chunk = rows[start : start + bs]
        chunk = chunk if torch.is_tensor(chunk) else torch.from_numpy(np.asarray(chunk, dtype=np.int64))
        chunk = chunk.to(device, dtype=torch.long)
        valid = chunk.shape[0]
        if valid < bs:  # pad to the fixed batch shape; padded rows get weight 0
            chunk = torch.cat([chunk, chunk.new_zeros(bs - valid, chunk.shape[1])])
        x, y = chunk[:, :-1], chunk[:, 1:].clone()
        y[valid:] = IGNORE  # padded rows: no loss, no bytes
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            # The model's own cross-entropy (mean over counted positions) runs inside a compiled
            # model's graph: no full-size fp32 copy of the logits.
            ce = model(x, y)["ce_loss"]
        counted = valid * y.shape[1]
        sums[0] += ce.double() * counted
        sums[1] += counted
        if byte_lengths is not None:
            sums[2] += byte_lengths[y[:valid].reshape(-1)].sum()
    all_reduce_sum_(sums, dist_info)
    nll_sum, count, n_bytes = sums.tolist()
    loss = nll_sum / max(count, 1.0)
    out = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(count), "nll_sum": nll_sum}
    if byte_lengths is not None:
        out["bytes"] = int(n_bytes)
        out["bpb"] = nll_sum / math.log(2) / max(n_bytes, 1.0)
    return out


def evaluate_run(
    *,
    model_name: str,
    checkpoint: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    val_bin: str | os.PathLike,
    test_bin: str | os.PathLike,
    out_json: str | os.PathLike,
    batch_size: int = EVAL["batch_size"],
    device: str = TRAIN["device"],
    precision: str = TRAIN["precision"],
    prompts: list[str] | tuple[str, ...] = tuple(EVAL["prompts"]),
    max_new_tokens: int = EVAL["max_new_tokens"],
    temperature: float = EVAL["temperature"],
    top_k: int | None = EVAL["top_k"],
    seed: int = EVAL["seed"],
    cuda_graph: bool = TRAIN["compile"],
) -> dict:
    """Evaluate the best checkpoint on the whole validation and test splits (every target position of
    their packed rows); write metrics.json.

    cuda_graph (the run's train.compile): on CUDA, replay the model from a CUDA graph (GraphedLoss)."""
    dev = resolve_device(device)
    model, ckpt = model_from_checkpoint(checkpoint, dev)
    checkpoint_tokenizer(ckpt, checkpoint, tokenizer_path)  # the tokenizer the model was trained with
    tok_sha = ckpt["tokenizer_sha256"]
    tokenizer = load_tokenizer(tokenizer_path)
    byte_lengths = token_byte_lengths(tokenizer)
    vocab = model.config.vocab_size
    forward = GraphedLoss(model) if cuda_graph else model  # GraphedLoss is the model itself off CUDA
    packed = {}
    for split, path in (("val", val_bin), ("test", test_bin)):  # both checked before either is evaluated
        packed[split] = open_packed(path, tokenizer_sha256=tok_sha, whole=True)
        check_token_ids(packed[split], vocab, path)
    splits = {}
    for split, rows in packed.items():
        t0 = time.perf_counter()
        splits[split] = evaluate_loss(forward, rows, batch_size=batch_size, device=dev, precision=precision,
                                      byte_lengths=byte_lengths)
        log.info("%s %s: loss %.4f, ppl %.2f, %.4f bits/byte over %d tokens (%.1f s)", model_name, split,
                 splits[split]["loss"], splits[split]["ppl"], splits[split]["bpb"], splits[split]["tokens"],
                 time.perf_counter() - t0)
    t0 = time.perf_counter()
    texts = complete(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, temperature=temperature,
                     top_k=top_k, seed=seed, window=trained_length(ckpt))
    log.info("%s samples: %d prompts, up to %d new tokens each (%.1f s)", model_name, len(prompts), max_new_tokens,
             time.perf_counter() - t0)
    summary = (ckpt.get("extra") or {}).get("summary", {})
    metrics = {
        "model": model_name,
        "n_params": model.num_params(),
        "best_step": ckpt["step"],
        "final_step": summary.get("final_step"),
        "val_loss": splits["val"]["loss"],
        "val_ppl": splits["val"]["ppl"],
        "val_bpb": splits["val"]["bpb"],
        "test_loss": splits["test"]["loss"],
        "test_ppl": splits["test"]["ppl"],
        "test_bpb": splits["test"]["bpb"],
        "val_tokens": splits["val"]["tokens"],
        "test_tokens": splits["test"]["tokens"],
        "train_tokens_per_sec": summary.get("train_tokens_per_sec"),
        "train_wall_sec": summary.get("train_wall_sec"),
        "stop_reason": summary.get("stop_reason"),
        "samples": [{"prompt": p, "completion": c} for p, c in zip(prompts, texts, strict=True)],
        "model_config": saved_model_config(ckpt),
        "train_config": ckpt.get("train_config"),
        "tokenizer_sha256": tok_sha,
        "made_from": [*made_from_record(val_bin), *made_from_record(test_bin)],  # `tinylm verify` checks them
        "checkpoint": str(checkpoint),
        "weights_sha256": weights_sha256(ckpt["model"]),  # equal for runs that trained the same model
        "device": describe_device(dev),  # this evaluation's; train_*: the training run's
        "precision": precision_on(dev, precision),
        # On the CPU the losses depend on the thread count (the rule's threads, which --cores lowers),
        # in the 7th digit: as config.json's cpu_threads for the training
        "cpu_threads": torch.get_num_threads(),
        "train_device": summary.get("device"),
        "train_precision": summary.get("precision"),
    }
    if "ran_on_all" in summary:  # a run resumed on another device, precision, compile or processes: each attempt's
        metrics["train_ran_on_all"] = summary["ran_on_all"]
    # `snakemake verify` re-hashes every file a "files" section names (paths relative to this file).
    ckpt_rel = os.path.relpath(checkpoint, os.path.dirname(os.path.abspath(out_json)) or ".")
    metrics["files"] = {ckpt_rel: {"sha256": sha256_file(checkpoint), "bytes": os.path.getsize(checkpoint)}}
    write_json(out_json, metrics)
    return metrics
