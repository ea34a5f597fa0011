"""Shared fixtures: the tiny model and training configs, a small synthetic corpus, its raw splits, a
512-token BPE and packed splits.

Session-scoped and built once (about a second in all); tests that change files copy them first.
tests/conftest.py hands the training configs on to the workflow tests.
"""

from __future__ import annotations

import pytest

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]

# The unit tests' GPT: two blocks, four heads of 8, a feed-forward twice as wide; a forward pass on
# the CPU takes milliseconds. A test that needs another shape overrides keys.
TINY_GPT = {"vocab_size": 97, "max_seq_len": 16, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64}
# For training on packed synthetic stories: their 512-token BPE, rows of up to 33 tokens.
TINY_TRAIN_GPT = {**TINY_GPT, "vocab_size": 512, "max_seq_len": 32, "n_heads": 2}
# Seconds on the CPU, with warm-up, evaluations, checkpoints and log lines all inside 30 steps.
TINY_TRAIN = {"device": "cpu", "batch_size": 8, "max_steps": 30, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5,
              "eval_every": 10, "eval_rows": 32, "save_every": 10, "log_every": 5, "seed": 7}


@pytest.fixture(scope="session")
def tiny_config():
    """Factory: TINY_GPT with overrides, a dict for GPTConfig."""
    return lambda **overrides: {**TINY_GPT, **overrides}


@pytest.fixture(scope="session")
def tiny_gpt(tiny_config):
    """Factory: a GPT of tiny_config(**overrides) in eval mode, initialized from seed 0."""
    import torch

    from tinylm.model import GPT, GPTConfig

    def make(**overrides):
        torch.manual_seed(0)
        return GPT(GPTConfig(**tiny_config(**overrides))).eval()

    return make


@pytest.fixture(scope="session")
def tiny_train_model():
    """Factory: TINY_TRAIN_GPT with overrides, the model config of a training run."""
    return lambda **overrides: {**TINY_TRAIN_GPT, **overrides}


@pytest.fixture(scope="session")
def tiny_train_config():
    """Factory: TINY_TRAIN with overrides, the train section of a training run."""
    return lambda **overrides: {**TINY_TRAIN, **overrides}

# Stories that stress the unit split: odd whitespace (NBSP, em space, \x0b, \x1c..\x1f, which
# Python's \s counts as whitespace but the pre-tokenizer does not), digits, contractions, emoji,
# and special-token text typed into a story.
TRICKY_STORIES = [
    "Tom's dog   ran.\n \n\tThen\u00a0it   sat\u2003down\x0bhere.",
    "Numbers: 12 345, ½ and ² and Ⅻ; caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f600!!",
    "Odd\x1cseparators\x1d here\x1e and\x1f there.  \u3000 Ok.",
    "She said, \"I'll go.\" He said: 'We'd\u2028better'\u2029not.",
    "A <bos> inside and an <eos> too, plus <pad><unk>.",
]


@pytest.fixture(scope="session")
def tricky_stories() -> list[str]:
    return list(TRICKY_STORIES)


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
    train_tokenizer(
        tiny_raw[0] / "train.txt", out, vocab_size=512, special_tokens=SPECIALS, min_frequency=2
    )
    return out


@pytest.fixture(scope="session")
def tiny_packed(tiny_raw, tiny_tokenizer_dir, tmp_path_factory):
    """{split: .bin path} for all three splits, rows of seq_len + 1 = 33 tokens."""
    from tinylm.data import pack_split

    out = tmp_path_factory.mktemp("packed")
    paths = {}
    for split in ("train", "validation", "test"):
        paths[split] = out / f"{split}.bin"
        pack_split(
            tiny_raw[0] / f"{split}.txt",
            tiny_tokenizer_dir / "tokenizer.json",
            paths[split],
            seq_len=32,
        )
    return paths


@pytest.fixture(scope="session")
def random_stories() -> list[str]:
    """400 random strings over pieces that stress unit boundaries: every kind of whitespace run,
    the key markers \\x1d-\\x1f, digits, contractions, non-ASCII letters, special-token text."""
    import random

    r = random.Random(0)
    atoms = ["a", "bc", "Lily", " Tom", "é", "ß", "日本", "1", "23", "½", "²", ".", "!", '"', "'s", "'ll",
             "<bos>", "<eos>", "\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\xa0", "\u2003", "\u3000", "\u2028",
             "\t", "\n", "\x0b", "\x0c", "\r", " ", " ", " ", "  ", "   ", "\n \n", " \n ", "\n  ", "😀"]  # fmt: skip
    out = []
    while len(out) < 400:
        s = "".join(r.choice(atoms) for _ in range(r.randint(1, 60))).strip()
        if s:
            out.append(s)
    return out
