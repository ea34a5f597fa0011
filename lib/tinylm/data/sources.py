"""Where stories come from (Hugging Face hub, local files, the synthetic generator) and the raw splits.

A story is one document, newlines and blank lines included. On disk, raw splits use TinyStories' own
text format: each story followed by a line holding only `<|endoftext|>`. Stories are stored without
leading or trailing whitespace; empty ones are dropped.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from ..errors import ConfigError, DataError
from ..io import atomic_path, sha256_file, write_json
from ..schema import defaults
from .progress import Progress
from .synthetic import story_chunks, workers_for

log = logging.getLogger("tinylm.data")

EOT = "<|endoftext|>"
_SEP = f"\n{EOT}\n"
_EOT_LINE = re.compile(rf"^{re.escape(EOT)}[ \t]*$", re.M)
# A separator line, blanks after the marker allowed (in text that starts with a newline)
_SEP_LINE = re.compile(rf"\n{re.escape(EOT)}[ \t]*\n")
FORMATS = (".txt", ".jsonl", ".json", ".parquet")
# Where the readers' text_column comes from, as their messages name it; `tinylm evaluate` passes its option
TEXT_COLUMN_SETTING = "dataset.text_column"
_READ_CHARS = 1 << 22  # characters per read of a .txt file
# A .txt file larger than this must hold a separator line: without one, the whole file would be read
# as one story (TinyStories' longest are a few kB). A smaller one may be a single story.
ONE_STORY_MAX_BYTES = 1 << 16


def _check_file(path: Path, what: str = "input file") -> None:
    if path.is_dir():
        raise DataError(f"{path}: {what} is a folder, not a file; name a file in it")
    if not path.is_file():
        raise DataError(f"{path}: {what} not found; check the path")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: {what} is empty; it must hold at least one story")
    if path.suffix not in FORMATS:
        raise DataError(
            f"{path}: unknown format {path.suffix!r}; use one of {', '.join(FORMATS)} "
            f"(TinyStories .txt with {EOT} lines between stories, JSON Lines or Parquet)"
        )


def _find_separator_line(path: Path) -> tuple[bool, bool]:
    """(whether the file holds a separator line, whether <|endoftext|> occurs at all), reading only as
    far as the first separator line: near the start of a story file, however long its first story."""
    decode = codecs.getincrementaldecoder("utf-8-sig")(errors="replace").decode
    tail, anywhere = "\n", False  # the file starts a line
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            # line endings as the reader reads them; a \r\n cut in two only adds a blank line
            text = tail + decode(chunk, final=not chunk) + ("" if chunk else "\n")
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            if _SEP_LINE.search(text):
                return True, True
            anywhere = anywhere or EOT in text
            if not chunk:
                return False, anywhere
            # the last line, if it may be a separator line that the next read completes
            line = text[text.rfind("\n") + 1 :] if "\n" in text else None
            if line is not None and (EOT.startswith(line) or _EOT_LINE.fullmatch(line)):
                tail = "\n" + line
            else:
                tail = ""


def _check_separated(path: Path, warn: bool = False) -> None:
    """Refuse a .txt file above ONE_STORY_MAX_BYTES without a separator line; with `warn`, say when a
    smaller one without any reads as one story although blank lines split it."""
    size = path.stat().st_size
    if size <= ONE_STORY_MAX_BYTES and not warn:
        return  # one story is a possible file
    found, anywhere = _find_separator_line(path)
    if found:
        return
    if size <= ONE_STORY_MAX_BYTES:
        text = path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
        if re.search(r"\n[ \t]*\n\s*\S", text):
            log.warning(f"{path}: no line {EOT!r}, so its {size} bytes are read as one story; if it holds "
                        f"several stories, end each with a line holding only {EOT}")
        return
    inline = f" ({EOT} appears, but not on a line of its own)" if anywhere else ""
    raise DataError(
        f"{path}: no line {EOT!r} in its {size} bytes{inline}, so the whole file would be read as one "
        f"story. A .txt file holds stories each followed by a line holding only {EOT}; add those lines, "
        f"or give .jsonl, .json or .parquet with one story per record"
    )


def _parquet_file(path: Path, text_column: str, text_column_name: str = TEXT_COLUMN_SETTING):
    """The open ParquetFile, once its schema shows a text column `text_column` (no data is read).
    `text_column_name`: where the caller's text_column comes from, for messages (a config key or an option)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    names = pf.schema_arrow.names
    if text_column not in names:
        raise DataError(
            f"{path}: no {text_column!r} column (found: {', '.join(names)}); set "
            f"{text_column_name} to the column that holds the story"
        )
    kind = pf.schema_arrow.field(text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(
            f"{path}: column {text_column!r} holds {kind}, not text; set {text_column_name} to the "
            "column that holds the story"
        )
    return pf


def check_source_file(path: str | os.PathLike, text_column: str = "text", what: str = "input file") -> Path:
    """Cheap checks of a story file, before any work: it exists and is not empty, its format is known,
    a .txt file is separated into stories, a Parquet file's text column holds text, a JSON Lines file's
    first story is JSON with the text field."""
    path = Path(path)
    _check_file(path, what)
    if path.suffix == ".txt":
        _check_separated(path)
    elif path.suffix == ".parquet":
        _parquet_file(path, text_column)
    elif path.suffix == ".jsonl":  # its first story: valid JSON with the text field
        next(_jsonl_batches(path, text_column, batch_size=1), None)
    elif path.suffix == ".json":  # JSON Lines, or one object, by its first story (an array is read whole)
        try:
            array = _json_head(path).startswith("[")
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e) from e
        if not array:
            next(_json_batches(path, text_column, batch_size=1), None)
    return path


