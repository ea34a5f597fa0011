"""Checkpoints: one self-describing file per save, written atomically, loaded with weights_only=True.

A checkpoint carries everything needed to rebuild and continue a run without the YAML:
  format            "tinylm-checkpoint-v1"
  model_config      GPTConfig.to_dict()
  model             state_dict (tensors)
  tokenizer_sha256  sha256 of the tokenizer.json the training data was packed with
  tokenizer_path    where that tokenizer was (a hint for generation; the sha256 is what is checked)
  seq_len           tokens per training row (packing.seq_len); `tinylm evaluate` packs a .txt into
                    rows of it, and generation slides its window over that many tokens
  step              optimizer steps done
  train_config      the train settings a resume must share (TrainConfig.math_dict; resume refuses others)
  eval_batch_size   eval.batch_size of the evaluations that picked the best weights (resume refuses another)
  optimizer         optimizer state_dict, or None in a weights-only export
  best_model        the best weights so far (a resumable last.pt), else None
  rng               a resumable last.pt: the random generators' states ({"cpu": ..., "cuda": ...}, what
                    dropout draws from) and the fp16 gradient scaler's state_dict ("scaler", if any)
  data_sha256       {"train": ..., "validation": ...}: the sha256 each packed split's meta file recorded
                    (None without a record); a resume refuses other data
  extra             small JSON-able dict: the run's state (best validation loss and its step, the
                    early-stopping count, the log history, time and tokens so far)

Its wall times make a checkpoint file's sha256 differ between two identical runs; `weights_sha256`
(config.json, metrics.json) is that of the weights alone.
"""

from __future__ import annotations

import json
import os
import pickle
import textwrap
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, ConfigError, DataError, OutputError
from .io import atomic_path, sha256_file

FORMAT = "tinylm-checkpoint-v1"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write `state` (see module docstring) to `path` atomically: a crash keeps the previous file."""
    state = {"format": FORMAT, **state}
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except OutputError as e:  # no room (atomic_path names the file)
        raise CheckpointError(str(e)) from e
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError of its own
        why = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"could not write {path} ({type(e).__name__}: {why}): make room on its disk, or make "
                              f"its folder writable, then run again; the file there before, if any, is kept") from e


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> dict:
    """Load a checkpoint safely (weights_only=True) and check its format. With `mmap` the tensors are
    mapped, not read: for a look at its records (its configs) that reads a few kilobytes of a large file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a checkpoint file; give the file (e.g. {path}/best_model.pt)")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; train the model first (snakemake ... best_model.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # truncated file, wrong format, objects a weights-only load refuses
        why = (str(e).strip().splitlines() or [""])[0]
        if isinstance(e, pickle.UnpicklingError):  # torch's message goes on to suggest loading it unsafely
            unsafe = "Unsupported global" in str(e)
            why = ("it holds Python objects that a weights-only load refuses (tinylm loads no other way)" if unsafe
                   else "not a file torch.save wrote")
        raise CheckpointError(f"{path}: not a readable tinylm checkpoint ({type(e).__name__}: {why}); check the "
                              f"path; if it is a checkpoint training wrote, it is damaged: delete it and retrain") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a tinylm checkpoint (expected format {FORMAT!r})")
    # Until 2026-12-05 a top_k 1 MoE gated each token's expert output by 1, since then by the router
    # probability (moe.py). Its weights would compute another function here, so such a checkpoint is
    # refused; it is one without "seq_len", a key checkpoints gained in the same change.
    model = ckpt.get("model_config") or {}
    if model.get("ffn") == "moe" and model.get("top_k") == 1 and "seq_len" not in ckpt:
        raise CheckpointError(
            f"{path}: an MoE model with top_k 1 saved before 2026-12-05, when every token's expert output "
            "was gated by 1; this tinylm gates it by the router probability, so these weights would "
            "compute another function. Retrain it, or load it with a tinylm from before that date")
    return ckpt


