"""Several training runs on one GPU at once: aggregate tokens/s of 1, 2, 4 ... concurrent processes.

    python3 dev/concurrent-runs.py --model baseline --batch 64 --procs 1 2 4 --steps 1500

Each process builds the model as a training job does (compiled step, CUDA graph), warms up, waits at a
barrier so that the timed windows overlap, then times `--steps` steps. The figure that decides whether
the local profile should run several GPU jobs per GPU is the sum of the processes' tokens/s against
one process alone (docs/performance.md, "Several runs on one GPU").
"""

from __future__ import annotations

import argparse
import multiprocessing as mp

import torch
import yaml

from tinylm.bench import bench_train
from tinylm.workflow import model_params, train_params


def worker(rank, barrier, queue, args, model_cfg, train_cfg):
    torch.cuda.set_device(0)
    out = bench_train(model_cfg, train_cfg, args.batch, args.seq_len, torch.device("cuda", 0), args.steps,
                      args.warmup, compiled=True, seed=rank, ready=barrier.wait)
    queue.put(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="config/config.yaml", help="workflow config holding the model")
    p.add_argument("--model", default="baseline", help="model name under models:")
    p.add_argument("--batch", type=int, default=64, help="rows per step in each process")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4], help="concurrent processes to try")
    p.add_argument("--steps", type=int, default=1500, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (compile, graph capture)")
    args = p.parse_args()
    with open(args.config, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    model_cfg = {**model_params(config, args.model), "vocab_size": config["tokenizer"]["vocab_size"]}
    train_cfg = train_params(config, args.model)
    ctx = mp.get_context("spawn")
    rows = []
    for n in args.procs:
        barrier, queue = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=worker, args=(r, barrier, queue, args, model_cfg, train_cfg)) for r in range(n)]
        for proc in procs:
            proc.start()
        outs = [queue.get() for _ in procs]
        for proc in procs:
            proc.join()
        total = sum(o["tokens_per_sec"] for o in outs)
        rows.append((n, total, max(o["ms_per_step"] for o in outs), max(o["peak_mem_gib"] for o in outs)))
        print(f"{n} process(es): {total / 1e6:.3f} M tok/s in all, slowest {rows[-1][2]:.2f} ms/step", flush=True)
    base = rows[0][1]
    print(f"\n| processes | {args.model} batch {args.batch}: tokens/s in all | vs one | slowest ms/step "
          "| peak GiB each |\n|---|---|---|---|---|")
    for n, total, ms, mem in rows:
        print(f"| {n} | {total / 1e6:.3f}M | {total / base:.2f}x | {ms:.2f} | {mem:.2f} |")


if __name__ == "__main__":
    main()
