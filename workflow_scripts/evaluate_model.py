"""Rule evaluate_model: best_model.pt -> <results_dir>/runs/<run>/metrics.json.

    python workflow_scripts/evaluate_model.py --name condor --checkpoint artifacts/runs/condor/checkpoints/best_model.pt \
        --tokenizer artifacts/tokenizers/tinystories/bpe8192/tokenizer.json --val-bin data/processed/tinystories/bpe8192/validation.bin \
        --test-bin data/processed/tinystories/bpe8192/test.bin --out artifacts/runs/condor/metrics.json --threads 2 \
        --params '{"batch_size": 512, "prompts": [...], "max_new_tokens": 64, ...}'
"""

import argparse

from tinylm.cli import run_script


def main(args: argparse.Namespace) -> None:
    import torch

    from tinylm.evaluate import evaluate_run

    torch.set_num_threads(args.threads)
    evaluate_run(
        model_name=args.name,
        checkpoint=args.checkpoint,
        tokenizer_path=args.tokenizer,
        val_bin=args.val_bin,
        test_bin=args.test_bin,
        out_json=args.out,
        **args.params,
    )


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--name", required=True, help="the run's name (a model, or a seed or sweep run of one); metrics.json records it as model")
parser.add_argument("--checkpoint", required=True, help="the run's best_model.pt")
parser.add_argument("--tokenizer", required=True, help="the tokenizer.json it was trained with")
parser.add_argument("--val-bin", required=True, help="packed validation split (.bin)")
parser.add_argument("--test-bin", required=True, help="packed test split (.bin)")
parser.add_argument("--out", required=True, help="metrics.json to write")
parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
parser.add_argument(
    "--params", required=True,
    help="JSON: the config's eval section with device, precision and cuda_graph (the run's train.compile)"
)

if __name__ == "__main__":
    run_script(main, parser)
