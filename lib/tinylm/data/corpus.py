"""A whole small corpus in one call, every stage chained: for tests and benchmarks, not the workflow.

The workflow runs the stages as separate rules (download_tinystories, train_tokenizer, pack_tokens).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .pack import pack_split
from .sources import write_stories
from .synthetic import generate_stories, workers_for
from .tokenizer import train_tokenizer


def build_synthetic_corpus(
    out_dir: str | os.PathLike,
    *,
    n_train: int,
    n_validation: int,
    vocab_size: int,
    seq_len: int,
    special_tokens: Sequence[str] = ("<pad>", "<bos>", "<eos>", "<unk>"),
    min_frequency: int = 2,
) -> dict:
    """Generated stories -> tokenizer -> packed train/validation splits in `out_dir`.

    Returns {"tokenizer", "train", "validation"} paths.
    """
    d = Path(out_dir)
    for split, n, seed in (("train", n_train, 1), ("validation", n_validation, 2)):
        stories = generate_stories(n, seed=seed, workers=workers_for(n))
        write_stories(d / f"{split}.txt", stories)
    train_tokenizer(
        d / "train.txt",
        d / "tok",
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        min_frequency=min_frequency,
    )
    out = {"tokenizer": d / "tok" / "tokenizer.json"}
    for split in ("train", "validation"):
        pack_split(d / f"{split}.txt", out["tokenizer"], d / f"{split}.bin", seq_len=seq_len)
        out[split] = d / f"{split}.bin"
    return out
