"""Story files (TinyStories text, JSON Lines, JSON, Parquet), the hub loader and the raw splits."""

import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tinylm.data import (
    EOT,
    dataset_kwargs,
    generate_stories,
    iter_stories,
    prepare_raw,
    read_stories,
    write_stories,
)
from tinylm.data.sources import split_counts
from tinylm.errors import ConfigError, DataError

CONFIG = Path(__file__).resolve().parents[2] / "config" / "config.yaml"

STORIES = [
    'Tom saw a dog.\n"Hello!" said Tom.\n\nThe dog wagged its tail.',
    "One line only.",
    "Lily   liked  spaces.\n \n  And odd\tlines. Ünïcödé, 日本, emoji 😀.",
    "A story with <bos> and <eos> typed in it, and <|endoftext|> inside a line.",
]


def synthetic_kwargs(**over):
    kw = dict(source="synthetic", synthetic_n_train=200, synthetic_n_validation=30, synthetic_seed=5,
              seed=42, test_n=20, train_n=None, validation_n=None)  # fmt: skip
    kw.update(over)
    return kw


def test_txt_round_trip_keeps_every_story_whole(tmp_path):
    info = write_stories(tmp_path / "s.txt", STORIES + ["  padded  \n", "", "   "])
    assert info["stories"] == 5
    text = (tmp_path / "s.txt").read_text()
    assert text.count(f"\n{EOT}\n") == 5
    assert list(read_stories(tmp_path / "s.txt")) == STORIES + ["padded"]


def test_txt_reader_tolerates_crlf_missing_final_newline_and_repeated_separators(tmp_path):
    p = tmp_path / "odd.txt"
    p.write_bytes(
        f"{EOT}\r\nfirst\r\nstory\r\n{EOT}\r\n{EOT}  \r\n\r\nsecond\n\nstory\n{EOT}".encode()
    )
    assert list(read_stories(p)) == ["first\nstory", "second\n\nstory"]


def test_jsonl_json_and_parquet_with_a_custom_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "s.jsonl").write_text(
        "".join(json.dumps({"story": s, "id": i}) + "\n\n" for i, s in enumerate(STORIES))
    )
    (tmp_path / "s.json").write_text(json.dumps([{"story": s} for s in STORIES]))
    pq.write_table(pa.table({"story": STORIES, "n": list(range(4))}), tmp_path / "s.parquet")
    for name in ("s.jsonl", "s.json", "s.parquet"):
        assert list(read_stories(tmp_path / name, text_column="story")) == STORIES, name