def check_local_file(split: str, path: str | None, text_column: str = "text") -> Path:
    """check_source_file for dataset.local.<split>, naming that key."""
    if not path:
        raise ConfigError(
            f"dataset.source is local but dataset.local.{split} is not set; give a file path"
        )
    try:
        return check_source_file(path, text_column, f"dataset.local.{split} file")
    except DataError as e:  # name the key, where the message does not already
        key = f"dataset.local.{split}"
        raise DataError(str(e) if key in str(e) else f"{e} ({key})") from None


def check_local_files(train: str | None, validation: str | None, text_column: str = "text") -> dict[str, Path]:
    """check_local_file for both splits, and that they are two files; {"train", "validation"} -> path.
    Both files are checked before anything is raised: two bad ones (a folder renamed) are named in one
    message, one per line, not one per attempt."""
    paths, errors = {}, []
    for split, path in (("train", train), ("validation", validation)):
        try:
            paths[split] = check_local_file(split, path, text_column)
        except (ConfigError, DataError) as e:
            errors.append(e)
    if errors:
        kind = ConfigError if any(isinstance(e, ConfigError) for e in errors) else DataError
        raise (errors[0] if len(errors) == 1 else kind("\n".join(map(str, errors))))
    if paths["train"].resolve() == paths["validation"].resolve():
        raise ConfigError(f"dataset.local.train and dataset.local.validation are the same file, {paths['train']}: "
                          f"the model would be validated on stories it trains on; give a validation file of its own")
    return paths


def _clean(stories: Iterable, out: list[str]) -> int:
    """Append the stripped, non-empty stories to `out`; return how many were read."""
    n = 0
    for s in stories:
        n += 1
        if s is not None and (s := s.strip()):
            out.append(s)
    return n


def _warn_without_text(path: Path, text_column: str, records: int, kept: int) -> None:
    """A JSON Lines, JSON or Parquet record whose text is null or blank is no story: say how many were
    skipped (a column of nulls would otherwise read as a smaller dataset without a word)."""
    if records > kept:
        log.warning("%s: %d of %d records have no text in %r (null or blank); skipped", path, records - kept,
                    records, text_column)


class _HashingReader(io.RawIOBase):
    """A binary file that feeds every byte read to `digest`."""

    def __init__(self, f, digest):
        self.f, self.digest = f, digest

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self.f.readinto(buf)
        self.digest.update(memoryview(buf)[:n])
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def _txt_batches(path: Path, text_column: str, batch_size: int, digest=None) -> Iterator[list[str]]:
    batch: list[str] = []
    rest = "\n"  # a separator on the first line then splits off an empty story
    raw = open(path, "rb")
    if digest is not None:  # hash while reading: no second pass over a big file
        raw = io.BufferedReader(_HashingReader(raw, digest), buffer_size=1 << 20)
    try:
        # universal newlines (\r\n reads as \n); utf-8-sig drops a byte-order mark at the start
        with io.TextIOWrapper(raw, encoding="utf-8-sig") as f:
            while block := f.read(_READ_CHARS):
                text = rest + block
                parts = text.split(_SEP)
                if len(parts) == 1 and EOT in text:  # separator lines with blanks after the marker only
                    parts = _SEP_LINE.split(text)
                rest = parts.pop()
                for p in parts:
                    # Rare: back-to-back separators or spaces after one; split those exactly.
                    _clean(_EOT_LINE.split(p) if EOT in p else (p,), batch)
                while len(batch) >= batch_size:
                    yield batch[:batch_size]
                    batch = batch[batch_size:]
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from e
    _clean(_EOT_LINE.split(rest), batch)  # the last separator may lack its newline
    for i in range(0, len(batch), batch_size):
        yield batch[i : i + batch_size]


def _story_of(obj, text_column: str, where: str, text_column_name: str = TEXT_COLUMN_SETTING) -> str:
    if isinstance(obj, str):
        return obj
    if not isinstance(obj, dict) or text_column not in obj:
        fields = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(
            f"{where}: no {text_column!r} field (found: {fields}); set {text_column_name} to the "
            "field that holds the story"
        )
    value = obj[text_column]
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field {text_column!r} is {type(value).__name__}, not text")
    if value and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON may escape half of a UTF-16 pair alone: no text holds it
            raise DataError(
                f"{where}: field {text_column!r} holds {value[e.start]!r} at character {e.start}, half of a "
                f"character (text cut inside an emoji, say) that UTF-8 cannot hold; fix or delete that record"
            ) from None
    return value


