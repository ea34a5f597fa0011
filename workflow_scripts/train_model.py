"""Rule train_model: packed splits + tokenizer -> best_model.pt, metrics.jsonl and config.json.

    python workflow_scripts/train_model.py --name condor --train-bin data/processed/tinystories/bpe8192/train.bin \
        --val-bin data/processed/tinystories/bpe8192/validation.bin --tokenizer artifacts/tokenizers/tinystories/bpe8192/tokenizer.json \
        --best artifacts/runs/condor/checkpoints/best_model.pt --history artifacts/runs/condor/metrics.jsonl \
        --config artifacts/runs/condor/config.json --run-dir artifacts/runs/condor --threads 4 \
        --params '{"model": {...}, "train": {...}, "eval_batch_size": 512}' --record-only '{"log_every": 50, ...}'

With train.gpus > 1 the rule starts this script under torchrun; every process runs it, rank 0 writes.
With one process on a machine with several visible GPUs it claims the least used one first
(tinylm.gpu_claim), so that jobs Snakemake runs side by side spread over the GPUs.
Exit status 75 means "stopped by a signal, checkpoint saved": running it again resumes.
"""

import argparse

from tinylm.cli import parse_params, run_script


def main(args: argparse.Namespace) -> None:
    record_only = parse_params(args.record_only, parser, "--record-only")
    from tinylm.gpu_claim import claim_gpu_for_job

    claim_gpu_for_job(args.params["train"].get("device", "auto"))  # before anything starts CUDA
    import torch

    from tinylm.train import train

    torch.set_num_threads(args.threads)
    train(
        model_config=args.params["model"],
        train_config={**args.params["train"], **record_only},
        eval_batch_size=args.params["eval_batch_size"],
        train_bin=args.train_bin,
        val_bin=args.val_bin,
        tokenizer_path=args.tokenizer,
        run_dir=args.run_dir,
        best_path=args.best,
        history_path=args.history,
        config_path=args.config,
        run_name=args.name,
    )


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--name", required=True, help="the run's name: a model in config models:, or a seed or sweep run of one")
parser.add_argument("--train-bin", required=True, help="packed training split (.bin)")
parser.add_argument("--val-bin", required=True, help="packed validation split (.bin)")
parser.add_argument(
    "--tokenizer", required=True, help="the tokenizer.json the splits were packed with"
)
parser.add_argument("--best", required=True, help="the best checkpoint to write")
parser.add_argument("--history", required=True, help="metrics.jsonl to write")
parser.add_argument(
    "--config", required=True, help="config.json (the resolved settings) to write"
)
parser.add_argument(
    "--run-dir", required=True, help="folder for checkpoints/last.pt (resume) and W&B files"
)
parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (per process)")
parser.add_argument(
    "--params",
    required=True,
    help="JSON: model (flat GPTConfig), train (resolved), eval_batch_size",
)
parser.add_argument(
    "--record-only",
    default="{}",
    help="JSON: the train settings that change what the run records, not its results (log_every, "
    "save_every, max_gpus, wandb); kept apart so that changing them retrains nothing",
)

if __name__ == "__main__":
    from tinylm.lifeline import note_job

    note_job()  # before torch is imported: a job that ends meanwhile is still noticed
    run_script(main, parser)
