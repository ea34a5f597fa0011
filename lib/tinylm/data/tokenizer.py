"""Byte-level BPE: training on the train split, loading with a sha256 check, per-token byte lengths.

Training writes the same tokenizer.json as `tokenizers`' own BpeTrainer fed one story at a time
(the tests check this on adversarial text too), several times faster on the same cores:

* Stories are cut into units: a run of whitespace and the run of non-whitespace after it. The
  byte-level pre-tokenizer (the GPT-2 regex) never puts a non-whitespace character and the
  whitespace after it into one pre-token, and looks one character ahead at most, so every unit
  boundary is a pre-token boundary: a unit pre-tokenized alone gives the pre-tokens it has in its
  story. Most stories are cut with `str.split(" ")` (`_kinds` says when that is exact), the
  others with UNIT_RE.
* Units repeat a lot: worker processes count them (Python's C split, regex and Counter), and only
  the distinct ones go through the Rust pre-tokenizer.
* The merges are learned from the pre-token counts with the BpeTrainer's own algorithm
  (`_learn_bpe`): same priority queue, same tie-breaking, same token ids.

Packing (pack.py) cuts stories the same way and encodes each distinct unit once.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import itertools
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from ..io import atomic_path, read_json, sha256_file, write_json
from .progress import Progress
from .sources import iter_story_batches
from .workers import n_workers, parallel_map

log = logging.getLogger("tinylm.data")

# Whitespace as the pre-tokenizer's regex sees it (Unicode White_Space): Python's \s also holds
# \x1c-\x1f, which the pre-tokenizer treats as punctuation.
_WS, _NOT_WS = r"[^\S\x1c-\x1f]", r"[\S\x1c-\x1f]"
UNIT_RE = re.compile(f"{_WS}*{_NOT_WS}+|{_WS}+")  # unit boundaries are pre-token boundaries
N_BYTE_TOKENS = 256


# A batch of stories becomes a list of keys, each standing for a piece of text:
EOS_KEY = "\x1f"  # the end of a story: <eos>
BOS_KEY = "\x1e"  # BOS_KEY + t: the start of a story (<bos>) and its first unit t
VERBATIM = "\x1d"  # VERBATIM + t: the unit t as it is
#                    t (no marker): " " + t, a unit after a single space (nearly every key)
_MARKERS = (EOS_KEY, BOS_KEY, VERBATIM)
_WS_SPACE_WS = re.compile(f"{_WS} {_WS}")
_ASCII_WS = np.zeros(256, dtype=bool)
_ASCII_WS[[9, 10, 11, 12, 13, 32]] = True


def _kinds(stories: list[str]) -> np.ndarray:
    """Per story: 0 ASCII and plain, 1 plain with other characters, 2 not plain.

    Plain means that cutting at every space (`str.split(" ")`) cuts only between units. A
    whitespace run W before a word is pre-tokenized as W[:-1] and then W[-1] with the word (or
    alone): cuts at W's first or last character keep W[:-1] whole, a cut inside splits it. So a
    story is plain unless a space has whitespace on both sides (or it holds a key marker).
    """
    is_ascii = np.fromiter(map(str.isascii, stories), dtype=bool, count=len(stories))
    kinds = np.where(is_ascii, 0, 1).astype(np.int8)
    ascii_rows = np.flatnonzero(is_ascii)
    if len(ascii_rows):  # all ASCII stories at once, as bytes
        text = [stories[i] for i in ascii_rows]
        data = np.frombuffer("\n".join(text).encode("ascii"), dtype=np.uint8)
        ws = _ASCII_WS[data]
        bad = np.flatnonzero(ws[:-2] & (data[1:-1] == 32) & ws[2:]) + 1
        bad = np.concatenate([bad, np.flatnonzero((data >= 0x1D) & (data <= 0x1F))])
        if len(bad):
            ends = np.cumsum(np.fromiter(map(len, text), dtype=np.int64, count=len(text)) + 1)
            kinds[ascii_rows[np.searchsorted(ends, bad, side="right")]] = 2
    for i in np.flatnonzero(~is_ascii):  # a few percent of stories
        s = stories[i]
        if _WS_SPACE_WS.search(s) or any(m in s for m in _MARKERS):
            kinds[i] = 2
    return kinds


def _split_run(stories: list[str]) -> list[str]:
    # "\x1eOnce upon ... end. \x1f \x1eThe next ... day. \x1f" -> ["\x1eOnce", "upon", ..., "\x1f", ...]
    return (BOS_KEY + f" {EOS_KEY} {BOS_KEY}".join(stories) + " " + EOS_KEY).split(" ")


def batch_keys(stories: Sequence[str]) -> list[str]:
    """The keys of a batch of stories, in order: plain stories by `str.split`, the rest by UNIT_RE."""
    stories = list(stories)
    keys: list[str] = []
    start = 0  # runs of plain ASCII stories are split together: one non-ASCII character would
    # make the joined text (and splitting it) wider and slower
    for i in np.flatnonzero(kinds := _kinds(stories)):
        if i > start:
            keys += _split_run(stories[start:i])
        if kinds[i] == 1:
            keys += _split_run([stories[i]])
        else:
            first, *rest = UNIT_RE.findall(stories[i])
            keys.append(BOS_KEY + first)
            keys += [VERBATIM + u for u in rest]
            keys.append(EOS_KEY)
        start = i + 1
    if start < len(stories):
        keys += _split_run(stories[start:])
    return keys


def key_text(key: str) -> tuple[str | None, str]:
    """(special token before the text or None, the text) a key stands for."""
    if key == EOS_KEY:
        return "<eos>", ""
    if key[:1] == BOS_KEY:
        return "<bos>", key[1:]
    if key[:1] == VERBATIM:
        return None, key[1:]
    return None, " " + key


def count_units(stories: Sequence[str]) -> tuple[collections.Counter, int, int]:
    """(unit -> count, stories, characters) of a batch of stories."""
    units: collections.Counter = collections.Counter()
    for key, n in collections.Counter(batch_keys(stories)).items():
        text = key_text(key)[1]
        if text:
            units[text] += n
    return units, len(stories), sum(map(len, stories))


def byte_level_pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _pre_token_counts(unit_counts: dict[str, int]) -> dict[str, int]:
    """Counts of byte-level pre-tokens (e.g. 'Ġtime') from counts of units (e.g. ' time,')."""
    pre = byte_level_pre_tokenizer().pre_tokenize_str
    words: collections.Counter = collections.Counter()
    for unit, n in unit_counts.items():
        for w, _ in pre(unit):
            words[w] += n
    return words


def _learn_bpe(
    word_counts: dict[str, int], vocab_size: int, special_tokens: Sequence[str], min_frequency: int
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) exactly as tokenizers' BpeTrainer.do_train computes them from word counts.

    Ids: special tokens, then the byte alphabet in code point order, then merges. The most frequent
    pair is merged first; ties go to the smallest (left id, right id). Queue entries carry the set
    of words to update and are re-queued when their count went stale, as in the Rust original.
    """
    from tokenizers import pre_tokenizers

    id_to_word: list[str] = []
    word_to_id: dict[str, int] = {}
    for t in special_tokens:
        if t not in word_to_id:
            word_to_id[t] = len(id_to_word)
            id_to_word.append(t)
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    for w in word_counts:
        alphabet.update(w)
    for ch in sorted(alphabet):
        if ch not in word_to_id:
            word_to_id[ch] = len(id_to_word)
            id_to_word.append(ch)

    words = [[word_to_id[c] for c in w] for w in word_counts]
    counts = list(word_counts.values())
    pair_counts: collections.defaultdict = collections.defaultdict(int)
    where: collections.defaultdict = collections.defaultdict(set)
    for i, (w, c) in enumerate(zip(words, counts, strict=True)):
        for p in itertools.pairwise(w):
            pair_counts[p] += c
            where[p].add(i)
    seq = itertools.count()
    heap = [(-pair_counts[p], p, next(seq), pos) for p, pos in where.items() if pair_counts[p] > 0]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    while len(word_to_id) < vocab_size and heap:
        neg, pair, order, pos = heapq.heappop(heap)
        count = pair_counts[pair]
        if -neg != count:
            heapq.heappush(heap, (-count, pair, order, pos))
            continue
        if count < 1 or min_frequency > count:
            break
        a, b = pair
        token = id_to_word[a] + id_to_word[b]
        new = word_to_id.get(token)
        if new is None:
            new = word_to_id[token] = len(id_to_word)
            id_to_word.append(token)
        merges.append(pair)
        grown: collections.defaultdict = collections.defaultdict(set)  # new pair -> words to update
        for i in pos:
            w, c = words[i], counts[i]
            j = 0
            while j < len(w):
                if w[j] == a and j + 1 < len(w) and w[j + 1] == b:
                    if j > 0:
                        prev = w[j - 1]
                        pair_counts[(prev, a)] -= c
                        pair_counts[(prev, new)] += c
                        grown[(prev, new)].add(i)
                    w[j : j + 2] = (new,)
                    if j < len(w) - 1:
                        nxt = w[j + 1]
                        pair_counts[(b, nxt)] -= c
                        pair_counts[(new, nxt)] += c
                        grown[(new, nxt)].add(i)
                j += 1
        for p, ws in grown.items():
            if (n := pair_counts[p]) > 0:
                heapq.heappush(heap, (-n, p, next(seq), ws))
    return word_to_id, [(id_to_word[a], id_to_word[b]) for a, b in merges]


