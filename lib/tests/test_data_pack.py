"""Packing: <bos> story <eos> rows, the round trip back to text, dtypes, and every check on open."""

import json
import re
import shutil

import numpy as np
import pytest

from tinylm.data import (
    check_token_ids,
    choose_dtype,
    load_tokenizer,
    open_packed,
    pack_split,
    read_stories,
    workers,
    write_stories,
)
from tinylm.errors import ConfigError, DataError
from tinylm.io import sha256_file


def stories_of(flat: np.ndarray, bos: int, eos: int) -> list[list[int]]:
    """Token ids between each <bos> and the following <eos>."""
    starts, ends = np.flatnonzero(flat == bos), np.flatnonzero(flat == eos)
    return [flat[s + 1 : e].tolist() for s, e in zip(starts, ends, strict=False)]


def test_round_trip_one_bos_per_story_with_newlines_and_blank_lines(
    tiny_tokenizer_dir, tiny_corpus, tricky_stories, tmp_path
):
    stories = (
        tricky_stories + tiny_corpus[:40]
    )  # blank lines, odd whitespace, "<bos>" typed as text
    write_stories(tmp_path / "s.txt", stories)
    tok_path = tiny_tokenizer_dir / "tokenizer.json"
    meta = pack_split(
        tmp_path / "s.txt", tok_path, tmp_path / "s.bin", seq_len=1
    )  # rows of 2: tail <= 1 token
    flat = np.asarray(open_packed(tmp_path / "s.bin")).reshape(-1)
    assert (flat == meta["bos_id"]).sum() == len(stories) == meta["n_stories"]
    assert (flat == meta["eos_id"]).sum() >= len(stories) - 1
    tok = load_tokenizer(tok_path)
    decoded = [
        tok.decode(ids, skip_special_tokens=False)
        for ids in stories_of(flat, meta["bos_id"], meta["eos_id"])
    ]
    assert decoded == stories[: len(decoded)] and len(decoded) >= len(stories) - 1


