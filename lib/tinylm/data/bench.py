"""Benchmark: tokenizer training + packing of a train split (seconds, MB/s, peak resident memory).

    python -m tinylm.data.bench --stories 529930            # synthetic corpus the size of the default
    python -m tinylm.data.bench --text /tmp/TinyStories.txt  # any story file
    python -m tinylm.data.bench --stories 20000 --hf-baseline --json /tmp/bench.json

The corpus is written to a temporary folder first (not timed). Peak RSS is reported three ways:
this process and its largest child process (getrusage ru_maxrss), and the whole process tree
sampled every 0.1 s (what the machine had to hold at once). --hf-baseline also times the plain
`tokenizers` path (BpeTrainer over stories, encode_batch) on the same text.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

from ..cli import ctrl_c_ends_quietly
from ..io import setup_logging, write_json
from .pack import open_packed, pack_split
from .sources import write_stories
from .synthetic import iter_stories
from .tokenizer import train_tokenizer
from .workers import n_workers

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


class TreeRSS:
    """Peak of the summed RSS of this process and its children, sampled in a thread."""

    def __init__(self, every: float = 0.1):
        self.peak = 0
        self._stop = threading.Event()
        self._every = every
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                rss = me.memory_info().rss + sum(
                    c.memory_info().rss for c in me.children(recursive=True)
                )
            except psutil.Error:
                rss = 0
            self.peak = max(self.peak, rss)
            self._stop.wait(self._every)

    def __enter__(self) -> TreeRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def hf_baseline(text: Path, out: Path, vocab_size: int, min_frequency: int) -> dict:
    """The straightforward path: BpeTrainer over every story, encode_batch, numpy per batch."""
    import numpy as np

    from .sources import iter_story_batches
    from .tokenizer import bpe_trainer_tokenizer

    t0 = time.perf_counter()
    stories = (s for b in iter_story_batches(text, batch_size=8192) for s in b)
    tok = bpe_trainer_tokenizer(stories, vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=min_frequency)
    t1 = time.perf_counter()
    tok.encode_special_tokens = True
    bos, eos = tok.token_to_id("<bos>"), tok.token_to_id("<eos>")
    n = 0
    with open(out, "wb") as f:
        for batch in iter_story_batches(text, batch_size=2048):
            encs = tok.encode_batch_fast(batch, add_special_tokens=False)
            ids = itertools.chain.from_iterable([bos, *e.ids, eos] for e in encs)
            arr = np.fromiter(ids, dtype=np.uint16)
            f.write(arr.tobytes())
            n += len(arr)
    t2 = time.perf_counter()
    return {"tokenizer_s": t1 - t0, "packing_s": t2 - t1, "total_s": t2 - t0, "tokens": n}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        prog="python -m tinylm.data.bench", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--stories", type=int, default=529930, help="synthetic stories (ignored with --text)"
    )
    ap.add_argument("--seed", type=int, default=0, help="synthetic generator seed")
    ap.add_argument(
        "--text", default=None, help="use this story file instead of a synthetic corpus"
    )
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--min-frequency", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--encode-batch", type=int, default=2048)
    ap.add_argument(
        "--workers", type=int, default=None, help="default: RAYON_NUM_THREADS or all CPUs"
    )
    ap.add_argument(
        "--hf-baseline",
        action="store_true",
        help="also time plain tokenizers training + encode_batch",
    )
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="tinylm-bench-") as tmp:
        tmp = Path(tmp)
        if args.text:
            text = Path(args.text)
            gen_s = 0.0
        else:
            text = tmp / "train.txt"
            t = time.perf_counter()
            write_stories(text, itertools.islice(iter_stories(args.seed), args.stories))
            gen_s = time.perf_counter() - t
        mb = text.stat().st_size / 1e6
        workers = n_workers(args.workers, text.stat().st_size)
        print(f"# corpus {text}: {mb:.1f} MB (generated in {gen_s:.1f} s); {workers} worker(s), "
              f"{os.cpu_count()} CPUs; TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}",
              flush=True)  # fmt: skip
        self0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with TreeRSS() as tree:
            t0 = time.perf_counter()
            tmeta = train_tokenizer(
                text, tmp / "tok", vocab_size=args.vocab_size, special_tokens=SPECIALS,
                min_frequency=args.min_frequency, workers=workers,
            )  # fmt: skip
            t1 = time.perf_counter()
            pmeta = pack_split(
                text, tmp / "tok" / "tokenizer.json", tmp / "train.bin", seq_len=args.seq_len,
                encode_batch=args.encode_batch, workers=workers,
            )  # fmt: skip
            t2 = time.perf_counter()
        rows = open_packed(tmp / "train.bin")
        res = {
            "text": str(text),
            "text_mb": round(mb, 1),
            "stories": pmeta["n_stories"],
            "tokens": pmeta["n_tokens"],
            "rows": rows.shape[0],
            "vocab_size": tmeta["vocab_size"],
            "workers": workers,
            "cpus": os.cpu_count(),
            "tokenizer_s": round(t1 - t0, 2),
            "tokenizer_phases_s": tmeta["seconds"],
            "packing_s": round(t2 - t1, 2),
            "total_s": round(t2 - t0, 2),
            "mb_per_s": round(mb / (t2 - t0), 1),
            # ru_maxrss is in KiB on Linux
            "peak_rss_self_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_rss_self_before_mb": round(self0 / 1024, 1),
            "peak_rss_largest_child_mb": round(
                resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1
            ),
            "peak_rss_tree_mb": round(tree.peak / 2**20, 1) if tree.peak else None,
        }
        sec = tmeta["seconds"]
        print(f"tokenizer training  {res['tokenizer_s']:8.2f} s   ({tmeta['vocab_size']} tokens; counting "
              f"{sec['count']:.1f} s, merges {sec['merges']:.1f} s)")  # fmt: skip
        print(
            f"packing (train)     {res['packing_s']:8.2f} s   ({res['tokens']} tokens, {res['rows']} rows)"
        )
        print(
            f"total               {res['total_s']:8.2f} s   {res['mb_per_s']:.1f} MB/s over {mb:.1f} MB"
        )
        print(f"peak RSS            self {res['peak_rss_self_mb']:.0f} MB, largest child "
              f"{res['peak_rss_largest_child_mb']:.0f} MB, whole tree {res['peak_rss_tree_mb']} MB")  # fmt: skip
        if args.hf_baseline:
            with TreeRSS() as tree:
                base = hf_baseline(text, tmp / "hf.bin", args.vocab_size, args.min_frequency)
            base["peak_rss_tree_mb"] = round(tree.peak / 2**20, 1) if tree.peak else None
            res["hf_baseline"] = {
                k: round(v, 2) if isinstance(v, float) else v for k, v in base.items()
            }
            print(f"hf baseline         tokenizer {base['tokenizer_s']:.2f} s + packing {base['packing_s']:.2f} s "
                  f"= {base['total_s']:.2f} s (tree peak {base['peak_rss_tree_mb']} MB)")  # fmt: skip
    if args.json:
        write_json(args.json, res)  # whole or not at all, its folder made (as tinylm.bench writes its own)
    return res


if __name__ == "__main__":
    setup_logging()  # progress lines on stderr
    with ctrl_c_ends_quietly():  # one line, as every tinylm command ends on Ctrl-C
        main()
