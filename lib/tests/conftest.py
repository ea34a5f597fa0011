"""Shared fixtures: a small synthetic corpus, its raw splits, a 512-token BPE and packed splits.

Session-scoped and built once (about a second in all); tests that change files copy them first.
"""

from __future__ import annotations

import pytest

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


@pytest.fixture(scope="session")
def tiny_corpus() -> list[str]:
    """600 synthetic stories (seed 7)."""
    from tinylm.data import generate_stories

    return generate_stories(600, seed=7)


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory):
    """prepare_raw on the synthetic source: 540 train, 60 validation, 60 test stories."""
    from tinylm.data import prepare_raw

    out = tmp_path_factory.mktemp("raw")
    meta = prepare_raw(
        out, source="synthetic", synthetic_n_train=600, synthetic_n_validation=60, synthetic_seed=7,
        seed=42, test_n=60, train_n=None, validation_n=None,
    )  # fmt: skip
    return out, meta


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tiny_raw, tmp_path_factory):
    """A 512-token byte-level BPE trained on tiny_raw's train split."""
    from tinylm.data import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(tiny_raw[0] / "train.txt", out, vocab_size=512, special_tokens=SPECIALS, min_frequency=2)
    return out


@pytest.fixture(scope="session")
def tiny_packed(tiny_raw, tiny_tokenizer_dir, tmp_path_factory):
    """{split: .bin path} for all three splits, rows of seq_len + 1 = 33 tokens."""
    from tinylm.data import pack_split

    out = tmp_path_factory.mktemp("packed")
    paths = {}
    for split in ("train", "validation", "test"):
        paths[split] = out / f"{split}.bin"
        pack_split(tiny_raw[0] / f"{split}.txt", tiny_tokenizer_dir / "tokenizer.json", paths[split], seq_len=32)
    return paths