def _not_utf8(path: Path, e: UnicodeDecodeError) -> DataError:
    return DataError(f"{path}: not UTF-8 text ({e}); convert it to UTF-8")


def _jsonl_batches(path: Path, text_column: str, batch_size: int, text_column_name: str = TEXT_COLUMN_SETTING) -> Iterator[list[str]]:
    try:
        yield from _jsonl_records(path, text_column, batch_size, text_column_name)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from e


def _jsonl_records(path: Path, text_column: str, batch_size: int, text_column_name: str = TEXT_COLUMN_SETTING) -> Iterator[list[str]]:
    batch: list[str] = []
    records = kept = 0
    with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not text
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}, line {lineno}: not valid JSON ({e.msg}, column {e.colno}); fix or "
                    "delete that line"
                ) from e
            records += _clean((_story_of(obj, text_column, f"{path}, line {lineno}", text_column_name),), batch)
            if len(batch) >= batch_size:
                kept += len(batch)
                yield batch
                batch = []
    _warn_without_text(path, text_column, records, kept + len(batch))
    yield batch


def _json_head(path: Path) -> str:
    """The start of a .json file, blanks and a byte-order mark left out: "[" starts an array of records."""
    with open(path, encoding="utf-8-sig") as f:
        return f.read(4096).lstrip()


def _json_batches(path: Path, text_column: str, batch_size: int, text_column_name: str = TEXT_COLUMN_SETTING) -> Iterator[list[str]]:
    try:
        head = _json_head(path)
        if head.startswith("["):
            records = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); fix the file") from e
    if not head.startswith("["):  # many .json files are JSON Lines
        read = False
        try:
            for batch in _jsonl_batches(path, text_column, batch_size, text_column_name):
                read = True
                yield batch
        except DataError as e:
            if not read and (why := _one_json_object(path, text_column)):  # not JSON Lines: say what it is
                raise DataError(why) from e
            raise
        return
    batch: list[str] = []
    n = _clean((_story_of(r, text_column, f"{path}, record {i}", text_column_name) for i, r in enumerate(records)),
               batch)
    _warn_without_text(path, text_column, n, len(batch))
    for i in range(0, len(batch), batch_size):
        yield batch[i : i + batch_size]