def check_compatible(ckpt: dict, path: str | os.PathLike, *, model_config: dict | None = None,
                     tokenizer_sha256: str | None = None, train_config: dict | None = None) -> None:
    """Refuse a checkpoint made for another model config, tokenizer or training setup, naming what differs."""
    def differ(name: str, want: dict, have: dict) -> None:
        keys = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if keys:
            diff = ", ".join(f"{k}: checkpoint {have.get(k)!r} vs now {want.get(k)!r}" for k in keys)
            raise CheckpointError(f"{path}: made with a different {name} ({diff}); "
                                  f"delete the checkpoint to start over, or restore the old settings")

    if model_config is not None:
        differ("model config", model_config, saved_model_config(ckpt))
    if train_config is not None:
        differ("train config", train_config, ckpt.get("train_config") or {})
    if tokenizer_sha256 is not None and ckpt.get("tokenizer_sha256") != tokenizer_sha256:
        raise CheckpointError(
            f"{path}: made with tokenizer sha256 {ckpt.get('tokenizer_sha256')}, but the tokenizer now "
            f"has sha256 {tokenizer_sha256}; use the matching tokenizer or retrain the model")


def check_resumable(ckpt: dict, path: str | os.PathLike, model_config, train_config,
                    tokenizer_sha256: str | None = None, eval_batch_size: int | None = None,
                    seq_len: tuple[int, str | os.PathLike] | None = None,
                    data: dict[str, tuple[str | None, str | os.PathLike]] | None = None) -> None:
    """Refuse a resumable last.pt made for another model, tokenizer or math-relevant train setting than
    `model_config` (GPTConfig) and `train_config` (TrainConfig): what a resumed run must share with the
    interrupted one (TrainConfig.math_dict); or with another eval.batch_size (`eval_batch_size`), the
    batch of the evaluations that pick the best weights (an MoE layer's capacity follows it). The
    training job's resume and the workflow's check before any job (workflow.check_resumes) both ask
    this. A last.pt that records no evaluation batch (before 2026-12-06) is not checked for it.
    `seq_len`: (the length of the rows it would go on training on, their file): rows of another
    packing.seq_len than the checkpoint's would make its steps train on two kinds of rows. `data`: split ->
    (the sha256 its meta file records, its file), refused where the checkpoint recorded another for it."""
    math = train_config.math_dict(moe=model_config.ffn == "moe")
    if "gpus" not in (ckpt.get("train_config") or {}):
        math.pop("gpus", None)  # a MoE run's last.pt from before it was recorded: as it was checked then
    check_compatible(ckpt, path, model_config=model_config.to_dict(), tokenizer_sha256=tokenizer_sha256,
                     train_config=math)
    saved = ckpt.get("eval_batch_size")
    if eval_batch_size is not None and saved is not None and saved != eval_batch_size:
        raise CheckpointError(
            f"{path}: made with eval.batch_size = {saved}, now {eval_batch_size}: the evaluations that pick "
            f"the best weights would change batch in mid-run; restore eval.batch_size: {saved} to resume, "
            f"or delete the checkpoint to start over")
    if seq_len is not None and ckpt.get("seq_len") is not None and ckpt["seq_len"] != seq_len[0]:
        raise CheckpointError(
            f"{path}: made with rows of packing.seq_len = {ckpt['seq_len']} tokens, but {seq_len[1]} has rows of "
            f"{seq_len[0]}: the resumed steps would train on other rows than the first ones; restore packing.seq_len: "
            f"{ckpt['seq_len']} (and its packed data) to resume, or delete the checkpoint to start over")
    for split, (sha, file) in (data or {}).items():
        if (saved := (ckpt.get("data_sha256") or {}).get(split)) is not None and sha is not None and saved != sha:
            raise CheckpointError(
                f"{path}: made from the {split} split sha256 {saved}, but {file} has sha256 {sha}: the resumed steps "
                f"would train or pick the best weights on other data than the first ones; put back the data the "
                f"run started with (its settings, or the packed folder) to resume, or delete the checkpoint to start over")


