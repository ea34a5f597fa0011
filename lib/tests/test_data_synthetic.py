"""The synthetic story generator: deterministic by seed, and varied enough to learn from."""

import itertools
import re

from tinylm.data import generate_stories, iter_stories
from tinylm.data.synthetic import CHUNK, story_chunk, story_chunks


def test_same_seed_same_stories_and_prefix_property():
    a = generate_stories(50, seed=3)
    assert a == generate_stories(50, seed=3)
    assert generate_stories(20, seed=3) == a[:20]
    assert next(iter_stories(3)) == a[0]


def test_different_seed_different_stories():
    a, b = generate_stories(50, seed=3), generate_stories(50, seed=4)
    assert not set(a) & set(b)


def test_stories_are_distinct_multi_paragraph_with_dialogue(tiny_corpus):
    stories = tiny_corpus
    assert len(set(stories)) == len(stories)
    assert all(s == s.strip() and s.count("\n") >= 2 for s in stories)  # several paragraphs
    quoted = sum(bool(re.search(r'"[^"\n]+"', s)) for s in stories)
    assert quoted / len(stories) > 0.8  # dialogue
    blank = sum("\n\n" in s for s in stories)
    assert 0.15 < blank / len(stories) < 0.6  # some, not all, with blank lines between paragraphs
    assert 500 < sum(map(len, stories)) / len(stories) < 1200  # TinyStories-like length


def test_vocabulary_has_a_long_tail(tiny_corpus):
    words = re.findall(r"[A-Za-z]+", " ".join(tiny_corpus))
    names = {w for w in words if w[0].isupper()}
    assert len(set(words)) > 600
    assert len(names) > 150  # many characters and places, not a handful
    assert not re.search(r"\b[Aa] [aeiou]", " ".join(tiny_corpus))  # "an orange", never "a orange"


def test_worker_processes_write_the_same_stream_as_one_process():
    # Chunks are seeded apart, so workers can write them side by side; across a chunk boundary the
    # stories must still be the one stream's, in order.
    n = CHUNK + 7
    one = generate_stories(n, seed=5)
    assert generate_stories(n, seed=5, workers=2) == one
    assert list(itertools.islice(iter_stories(5), n)) == one
    assert story_chunk(5, 1, 7) == one[CHUNK:] and story_chunk(5, 0, 3) == one[:3]
    assert [len(c) for c in story_chunks(n, 5)] == [CHUNK, 7]
    assert len(set(one)) == n  # a chunk's stream is not a copy of another's