def _one_json_object(path: Path, text_column: str) -> str | None:
    """What is wrong with a .json file that JSON Lines reading refused, where the file is one JSON object
    rather than records: spread over several lines (pretty-printed), or holding lists or mappings (records
    wrapped in a key, or the columns pandas' DataFrame.to_json writes by default). None otherwise (a
    JSON Lines file with a bad line or record, whose own message names it)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
        obj = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(obj, dict):
        return None
    # the stories wrapped in a key: a list of records with the text field, or the one key's list of texts
    lists = [k for k, v in obj.items() if isinstance(v, list) and v
             and (all(isinstance(r, dict) and text_column in r for r in v) or len(obj) == 1 and all(isinstance(r, str) for r in v))]
    if not ("\n" in text.strip() or any(isinstance(v, (dict, list)) for v in obj.values())):
        return None  # one record on one line: a JSON Lines file of one story, refused for its own reason
    keys = ", ".join(map(str, list(obj)[:5])) + (f", ... ({len(obj)} keys)" if len(obj) > 5 else "")
    why = (f"{path}: one JSON object (keys: {keys}), not stories: a .json file holds an array of records, "
           f"[{{\"{text_column}\": \"...\"}}, ...], or one record a line (JSON Lines)")
    if lists:
        return f"{why}; its {lists[0]!r} holds a list: save that list alone as the file"
    column, records = obj.get(text_column), [v for v in obj.values() if isinstance(v, dict)]
    if (isinstance(column, dict) and all(v is None or isinstance(v, str) for v in column.values())  # 'columns'
            or len(records) == len(obj) and all(text_column in r for r in records)):  # 'index'
        return (f"{why}; pandas' DataFrame.to_json writes such an object by default (orient 'columns' or 'index'): "
                f"write df.to_json(path, orient='records')")
    return why


def _parquet_batches(path: Path, text_column: str, batch_size: int, text_column_name: str = TEXT_COLUMN_SETTING) -> Iterator[list[str]]:
    pf = _parquet_file(path, text_column, text_column_name)
    records = kept = 0
    for rb in pf.iter_batches(batch_size=batch_size, columns=[text_column]):
        batch: list[str] = []
        records += _clean(rb.column(0).to_pylist(), batch)
        kept += len(batch)
        yield batch
    _warn_without_text(path, text_column, records, kept)


_READERS = {".jsonl": _jsonl_batches, ".json": _json_batches, ".parquet": _parquet_batches}


def iter_story_batches(
    path: str | os.PathLike, text_column: str = "text", batch_size: int = 2048, digest=None,
    text_column_name: str = TEXT_COLUMN_SETTING,
) -> Iterator[list[str]]:
    """The stories of a .txt/.jsonl/.json/.parquet file in lists of at most `batch_size`.

    `digest` (a hashlib object), if given, is fed the file's bytes. `text_column_name`: where
    `text_column` comes from, for messages (a config key or an option).
    """
    path = Path(path)
    _check_file(path)
    n = 0
    if path.suffix == ".txt":
        _check_separated(path, warn=True)
        batches = _txt_batches(path, text_column, batch_size, digest)
    else:
        batches = _READERS[path.suffix](path, text_column, batch_size, text_column_name)
        if digest is not None:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
    for batch in batches:
        if batch:
            n += len(batch)
            yield batch
    if n == 0:
        raise DataError(f"{path}: holds no stories (only whitespace); check the file")


def read_stories(path: str | os.PathLike, text_column: str = "text") -> Iterator[str]:
    """Stories one by one, from TinyStories text (`<|endoftext|>` lines), JSON Lines or Parquet."""
    for batch in iter_story_batches(path, text_column):
        yield from batch


def _write_story_file(path: Path, stories: Iterable[str | None], name_story=lambda i: f"story {i}") -> dict:
    """Write `stories` to `path`; {stories, bytes, sha256, skipped: the positions of the empty ones,
    which are not written}. Line endings are written as the reader reads them (\r\n and \r as \n)."""
    h = hashlib.sha256()
    n = size = 0
    skipped = []
    sep = _SEP.encode()
    with open(path, "wb") as f:
        buf: list[bytes] = []
        for i, story in enumerate(stories):
            story = _as_written(story)
            if not story:
                skipped.append(i)
                continue
            if EOT in story and _EOT_LINE.search(story):
                raise DataError(f"{name_story(i)} holds a line {EOT!r}, the story separator; remove it")
            buf += (story.encode(), sep)
            n += 1
            if len(buf) >= 8192:
                chunk = b"".join(buf)
                f.write(chunk)
                h.update(chunk)
                size += len(chunk)
                buf = []
        chunk = b"".join(buf)
        f.write(chunk)
        h.update(chunk)
        size += len(chunk)
    if n == 0:
        raise DataError(f"no stories to write (all {len(skipped)} are empty)")
    return {"stories": n, "bytes": size, "sha256": h.hexdigest(), "skipped": skipped}


def write_stories(path: str | os.PathLike, stories: Iterable[str]) -> dict:
    """Write stories in the `<|endoftext|>` format, atomically; return {stories, bytes, sha256}."""
    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            info = _write_story_file(tmp, stories)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None
    return {k: info[k] for k in ("stories", "bytes", "sha256")}


# --- the Hugging Face hub --------------------------------------------------------------------


def hub_reachable(endpoint: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the hub opens within `timeout` seconds (DNS included)."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            ok.append(False)

    # getaddrinfo ignores socket timeouts; a daemon thread bounds the whole probe.
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok and ok[0])


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Offline mode for `datasets` and `huggingface_hub` inside the block (cache only, no retries)."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def load_hub_splits(
    hub_id: str, text_column: str, *, cache_dir: str | None = None, timeout: float = 5.0
) -> dict:
    """{"train", "validation"} -> pyarrow text column of a `datasets` dataset.

    Tries the local cache first (no network); only then probes the hub with a short timeout and
    downloads. Without a cached copy and without a reachable hub it fails at once.
    """
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        with _hf_offline():
            ds = datasets.load_dataset(hub_id, cache_dir=cache_dir)
        log.info("%s: using the local copy (no download)", hub_id)
    except (ConnectionError, FileNotFoundError, ValueError) as offline_error:
        endpoint = datasets.config.HF_ENDPOINT
        if not hub_reachable(endpoint, timeout):
            raise DataError(
                f"the Hugging Face hub ({endpoint}) is unreachable and dataset.hub_id "
                f"{hub_id!r} is not in the local cache ({cache_dir or datasets.config.HF_DATASETS_CACHE}). "
                "Work offline with dataset.source: local and dataset.local.train / "
                "dataset.local.validation (TinyStories .txt, .jsonl, .json or .parquet files), or with "
                "dataset.source: synthetic (e.g. `--configfile config/demo.yaml`)."
            ) from offline_error
        log.info("%s: not cached; downloading from %s", hub_id, endpoint)
        try:
            ds = datasets.load_dataset(hub_id, cache_dir=cache_dir)  # shows tqdm download progress
        except DatasetNotFoundError as e:  # a misspelt id, or a gated or private dataset
            raise DataError(
                f"dataset.hub_id = {hub_id!r}: the hub ({endpoint}) has no such dataset, or not one open "
                f"to you; check the id (roneneldan/TinyStories is TinyStories), and for a gated or private "
                f"dataset log in first (`hf auth login`, or HF_TOKEN in the environment)"
            ) from e
    out = {}
    for split in ("train", "validation"):
        if split not in ds:
            raise DataError(f"dataset {hub_id!r} has no {split!r} split (it has: {', '.join(ds)})")
        if text_column not in ds[split].column_names:
            raise DataError(
                f"dataset {hub_id!r}, split {split!r}: no {text_column!r} column (found: "
                f"{', '.join(ds[split].column_names)}); set dataset.text_column"
            )
        out[split] = ds[split].data.column(text_column)
    return out


# --- the raw splits --------------------------------------------------------------------------


def _column_of(stories_batches: Iterable[list[str]]):
    """Stories as one pyarrow string column (compact, no Python object per story)."""
    import pyarrow as pa

    chunks = [pa.array(b, type=pa.large_string()) for b in stories_batches]
    return pa.chunked_array(chunks, type=pa.large_string())


def _take(column, indices: np.ndarray, batch: int = 16384) -> Iterator[str]:
    import pyarrow as pa

    for i in range(0, len(indices), batch):
        yield from column.take(pa.array(indices[i : i + batch])).to_pylist()


def dataset_kwargs(dataset: dict) -> dict:
    """The workflow's `dataset:` config section -> keyword arguments of `prepare_raw`."""
    local, synthetic = dataset.get("local") or {}, dataset.get("synthetic") or {}
    return {
        "source": dataset["source"],
        "hub_id": dataset.get("hub_id"),
        "text_column": dataset.get("text_column", "text"),
        "local_train": local.get("train"),
        "local_validation": local.get("validation"),
        "synthetic_n_train": synthetic.get("n_train"),
        "synthetic_n_validation": synthetic.get("n_validation"),
        "synthetic_seed": synthetic.get("seed"),
        "seed": dataset["seed"],
        "test_n": dataset["test_n"],
        "train_n": dataset.get("train_n"),
        "validation_n": dataset.get("validation_n"),
    }


