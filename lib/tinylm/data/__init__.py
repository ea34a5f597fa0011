"""Data pipeline: stories -> raw splits -> byte-level BPE -> packed token rows."""

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

__all__ = [
    "EOT",
    "dataset_kwargs",
    "generate_stories",
    "iter_stories",
    "iter_story_batches",
    "load_hub_splits",
    "prepare_raw",
    "read_stories",
    "write_stories",
]
