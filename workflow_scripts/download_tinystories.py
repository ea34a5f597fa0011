"""Rule download_tinystories: the dataset -> data/raw/<dataset>/{train,validation,test}.txt + meta.json.

    python workflow_scripts/download_tinystories.py --out-dir data/raw/tinystories \
        --params '{"name": "tinystories", "source": "hub", "hub_id": "roneneldan/TinyStories",
                   "text_column": "text", "local": {"train": null, "validation": null},
                   "synthetic": {"n_train": 4000, "n_validation": 400, "seed": 1234},
                   "seed": 42, "test_n": 5000, "train_n": 529930, "validation_n": null}'

--params is the config's `dataset:` section. Without network and without a cached copy, source
hub fails at once; use source local or synthetic (config/demo.yaml).

--seq-len is the config's packing.seq_len: a split too small to fill one packed row is refused before
any file is written, not by pack_tokens once a tokenizer is trained on it. The workflow gives it as
$TINYLM_PACKING_SEQ_LEN (rules/common.smk), not on the command line: the rule's command and --params
are what Snakemake rebuilds the data on, and packing settings must not rebuild it.
"""

import argparse
import os

from tinylm.cli import positive_int, run_script

SEQ_LEN_ENV = "TINYLM_PACKING_SEQ_LEN"


def main(args: argparse.Namespace) -> None:
    from tinylm.data import dataset_kwargs, prepare_raw

    prepare_raw(args.out_dir, params=args.params, seq_len=args.seq_len, **dataset_kwargs(args.params))


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--out-dir", required=True, help="data/raw/<dataset>")
parser.add_argument("--params", required=True, help="JSON: the config's dataset section")
parser.add_argument(
    "--seq-len", type=positive_int, default=os.environ.get(SEQ_LEN_ENV) or None,
    help=f"packing.seq_len: refuse a split too small to fill one packed row (default: ${SEQ_LEN_ENV}; "
    "neither: no such check)",
)

if __name__ == "__main__":
    run_script(main, parser)