def checkpoint_tokenizer(ckpt: dict, path: str | os.PathLike,
                         tokenizer_path: str | os.PathLike | None = None) -> Path:
    """The tokenizer.json the checkpoint at `path` was trained with: `tokenizer_path` if given, else
    the one it records; either way its sha256 must be the recorded one."""
    recorded = not tokenizer_path
    tokenizer_path = tokenizer_path or ckpt.get("tokenizer_path")
    if not tokenizer_path:
        raise CheckpointError(f"{path}: records no tokenizer_path; pass --tokenizer PATH")
    tokenizer_path = Path(tokenizer_path)
    want = ckpt.get("tokenizer_sha256")
    if recorded and not tokenizer_path.is_file() and not tokenizer_path.is_absolute():
        # recorded relative to the folder the workflow ran in, which holds the checkpoint's run folders: look
        # there when the command runs elsewhere; the sha256 tells the tokenizer it trained with
        found = [c for d in Path(path).absolute().parents if (c := d / tokenizer_path).is_file()]
        if not found:
            raise DataError(f"{tokenizer_path}: tokenizer not found here (the checkpoint {path} records it relative "
                            f"to the folder the workflow ran in) nor in a folder above the checkpoint; run the "
                            f"command in the workflow's folder, or pass --tokenizer PATH (the tokenizer.json the "
                            f"model was trained with)")
        tokenizer_path = next((c for c in found if sha256_file(c) == want), found[0])
    if not tokenizer_path.is_file():
        fix = ("pass --tokenizer PATH" if recorded  # the checkpoint's record: another path may be given
               else "check the path --tokenizer gives")  # given already: "pass --tokenizer" is no advice
        raise DataError(f"{tokenizer_path}: tokenizer not found; {fix} (the tokenizer.json the model was trained with)")
    sha = sha256_file(tokenizer_path)
    if sha != want:
        raise CheckpointError(
            f"{tokenizer_path}: tokenizer sha256 {sha} does not match the checkpoint {path}, "
            f"which was trained with tokenizer sha256 {want}; use the tokenizer it was trained with "
            "(--tokenizer), or retrain the model")
    return tokenizer_path


def check_recorded(path: str | os.PathLike) -> None:
    """Refuse a best checkpoint that changed since training wrote it: the run's config.json (beside
    checkpoints/) records its sha256 when training ends. A checkpoint without such a record (a run
    trained before the record existed, a file copied elsewhere) is not checked; a missing one is left to
    load_checkpoint to name."""
    path = Path(path).absolute()  # `best_model.pt` typed inside checkpoints/ has a run folder too
    if not path.is_file():
        return
    config = path.parent.parent / "config.json"
    try:
        files = json.loads(config.read_text(encoding="utf-8")).get("files") or {}
    except (OSError, ValueError, AttributeError):
        return
    rec = files.get(os.path.relpath(path, config.parent))
    if not isinstance(rec, dict) or "sha256" not in rec:
        return
    if (sha := sha256_file(path)) != rec["sha256"]:
        raise CheckpointError(
            f"{path}: sha256 {sha}, but {config} recorded {rec['sha256']} when training wrote it: the file "
            f"changed since (damaged or replaced). Retrain the run (delete {path} and run snakemake again), "
            f"or put the original file back")


def weights_sha256(weights: dict[str, torch.Tensor]) -> str:
    """sha256 of a state_dict's tensors alone (each name, dtype, shape and bytes, in name order): the same
    for two runs that trained the same model, where the checkpoint file's own sha256 also covers the
    run's wall times."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def saved_model_config(ckpt: dict) -> dict:
    """The checkpoint's flat model config, with keys newer than the checkpoint set as the model ran then."""
    from .config import legacy_defaults

    return {**legacy_defaults(ckpt["model_config"]), **ckpt["model_config"]}


def trained_length(ckpt: dict) -> int:
    """The most positions the checkpoint's model trained on at once: its rows' length (packing.seq_len,
    recorded as seq_len), at most its max_seq_len; checkpoints older than the seq_len record give
    max_seq_len. With learned positions, those past this length never trained: generation slides its
    window over this many tokens, and `tinylm evaluate` refuses longer rows."""
    max_seq_len = saved_model_config(ckpt)["max_seq_len"]
    return min(ckpt.get("seq_len") or max_seq_len, max_seq_len)


def model_from_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild the GPT a checkpoint holds, in eval mode on `device`. Returns (model, checkpoint)."""
    from .model import GPT, GPTConfig

    check_recorded(path)
    ckpt = load_checkpoint(path, map_location="cpu")
    try:
        model = GPT(GPTConfig.from_dict(saved_model_config(ckpt)))
        model.load_state_dict(ckpt["model"])
    except (ConfigError, KeyError, RuntimeError) as e:  # a record missing, or weights of another shape
        why = f"no {e} record" if isinstance(e, KeyError) else textwrap.shorten(str(e), 300)
        raise CheckpointError(f"{path}: its records do not make a model ({why}); it is damaged or not a "
                              "checkpoint tinylm training wrote: delete it and retrain") from None
    model.to(device).eval()
    return model, ckpt
