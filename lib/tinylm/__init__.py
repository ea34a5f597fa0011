"""tinylm: tiny GPT language models on TinyStories.

The library behind the Snakemake workflow: data preparation (tinylm.data), one GPT with a dense or
Mixture-of-Experts feed-forward slot (tinylm.model), one training loop (tinylm.train), evaluation
(tinylm.evaluate) and generation (tinylm.generate). Every function takes plain arguments so it can
be called from Python, a workflow script or a test.
"""

__version__ = "0.1.0"
