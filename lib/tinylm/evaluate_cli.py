"""`tinylm evaluate`: loss, perplexity and bits per byte of one checkpoint on one file.

    tinylm evaluate artifacts/runs/condor/checkpoints/best_model.pt data/processed/tinystories/bpe8192/test.bin
    tinylm evaluate best_model.pt my_stories.txt --json

The file is a packed split (.bin with its .meta.json beside it, as rule pack_tokens writes) or stories
(in the <|endoftext|> text format, .txt, or as JSON Lines, JSON or Parquet with a "text" field, or
the one --text-column names, as dataset.local reads them), which are packed first, in a temporary folder, with the checkpoint's
tokenizer. The numbers come from tinylm.evaluate.evaluate_loss, as in metrics.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import schema
from .cli import positive_int
from .devices import describe_device, precision_on, resolve_device
from .errors import CheckpointError, DataError

# The workflow's evaluation settings (config/schema.yaml): eval.batch_size, train.device and train.precision.
EVAL, TRAIN = schema.defaults("eval"), schema.defaults("train")

# What a message of a damaged or malformed .bin tells the user: the file may be packed by hand or elsewhere,
# so not the workflow's advice (delete it, rerun, pack_tokens rebuilds it), which fits its own splits only.
REBUILD = ("make it again as it was made (the workflow's pack_tokens rule, or tinylm.data.pack_split), or "
           "evaluate the stories it was packed from (.txt, .jsonl, .json or .parquet), which tinylm evaluate "
           "packs itself")


def _trained_on(ckpt: dict) -> str:
    """Where checkpoint.trained_length took its number from, for messages."""
    if ckpt.get("seq_len"):
        return "(its checkpoint's seq_len; the positions past it never trained)"
    return "(its max_seq_len: the checkpoint is older than the record of the rows it trained on)"


def evaluate_file(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    seq_len: int | None = None,
    text_column: str | None = None,
    batch_size: int | None = None,
    device: str = TRAIN["device"],
    precision: str = TRAIN["precision"],
) -> dict:
    """evaluate_loss of the checkpoint over `data` (.bin, or stories), with the rows and the device.

    A file of stories is packed into rows of `seq_len` + 1 tokens (default: the row length the model trained on,
    as its checkpoint records it, else its max_seq_len), as the workflow packs its splits. Longer rows
    are refused, packed or not: with learned positions, those past the trained length never trained.
    `batch_size` None: the eval.batch_size the checkpoint records (the batch of its run's evaluations and
    metrics.json, which an MoE model's loss depends on), else the schema's default.
    """
    from .checkpoint import checkpoint_tokenizer, model_from_checkpoint, trained_length
    from .data import load_tokenizer, pack_split, token_byte_lengths
    from .data.sources import FORMATS  # the story files dataset.local reads
    from .data.tokenizer import id_space
    from .io import sha256_file

    data = Path(data)
    if data.suffix != ".bin" and data.suffix not in FORMATS:
        raise DataError(
            f"{data}: expected a packed split (.bin, with its .meta.json beside it) or stories: the "
            "<|endoftext|> text format (.txt), or JSON Lines, JSON or Parquet with a 'text' field"
        )
    if not data.is_file():
        raise DataError(f"{data}: input file not found")
    if text_column is not None and data.suffix in (".txt", ".bin"):
        raise DataError(f"--text-column {text_column}: {data} has no columns ({data.suffix}); it names the field of "
                        "a .jsonl, .json or .parquet, so leave it out")
    if data.suffix == ".bin" and seq_len is not None:
        raise DataError(f"--seq-len {seq_len}: {data} is packed into rows already, which it would not change; "
                        f"leave --seq-len out, or evaluate its stories as a .txt")
    dev = resolve_device(device, setting="--device")
    model, ckpt = model_from_checkpoint(checkpoint, dev)
    trained_on, why = trained_length(ckpt), _trained_on(ckpt)
    batch_size = batch_size or ckpt.get("eval_batch_size") or EVAL["batch_size"]
    if data.suffix != ".bin" and seq_len is not None and seq_len > trained_on:
        raise DataError(f"--seq-len = {seq_len} is more than the {trained_on} positions the model trained on "
                        f"{why}; give at most {trained_on}, or leave it out (the rows it trained on)")
    tokenizer_path = checkpoint_tokenizer(ckpt, checkpoint, tokenizer_path)
    tokenizer = load_tokenizer(tokenizer_path)
    vocab = model.config.vocab_size
    if (ids := id_space(tokenizer)) > vocab:
        raise CheckpointError(
            f"{checkpoint}: the model has vocab_size {vocab}, but its tokenizer {tokenizer_path} needs {ids} "
            f"(token ids 0 to {ids - 1}); pass the tokenizer the model was trained with"
        )
    eval_kwargs = dict(
        tokenizer_sha256=sha256_file(tokenizer_path),
        byte_lengths=token_byte_lengths(tokenizer),
        batch_size=batch_size,
        device=dev,
        precision=precision,
    )
    if data.suffix == ".bin":
        out = _evaluate_packed(model, data, trained_on, why, tokenizer_path=tokenizer_path, **eval_kwargs)
    else:
        with tempfile.TemporaryDirectory(prefix="tinylm-evaluate-") as tmp:
            packed = Path(tmp) / f"{data.stem}.bin"
            pack_split(data, tokenizer_path, packed, seq_len=seq_len or trained_on, seq_len_name="--seq-len",
                       text_column=text_column or "text", text_column_name="--text-column")
            out = _evaluate_packed(model, packed, trained_on, why, **eval_kwargs)
    return {
        "checkpoint": str(checkpoint),
        "step": ckpt.get("step"),
        "data": str(data),
        "device": describe_device(dev),
        "precision": precision_on(dev, precision),
        "batch_size": batch_size,
        **out,
    }


def _evaluate_packed(model, path: Path, trained_on: int, why: str, *, tokenizer_sha256: str,
                     tokenizer_path=None, **kwargs) -> dict:
    """A packed split packed with another tokenizer than the model's is someone else's data, not a stale
    file: the message says what to evaluate instead (the workflow's would advise repacking it). A damaged
    or malformed one says how to make it again, or what to evaluate instead (REBUILD)."""
    from .data import check_token_ids, open_packed
    from .evaluate import GraphedLoss, evaluate_loss

    rows = open_packed(path, tokenizer_sha256=tokenizer_sha256, tokenizer_path=tokenizer_path, advice=(
        "evaluate a split packed with the model's tokenizer, or its stories as a .txt (packed with the "
        "model's tokenizer here)"), rebuild=REBUILD, whole=True)
    if rows.shape[1] - 1 > trained_on:
        raise DataError(
            f"{path}: rows of {rows.shape[1] - 1} tokens, more than the {trained_on} positions the model trained "
            f"on {why}; evaluate data packed with seq_len <= {trained_on}, or its stories as a .txt"
        )
    check_token_ids(rows, model.config.vocab_size, path)
    return {
        "rows": rows.shape[0],
        "seq_len": rows.shape[1] - 1,
        **evaluate_loss(GraphedLoss(model), rows, **kwargs),
    }


def report(result: dict) -> str:
    return (
        f"{result['checkpoint']} (step {result['step']}) on {result['data']}\n"
        f"  {result['rows']:,} rows of {result['seq_len']} tokens, {result['batch_size']} a batch: "
        f"{result['tokens']:,} tokens predicted, {result['bytes']:,} bytes of text\n"
        f"  loss           {result['loss']:.4f} nats per token\n"
        f"  perplexity     {result['ppl']:.3f}\n"
        f"  bits per byte  {result['bpb']:.4f}"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tinylm evaluate",
        description="Loss, perplexity and bits per byte of one checkpoint on one file of stories.",
    )
    p.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a tinylm checkpoint, e.g. artifacts/runs/baseline/checkpoints/best_model.pt",
    )
    p.add_argument(
        "data",
        metavar="DATA",
        help="a packed split (.bin, its .meta.json beside it) or stories: .txt (separated by "
        "<|endoftext|> lines), or .jsonl, .json or .parquet with a 'text' field (--text-column)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="tokenizer.json (default: the tokenizer_path the checkpoint records)",
    )
    p.add_argument(
        "--seq-len",
        type=positive_int,
        metavar="N",
        help="tokens per row when packing stories, not for a .bin (default: the model's training rows, else its max_seq_len)",
    )
    p.add_argument(
        "--text-column",
        metavar="NAME",
        help="the field of a .jsonl, .json or .parquet that holds the stories (default: text)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        metavar="ROWS",
        help="rows per forward pass (default: the eval.batch_size the checkpoint records, as in its "
        f"run's metrics.json, which an MoE model's loss depends on; else {EVAL['batch_size']})",
    )
    p.add_argument(
        "--device",
        default=TRAIN["device"],
        help="auto (CUDA if present) | cpu | cuda | cuda:N (default: %(default)s)",
    )
    p.add_argument(
        "--precision",
        default=TRAIN["precision"],
        choices=schema.section("train")["properties"]["precision"]["enum"],
        help="autocast on CUDA; the CPU always runs fp32 (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    return p


def _main(args: argparse.Namespace) -> None:
    result = evaluate_file(
        args.checkpoint,
        args.data,
        tokenizer_path=args.tokenizer,
        seq_len=args.seq_len,
        text_column=args.text_column,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
    )
    print(json.dumps(result, indent=2) if args.json else report(result))


def main(argv: Sequence[str] | None = None) -> None:
    from .cli import run_script

    run_script(_main, build_parser(), argv)
