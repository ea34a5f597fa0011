"""Packed token files: every story as <bos> ids <eos>, concatenated and cut into rows of seq_len + 1.

`<split>.bin` holds the rows back to back (numpy.memmap opens it without copying);
`<split>.meta.json` beside it holds the shape, dtype, vocabulary size, the tokenizer's sha256 and the
file's own sha256 and size. The incomplete last row is dropped.

Encoding works on the keys of tokenizer.py (a story start, a story end, a unit): each distinct key
is encoded once by the tokenizer (in Rust) and remembered; a batch of stories then becomes token
ids through one dict lookup per key and numpy indexing, with no Python work per token. Text in a
story is never read as a special token: a story holding the text "<bos>" gets the ordinary tokens
of those characters.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from ..io import atomic_path, read_json, sha256_file, write_json
from .progress import Progress
from .sources import TEXT_COLUMN_SETTING, iter_story_batches
from .tokenizer import batch_keys, id_space, key_text, load_tokenizer, special_ids, tokenizer_sha256
from .workers import n_workers, parallel_map

log = logging.getLogger("tinylm.data")

DTYPES = {"uint16": np.uint16, "int32": np.int32}


def meta_path(bin_path: str | os.PathLike) -> Path:
    """data/processed/tinystories/bpe8192/train.bin -> data/processed/tinystories/bpe8192/train.meta.json"""
    return Path(bin_path).with_suffix(".meta.json")


def choose_dtype(vocab_size: int, dtype: str = "auto") -> np.dtype:
    """uint16 when every id fits (vocab <= 65536) unless int32 is asked for."""
    if dtype == "auto":
        return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)
    if dtype not in DTYPES:
        raise ConfigError(f"packing.dtype = {dtype!r}; use auto, uint16 or int32")
    if dtype == "uint16" and vocab_size > 1 << 16:
        raise ConfigError(
            f"packing.dtype = uint16 cannot hold {vocab_size} token ids; use auto or int32"
        )
    return np.dtype(DTYPES[dtype])


class _KeyIndex(dict):
    """key -> row of the key table; an unseen key gets the next row and waits in `new`."""

    def __init__(self):
        super().__init__()
        self.new: list[str] = []

    def __missing__(self, key: str) -> int:
        row = len(self)
        self[key] = row
        self.new.append(key)
        return row


class UnitEncoder:
    """Stories -> ids with <bos>/<eos>, through a growing table of the keys seen and their ids."""

    def __init__(self, tokenizer, dtype: np.dtype):
        ids = special_ids(tokenizer)
        self.special = {t: ids[t] for t in ("<bos>", "<eos>")}
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = True  # "<bos>" typed in a story is text
        self.index = _KeyIndex()
        # Row r of the table: its ids are flat[start[r] : start[r] + length[r]].
        self.start = np.zeros(0, dtype=np.int64)
        self.length = np.zeros(0, dtype=np.int64)
        self.flat = np.zeros(1 << 16, dtype=dtype)
        self.n_flat = 0

    def _encode_new(self) -> None:
        keys, self.index.new = self.index.new, []
        texts = [key_text(k) for k in keys]
        encs = self.tokenizer.encode_batch_fast([t for _, t in texts], add_special_tokens=False)
        id_lists = [
            [self.special[sp], *e.ids] if sp else e.ids
            for (sp, _), e in zip(texts, encs, strict=True)
        ]
        lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
        total = int(lengths.sum())
        if self.n_flat + total > len(self.flat):
            self.flat = np.resize(self.flat, max(2 * len(self.flat), self.n_flat + total))
        flat_ids = itertools.chain.from_iterable(id_lists)
        self.flat[self.n_flat : self.n_flat + total] = np.fromiter(flat_ids, self.flat.dtype, total)
        self.start = np.concatenate([self.start, self.n_flat + np.cumsum(lengths) - lengths])
        self.length = np.concatenate([self.length, lengths])
        self.n_flat += total

    def encode(self, stories: Sequence[str]) -> np.ndarray:
        """<bos> ids <eos> for each story, concatenated."""
        keys = batch_keys(stories)
        if not keys:
            return self.flat[:0].copy()
        rows = np.fromiter(map(self.index.__getitem__, keys), dtype=np.int64, count=len(keys))
        if self.index.new:
            self._encode_new()
        lengths = self.length[rows]
        ends = np.cumsum(lengths)
        # output position k reads flat[start[row] + (k - first output position of that row)]
        gather = np.repeat(self.start[rows] - (ends - lengths), lengths) + np.arange(ends[-1])
        return self.flat[gather]


_worker: dict = {}


def _init_worker(tokenizer_path: str, dtype: str) -> None:
    from tokenizers import Tokenizer

    _worker["encoder"] = UnitEncoder(Tokenizer.from_file(tokenizer_path), np.dtype(dtype))


def _encode_batch(stories: list[str]) -> tuple[np.ndarray, int, int]:
    return _worker["encoder"].encode(stories), len(stories), sum(map(len, stories))


def pack_split(
    text_path: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    out_bin: str | os.PathLike,
    *,
    seq_len: int,
    dtype: str = "auto",
    encode_batch: int = 2048,
    workers: int | None = None,
    params: dict | None = None,
    seq_len_name: str = "packing.seq_len",
    text_column: str = "text",
    text_column_name: str = TEXT_COLUMN_SETTING,
    more_stories: str | None = None,
) -> dict:
    """Encode the stories of `text_path` and write `out_bin` + `<split>.meta.json` (with `params`, the
    rule's parameters, as "params": tinylm.workflow.check_data_settings reads them); return the meta.
    `seq_len_name`: where the caller's seq_len comes from, for messages (a config key or an option);
    `text_column` the field of a .jsonl/.json/.parquet that holds the stories, `text_column_name` its
    origin, likewise. `more_stories`: what gives the split more stories, for the message of one that packs
    into no row (sources.more_stories; the workflow's raw splits, by raw_split_more_stories).

    `encode_batch` stories go to a worker process at a time; `workers` defaults to `cpu_budget()`,
    and a text under 32 MB is packed in this process whatever `workers` says (workers.n_workers).
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"{seq_len_name} = {seq_len!r}; it must be an integer >= 1")
    if not isinstance(encode_batch, int) or encode_batch < 1:
        raise ConfigError(f"packing.encode_batch = {encode_batch!r}; it must be an integer >= 1")
    text_path, out_bin, tokenizer_path = Path(text_path), Path(out_bin), Path(tokenizer_path)
    tok_sha = tokenizer_sha256(tokenizer_path)
    tokenizer = load_tokenizer(tokenizer_path)
    vocab_size = id_space(tokenizer)  # the ids the rows may hold, gaps included
    np_dtype = choose_dtype(vocab_size, dtype)
    ids = special_ids(tokenizer)
    for t in ("<bos>", "<eos>"):
        if t not in ids:
            raise DataError(
                f"{tokenizer_path}: has no {t} special token; retrain it with {t} in tokenizer.special_tokens"
            )
    size = text_path.stat().st_size if text_path.is_file() else 0
    workers = n_workers(workers, size)
    row_len = seq_len + 1
    text_sha = hashlib.sha256()
    batches = iter_story_batches(text_path, text_column, batch_size=encode_batch, digest=text_sha,
                                 text_column_name=text_column_name)
    progress = Progress(f"packing {text_path.name}", total=size / 1e6)
    h = hashlib.sha256()
    n_stories = n_tokens = n_rows = 0
    carry = np.empty(0, dtype=np_dtype)
    # The meta is written (atomically) inside the split's block, so renamed just before it as ever; not in
    # a block of its own around the split's write, which named it for a disk the split filled.
    with atomic_path(out_bin) as tmp_bin:
        with open(tmp_bin, "wb") as f:
            results = parallel_map(
                _encode_batch, batches, workers=workers, initializer=_init_worker,
                initargs=(str(tokenizer_path), np_dtype.str),
            )  # fmt: skip
            for tokens, n, nchars in results:
                n_stories += n
                n_tokens += len(tokens)
                buf = np.concatenate([carry, tokens]) if len(carry) else tokens
                full = len(buf) // row_len * row_len
                if full:
                    chunk = memoryview(np.ascontiguousarray(buf[:full])).cast("B")
                    f.write(chunk)
                    h.update(chunk)
                    n_rows += full // row_len
                carry = buf[full:].copy()
                progress.update(nchars / 1e6)
        seconds = progress.close()
        if n_rows == 0:
            more = (f"{more_stories}, or lower {seq_len_name}" if more_stories
                    else f"use more stories or a smaller {seq_len_name}")
            raise DataError(f"{text_path}: {n_tokens} tokens make no complete row of {seq_len_name} + 1 = {row_len}; {more}")
        nbytes = tmp_bin.stat().st_size
        meta = {
            **({"params": params} if params is not None else {}),
            "shape": [n_rows, row_len],
            "dtype": np_dtype.name,
            "seq_len": seq_len,
            "vocab_size": vocab_size,
            "tokenizer_sha256": tok_sha,
            "bos_id": ids["<bos>"],
            "eos_id": ids["<eos>"],
            "n_stories": n_stories,
            "n_tokens": n_tokens,
            "tokens_dropped": n_tokens - n_rows * row_len,
            "text": {"path": str(text_path), "sha256": text_sha.hexdigest(), "bytes": size},
            # no time taken here: train_model and evaluate_model read this file, and Snakemake compares a
            # small input by its content, so data packed again the same must write it the same (the log
            # and benchmarks/ say how long packing took)
            "files": {out_bin.name: {"sha256": h.hexdigest(), "bytes": nbytes}},
        }
        write_json(meta_path(out_bin), meta)
    log.info(
        "packed %s: %d stories, %d tokens -> %d rows of %d (%s) in %.1f s (%.1f MB/s)",
        text_path.name, n_stories, n_tokens, n_rows, row_len, np_dtype.name, seconds,
        size / 1e6 / max(seconds, 1e-9),
    )  # fmt: skip
    return meta


def recorded_sha256(bin_path: str | os.PathLike) -> str | None:
    """The sha256 a packed split's meta file records for it (no hashing); None without a record."""
    try:
        return read_json(meta_path(bin_path))["files"][Path(bin_path).name]["sha256"]
    except (DataError, KeyError, TypeError):
        return None


def made_from_record(bin_path: str | os.PathLike) -> list[dict]:
    """[{"path", "sha256"}] of a packed split as its meta file records it (no hashing), for the records
    of what is made from it (`tinylm verify` checks them); [] without a record."""
    sha = recorded_sha256(bin_path)
    return [] if sha is None else [{"path": str(bin_path), "sha256": sha}]


def check_packed_unchanged(bin_path: str | os.PathLike) -> None:
    """Where a packed split is newer than its meta file (written to after packing recorded it, or
    copied without its times), hash it against the sha256 the meta records; raises DataError if it
    differs. A split older than its meta is taken as recorded (`tinylm verify` hashes everything)."""
    bin_path = Path(bin_path)
    if bin_path.stat().st_mtime_ns <= meta_path(bin_path).stat().st_mtime_ns:
        return
    check_packed_sha256(bin_path)


def check_packed_sha256(bin_path: str | os.PathLike, *, rebuild: str | None = None) -> None:
    """Hash a packed split against the sha256 its meta file records (none recorded: nothing to compare
    with); raises DataError if it differs. For what reads a split whole anyway (an evaluation).
    `rebuild`: what the message tells the user to do, as `check_packed`'s."""
    bin_path = Path(bin_path)
    mpath = meta_path(bin_path)
    if (recorded := recorded_sha256(bin_path)) is None:
        return  # a meta from before the record: nothing to compare with
    if (sha := sha256_file(bin_path)) == recorded:
        return
    if rebuild is None:
        raise DataError(f"{bin_path}: changed since pack_tokens recorded it (sha256 {sha}, {mpath.name} records "
                        f"{recorded}): the tokens are damaged or were replaced. Delete it and rerun: pack_tokens "
                        f"rebuilds it, and only then are the runs made from it retrained")
    raise DataError(f"{bin_path}: changed since it was packed (sha256 {sha}, {mpath.name} records {recorded}): "
                    f"the tokens are damaged or were replaced; {rebuild}")


def open_packed(
    bin_path: str | os.PathLike,
    *,
    tokenizer_sha256: str | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    vocab_size: int | None = None,
    advice: str | None = None,
    rebuild: str | None = None,
    whole: bool = False,
) -> np.memmap:
    """Read-only memmap of shape (rows, seq_len + 1), after checking it against its meta file
    (`check_packed`). `whole`: the caller reads every row (an evaluation), so the file is hashed against
    its recorded sha256 too, which costs little beside that read."""
    shape, dtype = check_packed(bin_path, tokenizer_sha256=tokenizer_sha256, tokenizer_path=tokenizer_path,
                                vocab_size=vocab_size, advice=advice, rebuild=rebuild)
    if whole:
        check_packed_sha256(bin_path, rebuild=rebuild)
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=shape)