def test_packed_tokens_match_per_story_encoding(tiny_raw, tiny_tokenizer_dir, tiny_packed):
    tok = load_tokenizer(tiny_tokenizer_dir / "tokenizer.json")
    tok.encode_special_tokens = True
    ref = []
    for s in read_stories(tiny_raw[0] / "validation.txt"):
        ref += [1, *tok.encode(s, add_special_tokens=False).ids, 2]
    rows = open_packed(tiny_packed["validation"])
    assert rows.shape == (len(ref) // 33, 33)
    assert np.array_equal(np.asarray(rows).reshape(-1), ref[: rows.size])


def test_meta_records_shape_counts_and_hashes(tiny_packed, tiny_tokenizer_dir):
    bin_path = tiny_packed["train"]
    meta = json.loads(bin_path.with_suffix(".meta.json").read_text())
    rows, row_len = meta["shape"]
    assert (
        row_len == 33
        and meta["seq_len"] == 32
        and meta["dtype"] == "uint16"
        and meta["vocab_size"] == 512
    )
    assert (
        meta["n_tokens"] == rows * row_len + meta["tokens_dropped"]
        and 0 <= meta["tokens_dropped"] < row_len
    )
    assert meta["n_stories"] == 540
    assert meta["tokenizer_sha256"] == sha256_file(tiny_tokenizer_dir / "tokenizer.json")
    assert meta["files"]["train.bin"] == {
        "sha256": sha256_file(bin_path),
        "bytes": bin_path.stat().st_size,
    }
    assert bin_path.stat().st_size == rows * row_len * 2


def test_memmap_rows_give_inputs_and_targets_shifted_by_one(tiny_packed):
    rows = open_packed(tiny_packed["train"])
    assert isinstance(rows, np.memmap) and rows.dtype == np.uint16 and not rows.flags.writeable
    x, y = rows[:, :-1], rows[:, 1:]
    assert x.shape == y.shape == (rows.shape[0], 32)
    assert np.array_equal(x[:, 1:], y[:, :-1])
    flat = np.asarray(rows).reshape(-1)  # consecutive rows continue the token stream
    assert np.array_equal(rows[1], flat[33:66])


def test_dtype_choice():
    assert choose_dtype(8192) == np.uint16 and choose_dtype(65536) == np.uint16
    assert choose_dtype(65537) == np.int32 and choose_dtype(8192, "int32") == np.int32
    with pytest.raises(ConfigError, match="packing.dtype = uint16 cannot hold 70000"):
        choose_dtype(70000, "uint16")
    with pytest.raises(ConfigError, match="packing.dtype = 'int8'"):
        choose_dtype(100, "int8")


def test_int32_when_asked_holds_the_same_ids(tiny_raw, tiny_tokenizer_dir, tiny_packed, tmp_path):
    meta = pack_split(tiny_raw[0] / "validation.txt", tiny_tokenizer_dir / "tokenizer.json", tmp_path / "v.bin",
                      seq_len=32, dtype="int32")  # fmt: skip
    rows = open_packed(tmp_path / "v.bin")
    assert meta["dtype"] == "int32" and rows.dtype == np.int32
    assert (tmp_path / "v.bin").stat().st_size == rows.size * 4
    assert np.array_equal(rows, open_packed(tiny_packed["validation"]))


def test_worker_processes_write_the_same_file(tiny_raw, tiny_tokenizer_dir, tiny_packed, tmp_path, monkeypatch):
    """Batches of 50 stories, in this process or in workers, make the file tiny_packed made from one batch
    of all 540: a row goes on across batches, with no token dropped or repeated at their seams."""
    text, tok = tiny_raw[0] / "train.txt", tiny_tokenizer_dir / "tokenizer.json"
    one = pack_split(text, tok, tmp_path / "one.bin", seq_len=32, encode_batch=50)
    monkeypatch.setattr(workers, "PARALLEL_MIN_BYTES", 0)
    two = pack_split(text, tok, tmp_path / "two.bin", seq_len=32, encode_batch=50, workers=2)
    whole = json.loads(tiny_packed["train"].with_suffix(".meta.json").read_text())["files"]["train.bin"]
    assert one["files"]["one.bin"] == two["files"]["two.bin"] == whole


def test_packing_again_on_a_slower_machine_writes_the_same_meta_file(tiny_raw, tiny_tokenizer_dir, tmp_path,
                                                                    monkeypatch):
    """The .meta.json files are inputs of train_model and evaluate_model, and Snakemake compares a file
    under 1 MB by its content: data rebuilt the same must leave them byte for byte as they were, or every
    run of every config reading that data trains again. So they hold nothing the clock decides."""
    import itertools
    import time

    text, tok = tiny_raw[0] / "validation.txt", tiny_tokenizer_dir / "tokenizer.json"
    first, second = tmp_path / "first" / "validation.bin", tmp_path / "second" / "validation.bin"
    pack_split(text, tok, first, seq_len=32)
    clock = itertools.count(time.perf_counter(), 7.5)  # every reading 7.5 s after the last
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    pack_split(text, tok, second, seq_len=32)
    monkeypatch.undo()
    assert first.read_bytes() == second.read_bytes()
    assert first.with_suffix(".meta.json").read_bytes() == second.with_suffix(".meta.json").read_bytes()


def test_truncated_bin_is_refused_naming_the_file(tiny_packed, tmp_path):
    shutil.copy(tiny_packed["test"], tmp_path / "test.bin")
    shutil.copy(tiny_packed["test"].with_suffix(".meta.json"), tmp_path / "test.meta.json")
    with open(tmp_path / "test.bin", "r+b") as f:
        f.truncate((tmp_path / "test.bin").stat().st_size - 2)
    with pytest.raises(
        DataError, match=r"test\.bin: \d+ bytes, but test\.meta\.json says .*rebuild"
    ):
        open_packed(tmp_path / "test.bin")
    (tmp_path / "test.meta.json").unlink()
    with pytest.raises(DataError, match=r"test\.bin: its meta file test\.meta\.json is missing"):
        open_packed(tmp_path / "test.bin")


@pytest.mark.parametrize("shape", [[0, 17], [3, 1], [-1, 17], [2.5, 17], [True, 17]])
def test_a_meta_shape_no_packing_writes_is_refused_naming_the_file(tiny_packed, tmp_path, shape):
    """Packing writes at least one row of at least two tokens; an empty split opened as one scored a
    perfect loss (0.0, perplexity 1) in `tinylm evaluate`."""
    meta = json.loads(tiny_packed["test"].with_suffix(".meta.json").read_text())
    meta["shape"] = shape
    (tmp_path / "test.meta.json").write_text(json.dumps(meta))
    (tmp_path / "test.bin").write_bytes(b"")
    with pytest.raises(DataError, match=rf"test\.meta\.json: shape {re.escape(json.dumps(shape))} is no packed split's "
                                        r"\(rows >= 1 of >= 2 tokens\); rebuild it with the pack_tokens rule"):
        open_packed(tmp_path / "test.bin")


def test_other_tokenizer_is_refused_naming_the_file(tiny_packed):
    with pytest.raises(
        DataError,
        match=r"test\.bin: packed with tokenizer sha256 \w+, but the tokenizer given has sha256 abc",
    ):
        open_packed(tiny_packed["test"], tokenizer_sha256="abc")
    with pytest.raises(DataError, match="vocabulary of 512 tokens, more than vocab_size = 511"):
        open_packed(tiny_packed["test"], vocab_size=511)
    open_packed(tiny_packed["test"], vocab_size=512)


def edited_tokenizer_dir(tiny_tokenizer_dir, dest):
    """A copy of the tiny tokenizer whose tokenizer.json was edited after training, still valid JSON."""
    shutil.copytree(tiny_tokenizer_dir, dest)
    tok = json.loads((dest / "tokenizer.json").read_text())
    tok["model"]["merges"] = tok["model"]["merges"][:-1]
    (dest / "tokenizer.json").write_text(json.dumps(tok))
    return dest


def test_an_edited_tokenizer_is_refused_before_packing(tiny_raw, tiny_tokenizer_dir, tmp_path):
    tok_dir = edited_tokenizer_dir(tiny_tokenizer_dir, tmp_path / "tok")
    with pytest.raises(DataError, match=r"tok/tokenizer\.json: sha256 \w+ differs from .*tokenizer_meta\.json.*"
                                        r"train_tokenizer") as e:
        pack_split(tiny_raw[0] / "validation.txt", tok_dir / "tokenizer.json", tmp_path / "out" / "v.bin", seq_len=8)
    assert "delete" in str(e.value)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_ids_beyond_the_vocabulary_are_refused(tiny_packed):
    rows = open_packed(tiny_packed["train"])
    check_token_ids(rows, 512, tiny_packed["train"])
    with pytest.raises(
        DataError, match=r"train\.bin: token id \d+ is outside the model's vocab_size 300"
    ):
        check_token_ids(rows, 300, tiny_packed["train"])
    top = int(np.asarray(rows).max())
    check_token_ids(rows, top + 1, tiny_packed["train"])
    with pytest.raises(DataError, match=rf"train\.bin: token id {top} is outside the model's vocab_size {top}"):
        check_token_ids(rows, top, tiny_packed["train"])  # one past the edge
    damaged = np.asarray(rows, dtype=np.int32).copy()
    damaged[3, 5] = -1  # an int32 split can hold what no tokenizer makes
    with pytest.raises(DataError, match=r"train\.bin: token id -1 is outside"):
        check_token_ids(damaged, 512, tiny_packed["train"])


@pytest.mark.parametrize(
    ("seq_len", "error", "match"),
    [(0, ConfigError, "packing.seq_len = 0"), (-3, ConfigError, "packing.seq_len = -3"),
     (100_000, DataError, r"validation\.txt: \d+ tokens make no complete row of packing.seq_len \+ 1 = 100001")],
)  # fmt: skip
def test_bad_seq_len_writes_nothing(tiny_raw, tiny_tokenizer_dir, tmp_path, seq_len, error, match):
    with pytest.raises(error, match=match):
        pack_split(tiny_raw[0] / "validation.txt", tiny_tokenizer_dir / "tokenizer.json", tmp_path / "out" / "v.bin",
                   seq_len=seq_len)  # fmt: skip
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_the_raw_splits_bound_on_tokens_is_what_a_tokenizer_without_merges_packs(tricky_stories, tmp_path):
    """prepare_raw refuses a split whose bound on packed tokens (bytes + <bos> and <eos> per story) is
    short of a row. A tokenizer of single bytes reaches the bound exactly, odd text included: one token
    less and such a split may still fill a row, so the check never refuses one that could."""
    from tinylm.data import prepare_raw, train_tokenizer
    from tinylm.data.sources import max_packed_tokens

    # train and test stories each longer than the whole validation split: it alone is short of a row below
    write_stories(tmp_path / "train.txt", [f"Story {i}: {' '.join(tricky_stories * 2)}" for i in range(20)])
    write_stories(tmp_path / "valid.txt", tricky_stories)
    kw = dict(source="local", local_train=str(tmp_path / "train.txt"), local_validation=str(tmp_path / "valid.txt"),
              seed=1, test_n=1, train_n=None, validation_n=None)  # fmt: skip
    meta = prepare_raw(tmp_path / "raw", **kw)
    bound = max_packed_tokens(meta["splits"]["validation"])
    train_tokenizer(tmp_path / "raw" / "train.txt", tmp_path / "tok", vocab_size=256 + 4,
                    special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"], min_frequency=2)  # fmt: skip
    packed = pack_split(tmp_path / "raw" / "validation.txt", tmp_path / "tok" / "tokenizer.json", tmp_path / "v.bin",
                        seq_len=bound - 1)  # fmt: skip
    assert packed["n_tokens"] == bound and packed["shape"] == [1, bound]
    prepare_raw(tmp_path / "fits", **kw, seq_len=bound - 1)
    with pytest.raises(ConfigError, match=rf"the validation split would hold {len(tricky_stories)} stories of at most "
                                          rf"{bound} tokens"):
        prepare_raw(tmp_path / "short", **kw, seq_len=bound)


def test_missing_inputs_write_nothing(tiny_raw, tiny_tokenizer_dir, tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt: input file not found"):
        pack_split(
            tmp_path / "nope.txt",
            tiny_tokenizer_dir / "tokenizer.json",
            tmp_path / "out" / "v.bin",
            seq_len=8,
        )
    with pytest.raises(DataError, match=r"tokenizer\.json: tokenizer not found"):
        pack_split(
            tiny_raw[0] / "validation.txt",
            tmp_path / "tokenizer.json",
            tmp_path / "out" / "v.bin",
            seq_len=8,
        )
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_unit_encoder_equals_encoding_each_story(tiny_tokenizer_dir, random_stories, tiny_corpus):
    from tinylm.data.pack import UnitEncoder

    tok = load_tokenizer(tiny_tokenizer_dir / "tokenizer.json")
    tok.encode_special_tokens = True
    encoder = UnitEncoder(
        load_tokenizer(tiny_tokenizer_dir / "tokenizer.json"), np.dtype(np.uint16)
    )
    stories = random_stories + tiny_corpus[:100]
    for batch in (stories[:250], stories[250:], stories[::7]):  # the key table carries over batches
        ref = [i for s in batch for i in (1, *tok.encode(s, add_special_tokens=False).ids, 2)]
        assert encoder.encode(batch).tolist() == ref


def test_a_tokenizer_whose_ids_have_gaps_is_packed_in_a_dtype_that_holds_its_largest(tmp_path):
    """A tokenizer.json made elsewhere may number its tokens with gaps; the packed dtype followed the
    number of tokens (uint16 for 6) and the write overflowed on id 70,000."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tinylm.data.tokenizer import token_byte_lengths

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, "hello": 70000, "world": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<bos>", "<eos>", "<unk>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    write_stories(tmp_path / "s.txt", ["hello world", "world hello hello"])
    meta = pack_split(tmp_path / "s.txt", tmp_path / "tokenizer.json", tmp_path / "s.bin", seq_len=4)
    assert meta["dtype"] == "int32" and meta["vocab_size"] == 70001
    rows = open_packed(tmp_path / "s.bin")
    assert np.asarray(rows).ravel()[:5].tolist() == [1, 70000, 5, 2, 1]
    assert len(token_byte_lengths(tok)) == 70001
