"""Rule download_tinystories: the dataset -> data/raw/<dataset>/{train,validation,test}.txt + meta.json.

    python workflow_scripts/download_tinystories.py --out-dir data/raw/tinystories \
        --params '{"name": "tinystories", "source": "hub", "hub_id": "roneneldan/TinyStories",
                   "text_column": "text", "local": {"train": null, "validation": null},
                   "synthetic": {"n_train": 4000, "n_validation": 400, "seed": 1234},
                   "seed": 42, "test_n": 5000, "train_n": 529930, "validation_n": null}'

--params is the config's `dataset:` section. Without network and without a cached copy, source
hub fails at once; use source local or synthetic (config/demo.yaml).
"""

import argparse

from tinylm.cli import run_script


def main(args: argparse.Namespace) -> None:
    from tinylm.data import dataset_kwargs, prepare_raw

    prepare_raw(args.out_dir, params=args.params, **dataset_kwargs(args.params))


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--out-dir", required=True, help="data/raw/<dataset>")
parser.add_argument("--params", required=True, help="JSON: the config's dataset section")

if __name__ == "__main__":
    run_script(main, parser)
