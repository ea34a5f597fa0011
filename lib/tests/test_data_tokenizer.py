"""Tokenizer training: identical to tokenizers' BpeTrainer, special ids, byte lengths, bad input."""

import json

import numpy as np
import pytest

from tinylm.data import (
    load_tokenizer,
    read_stories,
    special_ids,
    token_byte_lengths,
    train_tokenizer,
    workers,
    write_stories,
)
from tinylm.data import tokenizer as tokmod
from tinylm.data.tokenizer import bpe_trainer_tokenizer
from tinylm.errors import ConfigError, DataError
from tinylm.io import sha256_file

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def hf_trained(text_path, vocab_size, min_frequency):
    """The reference: tokenizers' own BpeTrainer fed one story at a time."""
    return bpe_trainer_tokenizer(read_stories(text_path), vocab_size=vocab_size, special_tokens=SPECIALS,
                                 min_frequency=min_frequency)


@pytest.fixture(scope="module")
def tricky_text(tricky_stories, tiny_corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("tricky") / "train.txt"
    write_stories(path, tricky_stories * 3 + tiny_corpus[:300])
    return path


@pytest.mark.parametrize(("vocab_size", "min_frequency"), [(700, 2), (400, 5), (3000, 1)])
def test_same_tokenizer_json_as_the_bpe_trainer(tricky_text, tmp_path, vocab_size, min_frequency):
    meta = train_tokenizer(tricky_text, tmp_path, vocab_size=vocab_size, special_tokens=SPECIALS,
                           min_frequency=min_frequency)  # fmt: skip
    ours = json.loads((tmp_path / "tokenizer.json").read_text())
    ref = json.loads(hf_trained(tricky_text, vocab_size, min_frequency).to_str())
    assert ours["model"]["merges"] == ref["model"]["merges"]
    assert ours == ref
    assert meta["vocab_size"] == len(ref["model"]["vocab"])


def test_worker_processes_give_the_same_tokenizer(tricky_text, tmp_path, monkeypatch):
    train_tokenizer(
        tricky_text, tmp_path / "one", vocab_size=600, special_tokens=SPECIALS, min_frequency=2
    )
    monkeypatch.setattr(workers, "PARALLEL_MIN_BYTES", 0)
    train_tokenizer(tricky_text, tmp_path / "two", vocab_size=600, special_tokens=SPECIALS, min_frequency=2,
                    workers=2)  # fmt: skip
    assert sha256_file(tmp_path / "one" / "tokenizer.json") == sha256_file(
        tmp_path / "two" / "tokenizer.json"
    )


def test_special_tokens_first_in_config_order_and_meta(tiny_raw, tiny_tokenizer_dir):
    meta = json.loads((tiny_tokenizer_dir / "tokenizer_meta.json").read_text())
    assert meta["special_ids"] == {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    assert meta["vocab_size"] == 512
    assert meta["tokenizer_sha256"] == sha256_file(tiny_tokenizer_dir / "tokenizer.json")
    assert meta["files"]["tokenizer.json"]["sha256"] == meta["tokenizer_sha256"]
    assert meta["train_text"]["sha256"] == sha256_file(tiny_raw[0] / "train.txt")
    assert meta["train_text"]["stories"] == 540
    tok = load_tokenizer(
        tiny_tokenizer_dir / "tokenizer.json", expect_sha256=meta["tokenizer_sha256"]
    )
    assert (
        special_ids(tok)
        == meta["special_ids"]
        == special_ids(tiny_tokenizer_dir / "tokenizer_meta.json")
    )
    order = ["<eos>", "<pad>", "<bos>"]
    train_tokenizer(tiny_raw[0] / "validation.txt", tiny_tokenizer_dir.parent / "o", vocab_size=300,
                    special_tokens=order, min_frequency=2)  # fmt: skip
    assert special_ids(tiny_tokenizer_dir.parent / "o" / "tokenizer.json") == {
        "<eos>": 0,
        "<pad>": 1,
        "<bos>": 2,
    }


def test_token_byte_lengths_add_up_to_the_text(tiny_tokenizer_dir, tricky_stories):
    tok = load_tokenizer(tiny_tokenizer_dir / "tokenizer.json")
    tok.encode_special_tokens = True  # "<bos>" typed in a story is text, as when packing
    lengths = token_byte_lengths(tok)
    assert lengths.shape == (tok.get_vocab_size(),) and lengths.dtype == np.int32
    assert list(lengths[:4]) == [0, 0, 0, 0]
    for text in tricky_stories:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert lengths[ids].sum() == len(text.encode("utf-8"))
    assert lengths[tok.token_to_id("<bos>")] == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"vocab_size": 259}, r"tokenizer.vocab_size = 259 is too small.*at least 260"),
     ({"special_tokens": ["<pad>", "<eos>"]}, r"tokenizer.special_tokens .* lacks <bos>"),
     ({"special_tokens": ["<bos>", "<eos>", "<bos>"]}, "holds a token twice"),
     ({"min_frequency": 0}, "tokenizer.min_frequency = 0")],
)  # fmt: skip
def test_bad_tokenizer_config_writes_nothing(tiny_raw, tmp_path, kwargs, match):
    args = {"vocab_size": 512, "special_tokens": SPECIALS, "min_frequency": 2, **kwargs}
    with pytest.raises(ConfigError, match=match):
        train_tokenizer(tiny_raw[0] / "train.txt", tmp_path / "tok", **args)
    assert not (tmp_path / "tok").exists()


def test_missing_or_empty_training_text_writes_nothing(tmp_path):
    with pytest.raises(DataError, match=r"train\.txt: input file not found"):
        train_tokenizer(
            tmp_path / "train.txt",
            tmp_path / "tok",
            vocab_size=512,
            special_tokens=SPECIALS,
            min_frequency=2,
        )
    (tmp_path / "train.txt").write_text("")
    with pytest.raises(DataError, match=r"train\.txt: input file is empty"):
        train_tokenizer(
            tmp_path / "train.txt",
            tmp_path / "tok",
            vocab_size=512,
            special_tokens=SPECIALS,
            min_frequency=2,
        )
    assert not (tmp_path / "tok").exists()


def test_load_tokenizer_refuses_a_changed_or_missing_file(tiny_tokenizer_dir, tmp_path):
    with pytest.raises(DataError, match=r"tokenizer\.json: sha256 \w+ differs from 0000"):
        load_tokenizer(tiny_tokenizer_dir / "tokenizer.json", expect_sha256="0000")
    with pytest.raises(DataError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_unit_counts_give_the_pre_tokenizers_counts(random_stories, tiny_corpus):
    """The key/unit split is exact: same pre-token counts as the pre-tokenizer on whole stories."""
    from collections import Counter

    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str
    for stories in (random_stories, tiny_corpus[:100], random_stories[::3] + tiny_corpus[:50]):
        expected = Counter(w for s in stories for w, _ in pre(s))
        assert tokmod._pre_token_counts(tokmod.count_units(stories)[0]) == expected