def _load_source(
    source: str,
    *,
    hub_id: str | None,
    text_column: str,
    local_train: str | None,
    local_validation: str | None,
    synthetic_n_train: int | None,
    synthetic_n_validation: int | None,
    synthetic_seed: int | None,
) -> tuple[dict, dict]:
    """({"train", "validation"} -> text column, description of the source for meta.json)."""
    if source == "hub":
        if not hub_id:
            raise ConfigError(
                "dataset.hub_id is empty; name a Hugging Face dataset or change dataset.source"
            )
        return load_hub_splits(hub_id, text_column), {"hub_id": hub_id, "text_column": text_column}
    if source == "local":
        cols, desc = {}, {"text_column": text_column}
        for split, path in check_local_files(local_train, local_validation, text_column).items():
            log.info("reading %s (%.1f MB)", path, path.stat().st_size / 1e6)
            cols[split] = _column_of(iter_story_batches(path, text_column, 16384))
            desc[split] = {"path": str(path), "bytes": path.stat().st_size}
        return cols, desc
    if source == "synthetic":
        for key, v in (("n_train", synthetic_n_train), ("n_validation", synthetic_n_validation)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"dataset.synthetic.{key} = {v!r}; it must be an integer >= 1")
        seed = defaults("dataset", "synthetic")["seed"] if synthetic_seed is None else synthetic_seed
        cols = {}
        # Validation comes from its own stream so that n_train does not change it.
        for split, n, s in (
            ("train", synthetic_n_train, seed),
            ("validation", synthetic_n_validation, f"{seed}-validation"),
        ):
            workers = workers_for(n)
            log.info("generating %d synthetic %s stories (%d worker process%s)", n, split, workers,
                     "" if workers == 1 else "es")  # fmt: skip
            cols[split] = _column_of(story_chunks(n, s, workers=workers))
        return cols, {"synthetic_seed": seed}
    raise ConfigError(f"dataset.source = {source!r}; use hub, local or synthetic")


