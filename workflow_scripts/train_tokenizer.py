"""Rule train_tokenizer: data/raw/<dataset>/train.txt -> artifacts/tokenizers/<dataset>/<name>/tokenizer.json + tokenizer_meta.json.

    RAYON_NUM_THREADS=4 python workflow_scripts/train_tokenizer.py --text data/raw/tinystories/train.txt \
        --out-dir artifacts/tokenizers/tinystories/bpe8192 \
        --params '{"vocab_size": 8192, "special_tokens": ["<pad>", "<bos>", "<eos>", "<unk>"], "min_frequency": 2}'

RAYON_NUM_THREADS (the rule's threads) caps the worker processes.
"""

import argparse

from tinylm.cli import run_script


def main(args: argparse.Namespace) -> None:
    from tinylm.data import train_tokenizer

    train_tokenizer(args.text, args.out_dir, params=args.params, **args.params)


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--text", required=True, help="train split in the <|endoftext|> text format")
parser.add_argument("--out-dir", required=True, help="artifacts/tokenizers/<dataset>/<name>")
parser.add_argument(
    "--params", required=True, help="JSON: vocab_size, special_tokens, min_frequency"
)

if __name__ == "__main__":
    run_script(main, parser)