def check_packed(
    bin_path: str | os.PathLike,
    *,
    tokenizer_sha256: str | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    vocab_size: int | None = None,
    advice: str | None = None,
    rebuild: str | None = None,
) -> tuple[tuple[int, int], np.dtype]:
    """A packed split's (shape, dtype), once it agrees with its meta file; raises DataError otherwise.

    Checked: the size the meta's shape and dtype imply, the tokenizer sha256 it records against
    `tokenizer_sha256` (of `tokenizer_path`, named in the message), the vocabulary size. Not the
    file's own sha256: hashing gigabytes at every start is too slow (`tinylm verify` does it).
    `advice`: what the tokenizer message tells the user to do, where repacking the split is not it
    (evaluating another dataset's split, say). `rebuild`: what the messages of a damaged or malformed
    file tell the user to do, where the workflow's pack_tokens rule is not how it was made (a user's own
    file, `tinylm evaluate`).
    """
    bin_path = Path(bin_path)
    mpath = meta_path(bin_path)
    rebuild_it = rebuild or "rebuild it with the pack_tokens rule"
    if not bin_path.is_file():
        raise DataError(f"{bin_path}: packed token file not found; run the pack_tokens rule")
    if not mpath.is_file():
        raise DataError(f"{bin_path}: its meta file {mpath.name} is missing; {rebuild_it}")
    meta = read_json(mpath)
    try:
        rows, row_len = meta["shape"]
        dtype = np.dtype(meta["dtype"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{mpath}: no valid shape/dtype ({e}); {rebuild_it}") from e
    if not all(type(n) is int for n in (rows, row_len)) or rows < 1 or row_len < 2:
        # packing writes at least one row, of seq_len + 1 >= 2 tokens; no rows would score a perfect loss
        raise DataError(f"{mpath}: shape {json.dumps(meta['shape'])} is no packed split's (rows >= 1 of >= 2 "
                        f"tokens); {rebuild_it}")
    expected = rows * row_len * dtype.itemsize
    actual = bin_path.stat().st_size
    if actual != expected:
        raise DataError(
            f"{bin_path}: {actual} bytes, but {mpath.name} says {rows} x {row_len} {dtype.name} = "
            f"{expected} bytes; the file is truncated or stale: "
            f"{rebuild or 'delete it and rerun (the pack_tokens rule rebuilds it)'}"
        )
    if tokenizer_sha256 is not None and meta.get("tokenizer_sha256") != tokenizer_sha256:
        given = tokenizer_path or "the tokenizer given"
        advice = advice or f"delete {bin_path.name} and rerun to repack it with this tokenizer, or use the other one"
        raise DataError(
            f"{bin_path}: packed with tokenizer sha256 {meta.get('tokenizer_sha256')}, but {given} has "
            f"sha256 {tokenizer_sha256}; {advice}"
        )
    if vocab_size is not None and meta.get("vocab_size", 0) > vocab_size:
        raise DataError(
            f"{bin_path}: packed with a vocabulary of {meta['vocab_size']} tokens, more than "
            f"vocab_size = {vocab_size}"
        )
    return (rows, row_len), dtype


def check_token_ids(arr, vocab_size: int, path: str | os.PathLike) -> None:
    """Raise DataError if any id in `arr` is >= vocab_size (or negative)."""
    flat = np.asarray(arr).reshape(-1)
    step = 1 << 24
    hi = lo = 0
    for i in range(0, len(flat), step):
        part = flat[i : i + step]
        hi, lo = max(hi, int(part.max())), min(lo, int(part.min()))
    if hi >= vocab_size or lo < 0:
        bad = hi if hi >= vocab_size else lo
        raise DataError(
            f"{path}: token id {bad} is outside the model's vocab_size {vocab_size}; the tokenizer "
            "has more tokens than tokenizer.vocab_size says: repack with the right tokenizer or fix vocab_size"
        )