def split_counts(n_train: int, n_val: int, test_n: int, train_n, validation_n,
                 validation_from: str = "the source") -> tuple[int, int, int]:
    """(test, train, validation) story counts for a source of `n_train` train and `n_val` validation
    stories.

    test_n and train_n are upper bounds, so that one config suits the hub and a small file: the test
    split takes test_n stories but at most a tenth of the source's train split, the train split
    train_n (null: no bound) of those that remain. The defaults give the hub data exactly 5,000 test
    and 529,930 train stories. validation_n (null: all) must fit; `validation_from` names where the
    validation split comes from in that message.
    """
    for key, v in (("test_n", test_n), ("train_n", train_n), ("validation_n", validation_n)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ConfigError(
                f"dataset.{key} = {v!r}; it must be an integer >= 1"
                + ("" if key == "test_n" else " or null")
            )
    if n_train < 2:
        raise DataError(
            f"the source's train split holds {n_train} {'story' if n_train == 1 else 'stories'}; it "
            "needs at least 2 (one for the test split, one to train on)"
        )
    if validation_n is not None and validation_n > n_val:
        raise ConfigError(
            f"dataset.validation_n = {validation_n} is larger than the validation split of {validation_from} "
            f"({n_val} stories); lower it or set it to null"
        )
    n_test = min(test_n, max(1, n_train // 10))
    if n_test < test_n:
        log.info("dataset.test_n = %d is more than a tenth of the %d stories in the source's train "
                 "split: the test split takes %d", test_n, n_train, n_test)  # fmt: skip
    left = n_train - n_test
    if train_n is not None and train_n > left:
        log.info("dataset.train_n = %d is more than the %d stories left after the test split: the "
                 "train split takes all of them", train_n, left)  # fmt: skip
    n_tr = left if train_n is None else min(train_n, left)
    return n_test, n_tr, (n_val if validation_n is None else validation_n)


# Packing adds <bos> and <eos> to every story, and every token of the byte-level BPE covers one byte of it or
# more: a split packs into at most its stories' bytes and two tokens a story (a tokenizer without merges into
# exactly that many). A split whose bound is short of one row of seq_len + 1 tokens can make no row; one
# whose bound is not may still, so only the first is refused.
def max_packed_tokens(split: dict) -> int:
    """The most tokens a raw split packs into, from its {"stories", "bytes"} as meta.json records them (the
    bytes of the file: each story followed by its separator line)."""
    return split["bytes"] - split["stories"] * (len(_SEP.encode()) - 2)


def short_of_a_row(tokens: int, seq_len: int, of: str = "it") -> str | None:
    """Why at most `tokens` tokens can fill no packed row of seq_len + 1 (None if they may): the middle of
    a message, naming packing.seq_len; `of` is what pack_tokens could make no row of."""
    if tokens >= seq_len + 1:
        return None
    return (f"at most {tokens} tokens, fewer than one packed row of packing.seq_len + 1 = {seq_len + 1}: "
            f"pack_tokens could make no row of {of}")


def more_stories(split: str, *, source: str, test_n: int, train_n: int | None, validation_n: int | None,
                 source_stories: dict[str, int]) -> str | None:
    """What gives a raw split more stories, as a message says it: the dataset setting that sized it (see
    split_counts), or the source's size; None where nothing can (the hub's whole validation split).
    `source_stories`: {"train", "validation"} -> the stories the source holds."""
    n_src, n_src_val = source_stories["train"], source_stories["validation"]
    cap = max(1, n_src // 10)  # the most the test split takes
    if split == "validation" and validation_n is not None and validation_n < n_src_val:
        return f"raise dataset.validation_n ({validation_n}) or set it to null"
    if split == "test" and test_n < cap:
        return f"raise dataset.test_n ({test_n})"
    if split == "train" and train_n is not None and train_n < n_src - min(test_n, cap):
        return f"raise dataset.train_n ({train_n}) or set it to null"
    of = "validation" if split == "validation" else "train"
    tenth = ": the test split takes at most a tenth of it" if split == "test" else ""
    if source == "synthetic":
        return f"raise dataset.synthetic.n_{of} ({n_src_val if of == 'validation' else n_src}){tenth}"
    if source == "local":
        return f"give the dataset.local.{of} file more stories{tenth}"
    return None


def recorded_more_stories(split: str, meta: dict) -> str | None:
    """more_stories for a raw split, by the settings its meta.json (as prepare_raw writes it) records; None
    for a record without them."""
    try:
        return more_stories(split, source=meta["source"], test_n=meta["test_n"], train_n=meta["train_n"],
                            validation_n=meta["validation_n"], source_stories=meta["source_stories"])
    except (KeyError, TypeError):
        return None


def raw_split_more_stories(text_path: str | os.PathLike) -> str | None:
    """more_stories for a raw split that prepare_raw wrote (data/raw/<dataset>/<split>.txt), by the meta.json
    beside it; None for another file, or a record without the sizes."""
    text_path = Path(text_path)
    try:
        meta = json.loads(text_path.with_name("meta.json").read_text())
    except (OSError, ValueError):
        return None
    return recorded_more_stories(text_path.stem, meta) if isinstance(meta, dict) else None


def split_short_of_a_row(split: str, info: dict, seq_len: int, more: str | None, built: bool = False) -> str | None:
    """The message for a raw split ({"stories", "bytes"}) too small to fill one packed row, else None;
    `more`: what gives it more stories (more_stories). A `built` split's settings are those of its
    dataset.name (tinylm.workflow.check_data_settings): lowering packing.seq_len comes first."""
    n = info["stories"]
    if (why := short_of_a_row(max_packed_tokens(info), seq_len)) is None:
        return None
    stories = f"{n} {'story' if n == 1 else 'stories'}"
    lower = f"lower packing.seq_len ({seq_len})"
    if built:
        return f"its {split} split holds {stories} of {why}; {lower}{f', or under a new dataset.name {more}' if more else ''}"
    return f"the {split} split would hold {stories} of {why}; {more + ', or ' if more else ''}{lower}"


def check_local_files_fill_a_row(paths: dict[str, Path], seq_len: int) -> None:
    """Refuse dataset.local files too small for their splits to fill one packed row, before any work: a story
    takes as many bytes in a .txt, .jsonl or .json file as written or more, and every story but one brings
    more than two bytes besides (a separator line, quotes), so the splits drawn from a file pack into at
    most its size + 2 tokens. A Parquet file is compressed: the download job checks its splits.
    `paths`: {"train", "validation"} -> file."""
    lines = []
    for split, path in paths.items():
        size = path.stat().st_size
        of = "its validation split" if split == "validation" else "its train and test splits"
        why = short_of_a_row(size + 2, seq_len, "it" if split == "validation" else "them")
        if path.suffix != ".parquet" and why:
            lines.append(f"{path}: the dataset.local.{split} file holds {size} bytes, so {of} would hold {why}; "
                         f"give the file more stories, or lower packing.seq_len ({seq_len})")
    if lines:
        raise ConfigError("\n".join(lines))


def prepare_raw(
    out_dir: str | os.PathLike,
    *,
    source: str,
    seed: int,
    test_n: int,
    train_n: int | None,
    validation_n: int | None,
    text_column: str = "text",
    hub_id: str | None = None,
    local_train: str | None = None,
    local_validation: str | None = None,
    synthetic_n_train: int | None = None,
    synthetic_n_validation: int | None = None,
    synthetic_seed: int | None = None,
    params: dict | None = None,
    seq_len: int | None = None,
) -> dict:
    """Write train/validation/test.txt, the chosen indices and meta.json into `out_dir` (with `params`,
    the rule's parameters, as "params": tinylm.workflow.check_data_settings reads them).

    The source's train split is shuffled with `numpy.random.default_rng(seed).permutation(n)`:
    the first `test_n` stories are the test split, the next `train_n` (null: all the rest) the
    train split, both in that shuffled order; both sizes are upper bounds (see split_counts). A story
    whose text (as written) is also in the validation split is left out of test, and one also in the
    test or validation split is left out of train, the next one taken instead each time: a source that
    repeats stories never trains on a held-out one, and test and validation share none.
    Validation is the first `validation_n` stories of the source's validation split. Stories are stripped, their line endings
    written as \n; empty ones are left out (meta.json counts what was written, and the index files
    list only those). Nothing is written unless every split is complete.

    With `seq_len` (packing.seq_len), a split too small to fill one packed row of seq_len + 1 tokens at
    one token a byte is a ConfigError naming the setting that sized it; the small splits are written
    first, so one of them is refused before the train split is written.
    """
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    cols, desc = _load_source(
        source, hub_id=hub_id, text_column=text_column, local_train=local_train,
        local_validation=local_validation, synthetic_n_train=synthetic_n_train,
        synthetic_n_validation=synthetic_n_validation, synthetic_seed=synthetic_seed,
    )  # fmt: skip
    n_src, n_src_val = len(cols["train"]), len(cols["validation"])
    if n_src_val == 0:
        raise DataError(f"the validation split of the {source} source holds no stories")
    validation_from = {"local": f"dataset.local.validation ({local_validation})",
                       "hub": f"the hub's {hub_id}"}.get(source, f"the {source} source")
    source_of = {"local": {"train": f"dataset.local.train ({local_train})",
                           "validation": validation_from},
                 "hub": {s: f"the {s} split of the hub's {hub_id}" for s in ("train", "validation")}
                 }.get(source, {s: f"the {s} split of the {source} source" for s in ("train", "validation")})
    n_test, n_train, n_val = split_counts(n_src, n_src_val, test_n, train_n, validation_n, validation_from)
    perm = np.random.default_rng(seed).permutation(n_src)
    dtype = np.int32 if n_src < 2**31 else np.int64
    col_of = {"test": cols["train"], "train": cols["train"], "validation": cols["validation"]}
    order = {"validation": np.arange(n_val, dtype=dtype)}
    # Real story files repeat stories (a copy in the train file, or a validation file drawn from the same
    # pool). The test split takes the first n_test of the shuffled order that are not in validation, so
    # the two held-out splits measure different stories; a story of either is never trained on.
    in_validation = {_story_key(s) for s in _take(col_of["validation"], order["validation"])}
    in_validation.discard(None)
    test_kept: list[int] = []
    test_left_out = [0]
    for _ in _not_held_out(_take(cols["train"], perm, batch=max(n_test, 1024)), perm, in_validation, n_test,
                           test_kept, test_left_out):
        pass
    if not test_kept:
        raise DataError(
            f"every story of {source_of['train']} is also in {source_of['validation']}: no story is left for the test "
            "and train splits; give a train file that holds stories of its own"
        )
    # train's candidates: the shuffled order after the last test story (the validation copies among
    # them are skipped below with the other held-out stories)
    next_pos = len(test_kept) + test_left_out[0]
    order["test"] = np.asarray(test_kept, dtype=dtype)
    order["train"] = perm[next_pos:].astype(dtype)
    n_train = min(n_train, len(order["train"]))  # the stories the test split skipped are no candidates
    if test_left_out[0]:
        log.warning("the test split skipped %d stories of the train source that are also in the validation "
                    "split (the source repeats them)", test_left_out[0])  # fmt: skip
    held_out = in_validation | {_story_key(s) for s in _take(col_of["test"], order["test"])}
    held_out.discard(None)
    train_kept: list[int] = []
    left_out = [0]
    log.info("splits: train %d, validation %d, test %d stories (source: %d train, %d validation)",
             n_train, n_val, n_test, n_src, n_src_val)  # fmt: skip

    files, splits = {}, {}
    with contextlib.ExitStack() as stack:  # every output is renamed into place only at the end
        for split in ("validation", "test", "train"):
            progress = Progress(f"writing {split}.txt", total=n_train if split == "train" else len(order[split]),
                                unit="stories")
            tmp = stack.enter_context(atomic_path(out_dir / f"{split}.txt"))
            # a story is named by its place among the input's stories, not in the shuffled order
            src = source_of["validation" if split == "validation" else "train"]
            stories = _take(col_of[split], order[split])
            if split == "train":
                stories = _not_held_out(stories, order["train"], held_out, n_train, train_kept, left_out)
            try:
                info = _write_story_file(tmp, _counted(stories, progress),
                                         name_story=lambda i, split=split, src=src:
                                         f"{src}: story {(train_kept if split == 'train' else order[split])[i]}")
            except DataError as e:
                # nothing left but held-out copies: left out here, or skipped by the test split before the
                # last story it took (then train has no candidate at all)
                if split == "train" and not train_kept and (left_out[0] or not len(order["train"])):
                    raise DataError(
                        f"every story of {source_of['train']} but the test split's {len(order['test'])} is also in "
                        "the test or validation split: no story is left to train on; give a train file that holds "
                        "more stories of its own"
                    ) from None
                raise DataError(f"cannot write the {split} split: {e}") from None
            if split == "train":
                order["train"] = np.asarray(train_kept, dtype=dtype)
                if left_out[0]:
                    log.warning("left %d stories out of the train split: they are also in the test or validation "
                                "split (the source repeats them)", left_out[0])
            # the index files list what was written: a source's empty stories are not
            order[split] = np.delete(order[split], info["skipped"])
            progress.close()
            splits[split] = {"stories": info["stories"], "bytes": info["bytes"]}
            files[f"{split}.txt"] = {"sha256": info["sha256"], "bytes": info["bytes"]}
            if seq_len is not None and (short := split_short_of_a_row(split, splits[split], seq_len, more_stories(
                    split, source=source, test_n=test_n, train_n=train_n, validation_n=validation_n,
                    source_stories={"train": n_src, "validation": n_src_val}))):
                raise ConfigError(short)
        # meta.json lists them as ever
        splits = {split: splits[split] for split in ("train", "validation", "test")}
        files = {f"{split}.txt": files[f"{split}.txt"] for split in splits}
        for split in ("test", "train"):
            name = f"{split}_indices.npy"
            tmp = stack.enter_context(atomic_path(out_dir / name))
            with open(tmp, "wb") as f:
                np.save(f, order[split])
            files[name] = {"sha256": sha256_file(tmp), "bytes": tmp.stat().st_size}
        meta = {
            **({"params": params} if params is not None else {}),
            "source": source,
            **desc,
            "seed": seed,
            "test_n": test_n,
            "train_n": train_n,
            "validation_n": validation_n,
            "source_stories": {"train": n_src, "validation": n_src_val},
            "splits": splits,
            "test_left_out": {"in_validation": test_left_out[0]},
            "train_left_out": {"in_test_or_validation": left_out[0]},
            "indices": {
                "test": "test_indices.npy",
                "train": "train_indices.npy",
                "note": "positions in the source's train split, in the order the stories are written",
            },
            "seconds": round(time.perf_counter() - t0, 2),
            "files": files,
        }
        write_json(stack.enter_context(atomic_path(out_dir / "meta.json")), meta)
    return meta


def _as_written(story: str | None) -> str:
    """A story as _write_story_file writes it: stripped, line endings as \n ("" for an empty one)."""
    story = (story or "").strip()
    if "\r" in story:
        story = story.replace("\r\n", "\n").replace("\r", "\n")
    return story


def _story_key(story: str | None) -> bytes | None:
    """A story as written (_as_written), hashed; None for an empty one. The readers refuse text UTF-8
    cannot hold (_story_of), so it encodes as the story file's bytes do."""
    story = _as_written(story)
    return hashlib.blake2b(story.encode(), digest_size=16).digest() if story else None


def _not_held_out(stories: Iterable[str | None], indices: np.ndarray, held_out: set, n: int, kept: list[int],
                  left_out: list[int]) -> Iterator[str | None]:
    """The first `n` of `stories` (at `indices` of the source) whose key is not in `held_out`; their
    indices are appended to `kept`, and left_out[0] counts those left out."""
    for i, story in zip(indices, stories, strict=True):
        if len(kept) >= n:
            return
        if held_out and _story_key(story) in held_out:
            left_out[0] += 1
            continue
        kept.append(int(i))
        yield story


def _counted(stories: Iterable[str], progress: Progress) -> Iterator[str]:
    for s in stories:
        progress.update(1)
        yield s
