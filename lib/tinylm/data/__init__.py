"""Data pipeline: stories -> raw splits -> byte-level BPE -> packed token rows.

prepare_raw(...)       data/raw/<dataset>/{train,validation,test}.txt + meta.json
train_tokenizer(...)   artifacts/tokenizers/<dataset>/<name>/tokenizer.json + tokenizer_meta.json
pack_split(...)        data/processed/<dataset>/<name>/<split>.bin + <split>.meta.json
open_packed(...)       the rows as a read-only numpy.memmap, checked against the meta file

Modules, each importing only those before it in this list: progress, workers and synthetic (the
story generator) -> sources -> tokenizer -> pack -> corpus (every stage chained, for tests and
benchmarks) and bench (`python -m tinylm.data.bench`).
"""

from .corpus import build_synthetic_corpus
from .pack import check_token_ids, choose_dtype, open_packed, pack_split
from .sources import (
    EOT,
    dataset_kwargs,
    iter_story_batches,
    load_hub_splits,
    prepare_raw,
    read_stories,
    write_stories,
)
from .synthetic import generate_stories, iter_stories
from .tokenizer import load_tokenizer, special_ids, token_byte_lengths, train_tokenizer

__all__ = [
    "build_synthetic_corpus",
    "EOT",
    "check_token_ids",
    "choose_dtype",
    "dataset_kwargs",
    "generate_stories",
    "iter_stories",
    "iter_story_batches",
    "load_hub_splits",
    "load_tokenizer",
    "open_packed",
    "pack_split",
    "prepare_raw",
    "read_stories",
    "special_ids",
    "token_byte_lengths",
    "train_tokenizer",
    "write_stories",
]