def test_records_without_text_are_skipped_with_a_warning_naming_the_file_and_count(tmp_path, caplog):
    """A null or blank text in a JSON Lines, JSON or Parquet record is not a story: skipped, and said
    (a column of nulls read as a smaller dataset without a word)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [STORIES[0], None, "  ", STORIES[1]]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "s.json").write_text(json.dumps([{"text": t} for t in texts]))
    pq.write_table(pa.table({"text": texts}), tmp_path / "s.parquet")
    for name in ("s.jsonl", "s.json", "s.parquet"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="tinylm.data"):
            assert list(read_stories(tmp_path / name)) == STORIES[:2], name
        assert f"{tmp_path / name}: 2 of 4 records have no text in 'text' (null or blank); skipped" in caplog.text, name
    caplog.clear()
    (tmp_path / "full.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in STORIES))
    with caplog.at_level("WARNING", logger="tinylm.data"):
        assert list(read_stories(tmp_path / "full.jsonl")) == STORIES
    assert "no text" not in caplog.text


@pytest.mark.parametrize("content", [b"", b"  \n\n", f"{EOT}\n{EOT}\n".encode()])
def test_empty_inputs_are_refused(tmp_path, content):
    p = tmp_path / "train.txt"
    p.write_bytes(content)
    with pytest.raises(DataError, match=str(p)):
        list(read_stories(p))


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="nope.txt: input file not found"):
        list(read_stories(tmp_path / "nope.txt"))
    (tmp_path / "stories").mkdir()
    with pytest.raises(DataError, match="stories: input file is a folder, not a file; name a file in it"):
        list(read_stories(tmp_path / "stories"))
    (tmp_path / "s.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"s\.csv: unknown format"):
        list(read_stories(tmp_path / "s.csv"))


def test_bad_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n\n{"text": "broken\n{"text": "never read"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: not valid JSON"):
        list(read_stories(p))


def test_a_json_story_with_half_a_character_names_file_and_line(tmp_path):
    """JSON may escape one half of a UTF-16 pair alone (text cut in the middle of an emoji): no UTF-8
    text holds it, and it failed later, in pyarrow or the writer, as a traceback naming no file."""
    p = tmp_path / "cut.jsonl"
    p.write_text('{"text": "a whole one: \\ud83d\\ude00"}\n')
    assert list(read_stories(p)) == ["a whole one: \U0001f600"]
    p.write_text('{"text": "fine"}\n{"text": "Tom saw a dog \\ud83d and ran."}\n')
    with pytest.raises(DataError, match=r"cut\.jsonl, line 2: field 'text' holds '\\ud83d' at character 14"):
        list(read_stories(p))
    p = tmp_path / "cut.json"
    p.write_text('[{"text": "fine"}, {"text": "a cut \\udc00"}]')
    with pytest.raises(DataError, match=r"cut\.json, record 1: field 'text' holds '\\udc00'"):
        list(read_stories(p))


def test_missing_text_column_names_the_column_and_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "s.jsonl").write_text('{"text": "a"}\n{"story": "b"}\n')
    with pytest.raises(
        DataError, match=r"s\.jsonl, line 2: no 'text' field \(found: story\).*dataset.text_column"
    ):
        list(read_stories(tmp_path / "s.jsonl"))
    pq.write_table(pa.table({"story": ["a"]}), tmp_path / "s.parquet")
    with pytest.raises(DataError, match=r"s\.parquet: no 'text' column \(found: story\)"):
        list(read_stories(tmp_path / "s.parquet"))


def test_a_jsonl_file_without_the_text_field_is_refused_before_any_work(tmp_path):
    """As a Parquet file without the column is: check_source_file (run before any job) reads the
    first record, and dataset.local.<split> names the file."""
    from tinylm.data.sources import check_local_file

    (tmp_path / "s.jsonl").write_text('\n{"story": "a"}\n' + '{"story": "b"}\n' * 1000)
    with pytest.raises(DataError, match=r"s\.jsonl, line 2: no 'text' field \(found: story\).*\(dataset\.local\.train\)"):
        check_local_file("train", str(tmp_path / "s.jsonl"))
    check_local_file("train", str(tmp_path / "s.jsonl"), text_column="story")


def test_a_parquet_text_column_of_numbers_names_the_file_and_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "s.parquet")
    with pytest.raises(DataError, match=r"s\.parquet: column 'text' holds int64, not text.*dataset\.text_column"):
        list(read_stories(tmp_path / "s.parquet"))


def test_a_large_txt_file_without_separators_is_refused(tmp_path):
    p = tmp_path / "validation.txt"
    p.write_text("Once upon a time there was a dog.\n\n" * 4000)  # 140 kB: many stories, no separator
    with pytest.raises(DataError, match=rf"validation\.txt: no line '{re.escape(EOT)}' in its \d+ bytes"):
        list(read_stories(p))
    # Separators inside lines are not separators: the file is still one story.
    p.write_text(f"A dog ran. {EOT} A cat sat.\n" * 4000)
    with pytest.raises(DataError, match=r"on a line of its own"):
        list(read_stories(p))
    # A small file holding one story without a separator is fine.
    p.write_text("Just one short story.\n")
    assert list(read_stories(p)) == ["Just one short story."]


def test_a_txt_file_whose_first_story_is_long_is_read_as_written(tmp_path):
    """A first story longer than the bytes the separator check reads first is still a story: the file
    write_stories wrote (a raw split of a source with a long story, say) reads back whole."""
    long = " ".join(f"word{i}." for i in range(12000))  # 95 kB, one story
    p = tmp_path / "train.txt"
    write_stories(p, [long, "Second story.", "Third."])
    assert list(read_stories(p)) == [long, "Second story.", "Third."]
    # A separator cut by where a read ends is found all the same.
    p.write_text("a" * ((1 << 20) - 3) + f"\n{EOT}\nlast\n")
    assert [len(s) for s in read_stories(p)] == [(1 << 20) - 3, 4]


def test_a_small_txt_file_of_paragraphs_without_separators_is_one_story_with_a_warning(tmp_path, caplog):
    """Too small to refuse (one long story is possible), but stories set apart by blank lines alone
    would quietly become one: the reader says so, once, naming the file and the separator."""
    p = tmp_path / "validation.txt"
    p.write_text("Tom had a red ball.\n\nSue saw a big cat.\n\nThe end.\n")
    with caplog.at_level(logging.WARNING, logger="tinylm.data"):
        assert len(list(read_stories(p))) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{p}: no line {EOT!r}, so its 50 bytes are read as one story; if it holds several "
                        f"stories, end each with a line holding only {EOT}"], warnings
    caplog.clear()
    p.write_text("Just one short story.\nOn two lines.\n")  # no blank line: nothing to suspect
    assert len(list(read_stories(p))) == 1 and not caplog.records


def test_a_story_holding_the_separator_line_is_refused_and_nothing_is_left(tmp_path):
    with pytest.raises(DataError, match=r"out\.txt: story 1 holds a line"):
        write_stories(tmp_path / "out.txt", ["fine", f"bad\n{EOT}\nstory"])
    assert list(tmp_path.iterdir()) == []


def test_synthetic_raw_splits_are_disjoint_deterministic_and_recorded(tiny_raw, tmp_path):
    out, meta = tiny_raw
    test_idx, train_idx = np.load(out / "test_indices.npy"), np.load(out / "train_indices.npy")
    assert len(test_idx) == 60 and len(train_idx) == 540
    assert not set(test_idx) & set(train_idx)
    assert np.array_equal(
        np.concatenate([test_idx, train_idx]), np.random.default_rng(42).permutation(600)
    )
    source = generate_stories(600, seed=7)
    assert list(read_stories(out / "test.txt")) == [source[i] for i in test_idx]  # shuffled order
    assert list(read_stories(out / "train.txt")) == [source[i] for i in train_idx]
    validation = list(read_stories(out / "validation.txt"))
    assert len(validation) == 60 and validation[0] == next(iter_stories("7-validation"))
    assert meta["splits"]["train"]["stories"] == 540 and meta["source_stories"] == {
        "train": 600,
        "validation": 60,
    }
    assert set(meta["files"]) == {
        "train.txt",
        "validation.txt",
        "test.txt",
        "test_indices.npy",
        "train_indices.npy",
    }
    again = prepare_raw(tmp_path, source="synthetic", synthetic_n_train=600, synthetic_n_validation=60,
                        synthetic_seed=7, seed=42, test_n=60, train_n=None, validation_n=None)  # fmt: skip
    assert again["files"] == meta["files"]


def test_train_n_and_validation_n_pick_the_first_stories(tmp_path):
    meta = prepare_raw(tmp_path, **synthetic_kwargs(train_n=50, validation_n=10))
    assert (
        meta["splits"]["train"]["stories"] == 50 and meta["splits"]["validation"]["stories"] == 10
    )
    idx = np.random.default_rng(42).permutation(200)
    assert np.array_equal(np.load(tmp_path / "train_indices.npy"), idx[20:70])
    whole = prepare_raw(tmp_path / "whole", **synthetic_kwargs())
    assert whole["splits"]["validation"]["stories"] == 30
    first = list(read_stories(tmp_path / "whole" / "validation.txt"))[:10]
    assert list(read_stories(tmp_path / "validation.txt")) == first


def test_the_default_sizes_are_the_published_split_of_the_hub_data():
    # roneneldan/TinyStories: 2,119,719 train and 21,990 validation stories
    assert split_counts(2_119_719, 21_990, 5000, 529_930, None) == (5000, 529_930, 21_990)


@pytest.mark.parametrize(
    ("n", "test_n", "train_n", "expected"),
    [(200, 20, None, (20, 180)),  # sizes that fit are exact
     (200, 21, None, (20, 180)),  # the test split takes at most a tenth
     (200, 5000, 529_930, (20, 180)),  # hub-sized settings on small data
     (200, 20, 181, (20, 180)),  # train takes at most what remains
     (200, 5, 50, (5, 50)),
     (209, 5000, None, (20, 189)),  # a tenth rounded down
     (9, 5000, None, (1, 8)),
     (2, 1, None, (1, 1))],
)  # fmt: skip
def test_test_n_and_train_n_are_upper_bounds(n, test_n, train_n, expected):
    assert split_counts(n, 10, test_n, train_n, None) == (*expected, 10)


def test_a_source_of_one_story_cannot_be_split():
    with pytest.raises(DataError, match="holds 1 story; it needs at least 2"):
        split_counts(1, 10, 5000, None, None)


def test_local_files_with_only_their_paths_set_split_by_the_data(tmp_path, caplog):
    # The default config with only dataset.source and the two paths changed, as a user's config
    # file merged over it gives: 300 stories must not meet the hub-sized test_n and train_n.
    write_stories(tmp_path / "train.txt", [f"Story number {i}." for i in range(300)])
    write_stories(tmp_path / "valid.txt", [f"Validation story {i}." for i in range(12)])
    dataset = yaml.safe_load(CONFIG.read_text())["dataset"]
    dataset.update(source="local", local={"train": str(tmp_path / "train.txt"),
                                          "validation": str(tmp_path / "valid.txt")})
    with caplog.at_level("INFO", logger="tinylm.data"):
        meta = prepare_raw(tmp_path / "raw", **dataset_kwargs(dataset))
    assert {k: v["stories"] for k, v in meta["splits"].items()} == {"train": 270, "validation": 12, "test": 30}
    assert "dataset.test_n = 5000 is more than a tenth of the 300 stories" in caplog.text


@pytest.mark.parametrize(
    ("over", "key"),
    [({"validation_n": 31}, "dataset.validation_n = 31 is larger"),
     ({"source": "ftp"}, "dataset.source = 'ftp'")],
)  # fmt: skip
def test_split_sizes_beyond_the_data_are_config_errors_and_write_nothing(tmp_path, over, key):
    with pytest.raises(ConfigError, match=key):
        prepare_raw(tmp_path / "raw", **synthetic_kwargs(**over))
    assert not (tmp_path / "raw").exists() or list((tmp_path / "raw").iterdir()) == []


# Synthetic stories hold 385 to 1,183 bytes: two make fewer tokens than a row of 4,097, six always fill one.
@pytest.mark.parametrize(
    ("over", "message"),
    [({"synthetic_n_validation": 1}, "the validation split would hold 1 story of at most \\d+ tokens, fewer than one "
                                     "packed row of packing.seq_len \\+ 1 = 4097: pack_tokens could make no row of it; "
                                     "raise dataset.synthetic.n_validation \\(1\\), or lower packing.seq_len \\(4096\\)$"),
     ({"validation_n": 2}, "the validation split .* raise dataset.validation_n \\(2\\) or set it to null, or lower"),
     ({"test_n": 2}, "the test split would hold 2 stories .* raise dataset.test_n \\(2\\), or lower packing.seq_len"),
     # the test split takes at most a tenth of the source's train split: test_n alone cannot grow it
     ({"synthetic_n_train": 20}, "the test split would hold 2 stories .* raise dataset.synthetic.n_train \\(20\\): "
                                 "the test split takes at most a tenth of it, or lower"),
     ({"train_n": 2}, "the train split would hold 2 stories .* raise dataset.train_n \\(2\\) or set it to null, or")],
)  # fmt: skip
def test_a_split_too_small_for_one_packed_row_is_refused_naming_what_sizes_it_and_nothing_is_written(
        tmp_path, over, message):
    """Found where the raw splits are written, before a tokenizer is trained on them; a hub-sized
    validation split is written before the train split, so a small one is refused before that."""
    with pytest.raises(ConfigError, match=message):
        prepare_raw(tmp_path / "raw", **synthetic_kwargs(**over), seq_len=4096)
    assert not (tmp_path / "raw").exists() or list((tmp_path / "raw").iterdir()) == []
    meta = prepare_raw(tmp_path / "raw", **synthetic_kwargs(**over), seq_len=128)  # fills a row: written
    assert set(meta["splits"]) == {"train", "validation", "test"}


def test_a_local_validation_file_too_small_for_one_packed_row_is_named(tmp_path):
    write_stories(tmp_path / "train.txt", [f"Story number {i} is a story about a cat." for i in range(100)])
    write_stories(tmp_path / "valid.txt", ["The end."])
    kw = dict(source="local", local_train=str(tmp_path / "train.txt"), local_validation=str(tmp_path / "valid.txt"),
              seed=1, test_n=10, train_n=None, validation_n=None)  # fmt: skip
    with pytest.raises(ConfigError, match=r"the validation split would hold 1 story of at most 10 tokens, .* = 129: "
                                          r".* give the dataset.local.validation file more stories, or lower "
                                          r"packing.seq_len \(128\)$"):
        prepare_raw(tmp_path / "raw", **kw, seq_len=128)
    prepare_raw(tmp_path / "raw", **kw, seq_len=9)  # 8 bytes, <bos> and <eos>: 10 tokens may fill a row of 10
    prepare_raw(tmp_path / "raw", **kw)  # without a seq_len: not checked

def test_local_source_reads_any_format(tmp_path):
    train = [f"Story {i}.\nIt has two lines." for i in range(30)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in train))
    write_stories(tmp_path / "valid.txt", ["Valid one.", "Valid two."])
    meta = prepare_raw(tmp_path / "raw", source="local", local_train=str(tmp_path / "train.jsonl"),
                       local_validation=str(tmp_path / "valid.txt"), seed=1, test_n=3, train_n=None,
                       validation_n=None)  # fmt: skip
    assert [meta["splits"][k]["stories"] for k in ("train", "validation", "test")] == [27, 2, 3]
    assert meta["train"]["path"].endswith("train.jsonl")
    with pytest.raises(ConfigError, match=rf"validation_n = 5 is larger than the validation split of "
                                          rf"dataset.local.validation \({tmp_path / 'valid.txt'}\) \(2 stories\)"):
        prepare_raw(tmp_path / "raw5", source="local", local_train=str(tmp_path / "train.jsonl"),
                    local_validation=str(tmp_path / "valid.txt"), seed=1, test_n=3, train_n=None,
                    validation_n=5)  # fmt: skip
    got = [
        *read_stories(tmp_path / "raw" / "train.txt"),
        *read_stories(tmp_path / "raw" / "test.txt"),
    ]
    assert sorted(got) == sorted(train)


def test_local_source_missing_file_names_key_and_path(tmp_path):
    with pytest.raises(
        DataError,
        # each key named once, both in one message
        match=r"nope\.txt: dataset\.local\.train file not found; check the path\n"
              r".*nope\.txt: dataset\.local\.validation file not found; check the path$",
    ):
        prepare_raw(tmp_path / "raw", source="local", local_train=str(tmp_path / "nope.txt"),
                    local_validation=str(tmp_path / "nope.txt"), seed=1, test_n=5, train_n=None,
                    validation_n=None)  # fmt: skip
    with pytest.raises(ConfigError, match="dataset.local.train is not set"):
        prepare_raw(
            tmp_path / "raw", source="local", seed=1, test_n=5, train_n=None, validation_n=None
        )
    assert not (tmp_path / "raw").exists()


@pytest.fixture
def hf_no_network(monkeypatch, tmp_path):
    """An empty datasets cache and a hub endpoint that refuses connections."""
    import datasets  # a dependency of the hub source (pyproject.toml): missing is a failure, not a skip
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", "http://127.0.0.1:9")
    return tmp_path


def test_hub_unreachable_fails_at_once_naming_the_alternatives(hf_no_network):
    t0 = time.perf_counter()
    with pytest.raises(DataError) as err:
        prepare_raw(hf_no_network / "raw", source="hub", hub_id="roneneldan/TinyStories", seed=42,
                    test_n=5000, train_n=529930, validation_n=None)  # fmt: skip
    assert time.perf_counter() - t0 < 15
    msg = str(err.value)
    for part in ("unreachable", "roneneldan/TinyStories", "dataset.source: local", "dataset.local.train",
                 "dataset.source: synthetic", "config/demo.yaml"):  # fmt: skip
        assert part in msg
    assert not (hf_no_network / "raw").exists()


def test_hub_loader_reads_a_local_dataset_folder_offline(hf_no_network):
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = hf_no_network / "repo"
    repo.mkdir()
    pq.write_table(
        pa.table({"text": [f"Train story {i}." for i in range(40)]}), repo / "train.parquet"
    )
    pq.write_table(pa.table({"text": ["Valid a.", "Valid b."]}), repo / "validation.parquet")
    meta = prepare_raw(hf_no_network / "raw", source="hub", hub_id=str(repo), seed=42, test_n=4,
                       train_n=30, validation_n=None)  # fmt: skip
    assert meta["splits"]["train"]["stories"] == 30 and meta["splits"]["validation"]["stories"] == 2
    with pytest.raises(DataError, match="no 'story' column"):
        prepare_raw(hf_no_network / "raw2", source="hub", hub_id=str(repo), text_column="story", seed=42,
                    test_n=4, train_n=None, validation_n=None)  # fmt: skip


def test_a_hub_train_split_that_is_all_validation_copies_names_both_splits(hf_no_network):
    # The message named the hub dataset for the validation split ("... is also in the hub's <id>"), not
    # its validation split.
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = hf_no_network / "repo"
    repo.mkdir()
    stories = [f"Story {i}." for i in range(20)]
    pq.write_table(pa.table({"text": stories}), repo / "train.parquet")
    pq.write_table(pa.table({"text": stories}), repo / "validation.parquet")
    with pytest.raises(DataError, match=rf"^every story of the train split of the hub's {re.escape(str(repo))} is "
                                        rf"also in the validation split of the hub's {re.escape(str(repo))}:"):
        prepare_raw(hf_no_network / "raw", source="hub", hub_id=str(repo), seed=42, test_n=2, train_n=None,
                    validation_n=None)  # fmt: skip


def test_batches_are_bounded_and_the_digest_is_the_files_sha256(tmp_path, tiny_corpus):
    import hashlib

    from tinylm.data import iter_story_batches
    from tinylm.io import sha256_file

    write_stories(tmp_path / "s.txt", tiny_corpus)
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in tiny_corpus))
    for name in ("s.txt", "s.jsonl"):
        digest = hashlib.sha256()
        batches = list(iter_story_batches(tmp_path / name, batch_size=64, digest=digest))
        assert max(map(len, batches)) == 64 and sum(map(len, batches)) == len(tiny_corpus)
        assert [s for b in batches for s in b] == tiny_corpus
        assert digest.hexdigest() == sha256_file(tmp_path / name)


def test_a_byte_order_mark_is_not_part_of_the_first_story(tmp_path):
    # Editors on Windows save UTF-8 with a byte-order mark: it stayed at the start of the first story
    # of a .txt, and json refused the first line of a .jsonl ("Unexpected UTF-8 BOM").
    bom = "\ufeff".encode()
    (tmp_path / "s.txt").write_bytes(bom + b"First story.\n<|endoftext|>\nSecond story.\n<|endoftext|>\n")
    assert list(read_stories(tmp_path / "s.txt")) == ["First story.", "Second story."]
    (tmp_path / "s.jsonl").write_bytes(bom + b'{"text": "First story."}\n{"text": "Second story."}\n')
    assert list(read_stories(tmp_path / "s.jsonl")) == ["First story.", "Second story."]
    (tmp_path / "s.json").write_bytes(bom + b'[{"text": "First story."}]')
    assert list(read_stories(tmp_path / "s.json")) == ["First story."]


def test_line_endings_are_written_as_the_reader_reads_them(tmp_path):
    """The reader takes \\r\\n and a lone \\r as \\n (universal newlines); the writer kept them, so a
    separator line ending in \\r\\n inside a story passed its check and split the story in two when read
    back (meta.json counting one story, the tokenizer and packer two), and a lone \\r came back as \\n."""
    out = tmp_path / "out.txt"
    write_stories(out, ["one\r\ntwo", "three\rfour"])
    assert list(read_stories(out)) == ["one\ntwo", "three\nfour"]
    with pytest.raises(DataError, match="story 1 holds a line"):
        write_stories(tmp_path / "bad.txt", ["fine", f"first half\r\n{EOT}\r\nsecond half"])


def test_a_story_holding_the_separator_is_named_by_its_place_in_the_input(tmp_path):
    """The refusal named the split file being written (never written) and the story's place in the
    shuffled order; it names the input file and the story's place in it."""
    stories = [f"Story {i}." for i in range(40)]
    stories[3] = f"Story three.\n{EOT}\nstill three."
    train = tmp_path / "tr.jsonl"
    train.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories))
    valid = tmp_path / "va.txt"
    write_stories(valid, ["Valid a.", "Valid b."])
    for seed in (2, 7):
        with pytest.raises(DataError) as err:
            prepare_raw(tmp_path / "raw", source="local", local_train=str(train), local_validation=str(valid),
                        seed=seed, test_n=4, train_n=None, validation_n=None)  # fmt: skip
        assert f"dataset.local.train ({train}): story 3 " in str(err.value), str(err.value)
        assert "raw" not in str(err.value).replace(str(tmp_path), "")
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


