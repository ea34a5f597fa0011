"""Data pipeline: stories -> raw splits -> byte-level BPE -> packed token rows."""

from .synthetic import generate_stories, iter_stories

__all__ = ["generate_stories", "iter_stories"]
