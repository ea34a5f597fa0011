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
