"""Rule pack_tokens: data/raw/<dataset>/<split>.txt -> data/processed/<dataset>/<name>/<split>.bin + <split>.meta.json.

    RAYON_NUM_THREADS=4 python workflow_scripts/pack_tokens.py --text data/raw/tinystories/train.txt \
        --tokenizer artifacts/tokenizers/tinystories/bpe8192/tokenizer.json --out data/processed/tinystories/bpe8192/train.bin \
        --params '{"seq_len": 128, "dtype": "auto", "encode_batch": 2048}'

RAYON_NUM_THREADS (the rule's threads) caps the worker processes.
"""

import argparse

from tinylm.cli import run_script


def main(args: argparse.Namespace) -> None:
    from tinylm.data import pack_split
    from tinylm.data.sources import raw_split_more_stories

    # a split that packs into no row is named with the dataset setting that sized it (the raw meta.json's)
    pack_split(args.text, args.tokenizer, args.out, params=args.params,
               more_stories=raw_split_more_stories(args.text), **args.params)  # fmt: skip


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--text", required=True, help="a split in the <|endoftext|> text format")
parser.add_argument("--tokenizer", required=True, help="tokenizer.json")
parser.add_argument(
    "--out", required=True, help="<split>.bin; <split>.meta.json is written beside it"
)
parser.add_argument("--params", required=True, help="JSON: the config's packing section")

if __name__ == "__main__":
    run_script(main, parser)