def bpe_trainer_tokenizer(stories: Iterable[str], *, vocab_size: int, special_tokens: Sequence[str],
                          min_frequency: int):
    """The same byte-level BPE trained by `tokenizers`' own BpeTrainer, one story at a time.

    train_tokenizer writes the tokenizer.json this one would; the tests compare the two, and the data
    benchmark times this one as the plain-library baseline.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(stories, trainer=trainer)
    return tok


def build_tokenizer(
    vocab: dict[str, int], merges: list[tuple[str, str]], special_tokens: Sequence[str]
):
    """A `tokenizers.Tokenizer`: byte-level BPE with the given vocabulary and merges."""
    from tokenizers import Tokenizer, decoders, models

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = byte_level_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(special_tokens))
    return tok


def check_tokenizer_config(
    vocab_size: int, special_tokens: Sequence[str], min_frequency: int
) -> None:
    specials = list(special_tokens)
    if len(set(specials)) != len(specials):
        raise ConfigError(f"tokenizer.special_tokens = {specials} holds a token twice")
    missing = [t for t in ("<bos>", "<eos>") if t not in specials]
    if missing:
        raise ConfigError(
            f"tokenizer.special_tokens = {specials} lacks {', '.join(missing)}; packing needs both (it wraps "
            f"each story in <bos> ... <eos>)"
        )
    if not isinstance(vocab_size, int) or vocab_size < N_BYTE_TOKENS + len(specials):
        raise ConfigError(
            f"tokenizer.vocab_size = {vocab_size} is too small: it must hold the {N_BYTE_TOKENS} byte "
            f"tokens and the {len(specials)} special tokens, so at least {N_BYTE_TOKENS + len(specials)}"
        )
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ConfigError(
            f"tokenizer.min_frequency = {min_frequency!r}; it must be an integer >= 1"
        )


def train_tokenizer(
    train_txt: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    vocab_size: int,
    special_tokens: Sequence[str],
    min_frequency: int,
    workers: int | None = None,
    params: dict | None = None,
) -> dict:
    """Train a byte-level BPE on the stories of `train_txt`; write tokenizer.json and tokenizer_meta.json
    (with `params`, the rule's parameters, as "params": tinylm.workflow.check_data_settings reads them).

    `special_tokens` get ids 0.. in order. Returns the meta dict. `workers`: processes for counting
    (default: `cpu_budget()`; a text under 32 MB is counted in this process, workers.n_workers).
    """
    check_tokenizer_config(vocab_size, special_tokens, min_frequency)
    train_txt, out_dir = Path(train_txt), Path(out_dir)
    t0 = time.perf_counter()
    size = train_txt.stat().st_size if train_txt.is_file() else 0
    workers = n_workers(workers, size)
    progress = Progress(f"tokenizer: counting words in {train_txt.name}", total=size / 1e6)
    units: collections.Counter = collections.Counter()
    n_stories = 0
    text_sha = hashlib.sha256()
    batches = iter_story_batches(train_txt, batch_size=8192, digest=text_sha)
    for counts, n, nchars in parallel_map(count_units, batches, workers=workers):
        units.update(counts)
        n_stories += n
        progress.update(nchars / 1e6)
    progress.close()
    t_count = time.perf_counter()
    words = _pre_token_counts(units)
    log.info(
        "tokenizer: %d distinct units, %d distinct pre-tokens; learning merges",
        len(units),
        len(words),
    )
    vocab, merges = _learn_bpe(words, vocab_size, special_tokens, min_frequency)
    tok = build_tokenizer(vocab, merges, special_tokens)
    t_merge = time.perf_counter()
    if tok.get_vocab_size() < vocab_size:
        log.warning(
            "tokenizer: only %d tokens (vocab_size %d): no pair occurs min_frequency = %d times any more",
            tok.get_vocab_size(), vocab_size, min_frequency,
        )  # fmt: skip
    # The meta is written (atomically) inside the tokenizer's block, so renamed just before it as ever; not
    # in a block of its own around the tokenizer's write, which named it for a disk the tokenizer filled.
    with atomic_path(out_dir / "tokenizer.json") as tmp_tok:
        tmp_tok.write_text(tok.to_str(pretty=True), encoding="utf-8")
        tok_sha = sha256_file(tmp_tok)
        meta = {
            **({"params": params} if params is not None else {}),
            "vocab_size": tok.get_vocab_size(),
            "vocab_size_requested": vocab_size,
            "min_frequency": min_frequency,
            "special_tokens": list(special_tokens),
            "special_ids": {t: tok.token_to_id(t) for t in special_tokens},
            "tokenizer_sha256": tok_sha,
            "train_text": {
                "path": str(train_txt),
                "sha256": text_sha.hexdigest(),
                "bytes": size,
                "stories": n_stories,
            },
            "distinct_units": len(units),
            "distinct_pre_tokens": len(words),
            "merges": len(merges),
            "seconds": {
                "count": round(t_count - t0, 2),
                "merges": round(t_merge - t_count, 2),
            },
            "files": {"tokenizer.json": {"sha256": tok_sha, "bytes": tmp_tok.stat().st_size}},
        }
        write_json(out_dir / "tokenizer_meta.json", meta)
    log.info(
        "tokenizer: %d tokens in %.1f s -> %s",
        tok.get_vocab_size(),
        time.perf_counter() - t0,
        out_dir,
    )
    return meta


def tokenizer_sha256(path: str | os.PathLike) -> str:
    """sha256 of tokenizer.json, which must be the one tokenizer_meta.json beside it (if any) records:
    a tokenizer edited after training is refused before anything is built with it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tokenizer not found; run the train_tokenizer rule first")
    sha, meta_file = sha256_file(path), path.with_name("tokenizer_meta.json")
    want = read_json(meta_file).get("tokenizer_sha256") if meta_file.is_file() else None
    if want is not None and sha != want:
        raise DataError(
            f"{path}: sha256 {sha} differs from {want}, the sha256 {meta_file} recorded when the "
            f"tokenizer was trained: the file was changed since. Rebuild the tokenizer: delete {path} "
            "(Snakemake then reruns train_tokenizer and what depends on it)"
        )
    return sha


def load_tokenizer(path: str | os.PathLike, expect_sha256: str | None = None):
    """Load tokenizer.json; with `expect_sha256`, refuse a file whose sha256 differs."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tokenizer not found; run the train_tokenizer rule first")
    if expect_sha256 is not None and (sha := sha256_file(path)) != expect_sha256:
        raise DataError(
            f"{path}: sha256 {sha} differs from {expect_sha256}, the tokenizer the data was packed "
            "(or the model trained) with; use that tokenizer or rebuild what depends on it"
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise DataError(f"{path}: not a valid tokenizer.json ({e}); delete it and retrain") from e


def special_ids(tokenizer_or_meta) -> dict[str, int]:
    """{special token: id} from a Tokenizer, a tokenizer_meta dict, or the path of either file."""
    if isinstance(tokenizer_or_meta, str | os.PathLike):
        path = Path(tokenizer_or_meta)
        if path.name.endswith("meta.json"):
            tokenizer_or_meta = read_json(path)
        else:
            tokenizer_or_meta = load_tokenizer(path)
    if isinstance(tokenizer_or_meta, dict):
        return dict(tokenizer_or_meta["special_ids"])
    added = tokenizer_or_meta.get_added_tokens_decoder()
    return {t.content: i for i, t in sorted(added.items()) if t.special}


def id_space(tokenizer) -> int:
    """One more than the largest token id: the vocabulary size for the tokenizers this project
    trains, more for one made elsewhere whose ids have gaps."""
    return max(tokenizer.get_vocab_size(), max(tokenizer.get_vocab().values(), default=-1) + 1)


def token_byte_lengths(tokenizer) -> np.ndarray:
    """int32 array: UTF-8 bytes each token id decodes to (special tokens: 0)."""
    from tokenizers import pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    specials = set(special_ids(tokenizer).values())
    out = np.zeros(id_space(tokenizer), dtype=np.int32)
    for token, i in tokenizer.get_vocab().items():
        if i in specials:
            continue
        # Byte-level tokens spell one byte per character; anything else is decoded.
        out[i] = len(token) if alphabet.issuperset(token) else len(tokenizer.decode([i]).encode())
    return out