def test_the_index_files_leave_out_the_stories_that_are_not_written(hf_no_network):
    """Empty stories of the source are not written; their positions stayed in train_indices.npy, which
    then no longer matched the stories of train.txt one to one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = hf_no_network / "repo"
    repo.mkdir()
    texts = [f"Train story {i}." for i in range(40)]
    texts[5], texts[17] = "", "   "
    pq.write_table(pa.table({"text": texts}), repo / "train.parquet")
    pq.write_table(pa.table({"text": ["Valid a.", "Valid b."]}), repo / "validation.parquet")
    out = hf_no_network / "raw"
    meta = prepare_raw(out, source="hub", hub_id=str(repo), seed=42, test_n=4, train_n=None, validation_n=None)
    for split in ("train", "test"):
        written = list(read_stories(out / f"{split}.txt"))
        indices = np.load(out / f"{split}_indices.npy")
        assert len(indices) == len(written) == meta["splits"][split]["stories"]
        assert written == [texts[i] for i in indices]


def test_separator_lines_with_trailing_blanks_are_read_as_they_come(tmp_path, monkeypatch):
    """A .txt whose separator lines end in spaces matched the format but not the fast split: the reader
    then held and re-split everything read so far at every block (time growing with the square of the
    file) and gave its first batch only at the end."""
    import tinylm.data.sources as sources

    p = tmp_path / "spaced.txt"
    p.write_text("".join(f"Story number {i} is here.\n{EOT} \n" for i in range(4000)))
    monkeypatch.setattr(sources, "_READ_CHARS", 256)
    opened = []
    real_open = open

    def spy(*args, **kwargs):
        opened.append(real_open(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(sources, "open", spy, raising=False)
    batches = sources.iter_story_batches(p, "text", 10)
    first = next(batches)
    assert first == [f"Story number {i} is here." for i in range(10)]
    assert not opened[-1].closed and opened[-1].tell() < p.stat().st_size // 4  # read as it comes
    assert sum(map(len, batches)) == 3990


@pytest.mark.parametrize("name", ["latin.jsonl", "latin.json"])
def test_a_json_file_that_is_not_utf8_is_named(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b'{"text": "caf\xe9 story"}\n')
    with pytest.raises(DataError, match=rf"{name}: not UTF-8 text .*convert it to UTF-8"):
        list(read_stories(p))
    valid = tmp_path / "va.txt"
    write_stories(valid, ["Valid a.", "Valid b."])
    with pytest.raises(DataError, match=rf"{name}: not UTF-8 text"):
        prepare_raw(tmp_path / "raw", source="local", local_train=str(p), local_validation=str(valid), seed=1,
                    test_n=1, train_n=None, validation_n=None)  # fmt: skip


def test_a_json_file_holding_one_object_says_so_and_how_to_write_records(tmp_path):
    """A .json file holding one object (pretty-printed, a list of records wrapped in a key, or the columns
    pandas' DataFrame.to_json writes by default) was read as JSON Lines: 'line 1: not valid JSON ...; fix
    or delete that line' of a valid JSON file, or advice to set dataset.text_column that could not help.
    Refused by what it holds, with how to write it; and before any job, as a JSON Lines file is."""
    from tinylm.data.sources import check_local_file

    records = [{"text": f"Story {i}."} for i in range(3)]
    wrapped, pretty = tmp_path / "wrapped.json", tmp_path / "pretty.json"
    wrapped.write_text(json.dumps({"data": records}))
    pretty.write_text(json.dumps({"data": records}, indent=2))
    for path in (wrapped, pretty):
        with pytest.raises(DataError) as e:
            list(read_stories(path))
        assert str(e.value).startswith(f"{path}: one JSON object (keys: data), not stories: a .json file holds an "
                                       "array of records"), e.value
        assert "its 'data' holds a list: save that list alone as the file" in str(e.value)
        with pytest.raises(DataError, match=r"one JSON object .*\(dataset\.local\.train\)"):
            check_local_file("train", str(path))
    columns = tmp_path / "pandas.json"
    columns.write_text(json.dumps({"text": {str(i): r["text"] for i, r in enumerate(records)}}))
    with pytest.raises(DataError, match=r"pandas\.json: one JSON object \(keys: text\), not stories.*"
                                        r"DataFrame\.to_json writes such an object by default .*: write "
                                        r"df\.to_json\(path, orient='records'\)"):
        list(read_stories(columns))
    rows = tmp_path / "index.json"  # orient='index': a record per row number, every key named
    rows.write_text(json.dumps({str(i): {"text": f"Story {i}."} for i in range(100)}))
    with pytest.raises(DataError, match=r"index\.json: one JSON object \(keys: 0, 1, 2, 3, 4, \.\.\. \(100 keys\)\), "
                                        r"not stories.*orient='records'"):
        list(read_stories(rows))
    # JSON Lines in a .json file, and an array of records, read as before
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert list(read_stories(tmp_path / "lines.json")) == ["Story 0.", "Story 1.", "Story 2."]
    (tmp_path / "array.json").write_text(json.dumps(records, indent=2))
    assert list(read_stories(tmp_path / "array.json")) == ["Story 0.", "Story 1.", "Story 2."]
    # a JSON Lines file with a bad line is still named by its line
    (tmp_path / "bad.json").write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(DataError, match=r"bad\.json, line 2: not valid JSON"):
        list(read_stories(tmp_path / "bad.json"))


def test_a_story_held_out_for_test_or_validation_is_never_trained_on(tmp_path, caplog):
    # Real TinyStories files repeat stories: the sample's held-out file shares stories with the train
    # file, and a story twice in the train file can land in test and train both. Compared as written
    # (stripped, \r\n as \n), so blanks around a copy do not hide it.
    repeated = 'Tom saw a “big” dog.\n\nThe dog said “Hi!”'
    in_validation = "Lily’s cat ran away.\nShe found it under the bed."
    stories = [f"Story number {i}." for i in range(40)]
    stories[3] = stories[17] = stories[31] = repeated  # three copies: one may be cut into test
    stories[8] = f"\n{in_validation}  "
    for i in (12, 25):
        stories[i] = in_validation.replace("\n", "\r\n")
    (tmp_path / "train.txt").write_text("".join(f"{s}\n{EOT}\n" for s in stories), encoding="utf-8")
    write_stories(tmp_path / "valid.txt", [in_validation, "Another validation story."])
    kw = dict(source="local", local_train=str(tmp_path / "train.txt"), local_validation=str(tmp_path / "valid.txt"),
              test_n=4, train_n=None, validation_n=None)
    cut = 0
    for seed in range(12):  # seeds that cut a copy of `repeated` into the test split and others into train
        out = tmp_path / f"raw{seed}"
        with caplog.at_level("INFO", logger="tinylm.data"):
            meta = prepare_raw(out, seed=seed, **kw)
        split = {s: list(read_stories(out / f"{s}.txt")) for s in ("train", "validation", "test")}
        held_out = set(split["test"]) | set(split["validation"])
        cut += repeated in split["test"]
        assert not held_out & set(split["train"]), seed
        test_idx, train_idx = np.load(out / "test_indices.npy"), np.load(out / "train_indices.npy")
        assert split["train"] == [stories[i].strip().replace("\r\n", "\n") for i in train_idx]
        left_out = 40 - 4 - meta["test_left_out"]["in_validation"] - len(train_idx)  # the test split's skips aside
        assert meta["splits"]["train"]["stories"] == len(train_idx) and left_out >= 1  # copies of in_validation at least
        assert meta["train_left_out"] == {"in_test_or_validation": left_out}
        # every other story of the train file is in train: nothing else is lost
        assert sorted([*test_idx, *train_idx]) == [i for i in range(40) if i in test_idx or
                                                   stories[i].strip().replace("\r\n", "\n") not in held_out]
    assert cut  # some seed put a copy in test
    assert re.search(r"left \d+ stories out of the train split: they are also in the test or validation", caplog.text)


def test_the_test_split_never_shares_a_story_with_validation(tmp_path):
    # A validation file drawn from the same pool as the train file repeats some of its stories; the test
    # split (cut from the train file) skips those copies and takes the next story, so the two held-out
    # splits measure different stories, and the skipped copies are not trained on either.
    stories = [f"Story number {i}." for i in range(60)]
    copies = list(range(0, 60, 3))  # a third of the train file is also in validation
    write_stories(tmp_path / "train.txt", stories)
    write_stories(tmp_path / "valid.txt", [stories[i] for i in copies] + ["Only in validation."])
    skipped_somewhere = 0
    for seed in range(8):
        out = tmp_path / f"raw{seed}"
        meta = prepare_raw(out, source="local", local_train=str(tmp_path / "train.txt"),
                           local_validation=str(tmp_path / "valid.txt"), seed=seed, test_n=6, train_n=None,
                           validation_n=None)
        split = {s: list(read_stories(out / f"{s}.txt")) for s in ("train", "validation", "test")}
        assert len(split["test"]) == 6, seed  # full size: the next story is taken instead
        assert not set(split["test"]) & set(split["validation"]), seed
        assert not set(split["train"]) & (set(split["test"]) | set(split["validation"])), seed
        test_idx, train_idx = np.load(out / "test_indices.npy"), np.load(out / "train_indices.npy")
        assert split["test"] == [stories[i] for i in test_idx]
        # the test split is the first 6 of the shuffled order that are not in validation
        perm = np.random.default_rng(seed).permutation(60)
        assert list(test_idx) == [i for i in perm if i not in copies][:6]
        # every story is in exactly one split: test, train, or (its copy) validation
        assert sorted([*test_idx, *train_idx, *copies]) == list(range(60))
        assert meta["test_left_out"] == {"in_validation": int(sum(i in copies for i in perm[: list(perm).index(test_idx[-1]) + 1]))}
        skipped_somewhere += meta["test_left_out"]["in_validation"]
    assert skipped_somewhere  # some seed drew a validation copy into the test split's place


def test_the_logged_train_size_counts_only_the_stories_left_after_the_test_split(tmp_path, caplog):
    # The "splits:" line said train 54 where the test split had skipped a validation copy: 53 stories were
    # left, so with the train split's own left-out copies logged after it, the counts did not add up to
    # what meta.json records.
    stories = [f"Story number {i}." for i in range(60)]
    write_stories(tmp_path / "train.txt", stories)
    write_stories(tmp_path / "valid.txt", [stories[i] for i in range(0, 60, 3)])
    for seed in range(20):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tinylm.data"):
            meta = prepare_raw(tmp_path / f"raw{seed}", source="local", local_train=str(tmp_path / "train.txt"),
                               local_validation=str(tmp_path / "valid.txt"), seed=seed, test_n=6, train_n=None,
                               validation_n=None)
        if meta["test_left_out"]["in_validation"]:
            break
    assert meta["test_left_out"]["in_validation"]
    logged = int(re.search(r"splits: train (\d+),", caplog.text)[1])
    assert logged == 60 - 6 - meta["test_left_out"]["in_validation"]
    assert logged - meta["train_left_out"]["in_test_or_validation"] == meta["splits"]["train"]["stories"]


def test_the_writing_progress_counts_stories_in_whole_numbers(tmp_path, caplog):
    # it read "writing train.txt: 900.0 of 900.0 stories (215537.9 stories/s)"
    stories = [f"Story number {i}." for i in range(40)]
    write_stories(tmp_path / "train.txt", stories)
    write_stories(tmp_path / "valid.txt", ["Only in validation."])
    with caplog.at_level(logging.INFO, logger="tinylm.data"):
        prepare_raw(tmp_path / "raw", source="local", local_train=str(tmp_path / "train.txt"),
                    local_validation=str(tmp_path / "valid.txt"), seed=0, test_n=4, train_n=None, validation_n=None)
    assert re.search(r"writing train\.txt: 36 of 36 stories \(\d+ stories/s\)", caplog.text), caplog.text
    assert "writing validation.txt: 1 of 1 stories" in caplog.text


def test_a_train_file_that_is_all_validation_copies_is_refused(tmp_path):
    stories = [f"Story number {i}." for i in range(20)]
    write_stories(tmp_path / "train.txt", stories)
    write_stories(tmp_path / "valid.txt", stories)
    with pytest.raises(DataError, match=r"every story of dataset\.local\.train \(.*train\.txt\) is also in .*valid\.txt"):
        prepare_raw(tmp_path / "raw", source="local", local_train=str(tmp_path / "train.txt"),
                    local_validation=str(tmp_path / "valid.txt"), seed=0, test_n=2, train_n=None, validation_n=None)
    assert not (tmp_path / "raw" / "meta.json").exists()


@pytest.mark.parametrize(("seed", "order"), [
    # the test split took the one story of its own; every other one is a validation copy, left out of train
    (0, None),
    # the shuffled order puts the one story of its own last: the test split skips both validation copies
    # to reach it, so train has no candidate at all, none left out
    (3, [2, 1, 0]),
])
def test_a_train_file_whose_stories_past_the_test_split_are_all_held_out_is_refused(tmp_path, seed, order):
    # nothing is left to train on: the message said "cannot write the train split: no stories to write
    # (all 0 are empty)"
    if order is not None:
        assert list(np.random.default_rng(seed).permutation(3)) == order
    write_stories(tmp_path / "train.txt", ["A train story.", "Another story.", "A third one."])
    write_stories(tmp_path / "valid.txt", ["A validation story.", "Another story.", "A third one."])
    with pytest.raises(DataError, match=r"^every story of dataset\.local\.train \(.*train\.txt\) but the test "
                                        r"split's 1 is also in the test or validation split: no story is left to "
                                        r"train on; give a train file that holds more stories of its own$"):
        prepare_raw(tmp_path / "raw", source="local", local_train=str(tmp_path / "train.txt"),
                    local_validation=str(tmp_path / "valid.txt"), seed=seed, test_n=1, train_n=None,
                    validation_n=None)
    assert not (tmp_path / "raw" / "meta.json").exists()


def test_train_n_counts_the_stories_kept_after_held_out_copies_are_left_out(tmp_path):
    stories = [f"Story number {i}." for i in range(30)]
    write_stories(tmp_path / "train.txt", stories)
    write_stories(tmp_path / "valid.txt", stories[:10])  # a third of the train file is validation's
    meta = prepare_raw(tmp_path / "raw", source="local", local_train=str(tmp_path / "train.txt"),
                       local_validation=str(tmp_path / "valid.txt"), seed=1, test_n=2, train_n=15,
                       validation_n=None)
    train = list(read_stories(tmp_path / "raw" / "train.txt"))
    assert len(train) == 15 and not set(train) & set(stories[:10])
    assert meta["splits"]["train"]["stories"] == 15
