"""Throughput benchmark of the training step and the evaluation pass, on whatever device is here.

    python -m tinylm.bench                                   # CUDA: all models, batch 64 and 512
    python -m tinylm.bench --models condor --batch-sizes 8 --steps 5 --eval-rows 64   # a CPU smoke run
    python -m tinylm.bench --modes eager compiled --json bench.json
    python -m tinylm.bench --no-kernels --modes compiled   # plain attention + loss instead of tinylm.kernels
    python -m tinylm.bench --fp32-residual --modes compiled   # the residual stream in fp32 under bf16 too

It times the same step object the training loop runs (tinylm.step.Stepper: forward, backward,
clipping, AdamW, at the configured hyperparameters) after warm-up, with the device synchronized, on
random token rows held on the device. Mode `eager` is the straightforward path (no torch.compile, no
CUDA graph); `compiled` is what training uses on CUDA by default. MFU = model FLOPs per token (the
model's flops_per_token) x tokens/s / the stated peak of the device. Memory: on CUDA the peak of
memory held by tensors during each training run (model, optimizer, activations, the CUDA graph's
pool); on a CPU the process's peak resident set so far.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

if __name__ == "__main__":  # python -m tinylm.bench: a Ctrl-C while torch loads ends as one later does
    from .cli import ctrl_c_ends_quietly_from_here

    ctrl_c_ends_quietly_from_here()

import numpy as np
import torch
import yaml

from .cli import ctrl_c_ends_quietly, non_negative_int, positive_int
from .config import TrainConfig
from .devices import resolve_device
from .errors import ConfigError
from .evaluate import evaluate_loss
from .io import write_json
from .model import GPT, GPTConfig
from .step import Stepper, compile_model, lr_at, make_optimizer
from .workflow import check_config, check_yaml_syntax, merge_config, model_params, train_params

# Dense bf16 tensor-core peaks (datasheet, no sparsity) used for MFU; pass --peak-tflops otherwise.
# The first key in the device's name wins: the PCIe and NVL cards before their family's SXM figure.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200 NVL": 835.0, "H200": 989.0,
               "A100": 312.0, "L40S": 362.0, "4090": 165.0}

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "config.yaml"


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text} is not a number > 0")
    return value


def device_peak(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, f"{override:g} TFLOP/s (given)"
    if device.type != "cuda":
        return None, "no stated peak for CPUs: MFU not reported"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops, f"{tflops:g} TFLOP/s dense bf16 ({name})"
    return None, f"unknown GPU {name!r}: pass --peak-tflops for MFU"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fresh_compile_state() -> None:
    """Forget every earlier compilation, so each measurement compiles as a new training process does.

    All models share GPT.forward, and dynamo keeps at most `recompile_limit` (8) compiled versions of
    one function: a whole benchmark (three models, two batch sizes, evaluation) compiles it nine
    times, and the ninth fell back to the plain model without a word in the figures (condor's
    evaluation, measured last)."""
    torch.compiler.reset()


def bench_train(model_cfg: dict, train_cfg: dict, batch: int, seq_len: int, device, steps: int, warmup: int,
                compiled: bool, seed: int = 0, ready=None) -> dict:
    """Time `steps` training steps (after `warmup` steps) of one model at one batch size.

    `ready`, if given, is called between warm-up and timing (several processes line up there to be
    timed side by side: dev/concurrent-runs.py)."""
    _fresh_compile_state()
    cfg = TrainConfig.from_dict({**train_cfg, "batch_size": batch, "compile": compiled,
                                 "device": device.type, "wandb": {}})
    mcfg = GPTConfig.from_dict(model_cfg)
    torch.manual_seed(seed)
    model = GPT(mcfg).to(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    opt = make_optimizer(model, cfg, device)
    n_rows = max(4 * batch, 1024)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, mcfg.vocab_size, (n_rows, seq_len + 1), generator=gen, dtype=torch.int32)
    tokens = rows.to(device) if cuda else rows.numpy()
    from .distributed import DistInfo

    stepper = Stepper(model, opt, cfg, device, DistInfo(), tokens)
    rng = np.random.default_rng(seed)
    idx = [rng.integers(0, n_rows, batch) for _ in range(warmup + steps)]
    if cuda:
        idx = [torch.from_numpy(i).to(device) for i in idx]
    t0 = time.perf_counter()
    for s in range(warmup):
        stepper.step(s, idx[s])
    _sync(device)
    warm_sec = time.perf_counter() - t0
    if ready is not None:
        ready()
    t0 = time.perf_counter()
    for s in range(warmup, warmup + steps):
        stepper.step(s, idx[s])
    _sync(device)
    sec = time.perf_counter() - t0
    acc, _ = stepper.read_stats()
    loss = acc[0].item() / (warmup + steps)
    out = {"tokens_per_sec": steps * batch * seq_len / sec, "ms_per_step": 1000 * sec / steps,
           "warmup_sec": warm_sec, "mean_loss": loss, "graph": stepper.graph is not None,
           "n_params": model.num_params(), "flops_per_token": model.flops_per_token(seq_len),
           "lr_last": lr_at(warmup + steps - 1, cfg)}
    out["peak_mem_gib"] = _peak_memory_gib(device)
    del stepper, model, opt
    if cuda:
        torch.cuda.empty_cache()
    return out


def _peak_memory_gib(device) -> float:
    """CUDA: the most memory tensors held on the device since this run's model was built. CPU: the
    process's peak resident set so far (it never goes down, so later runs report at least as much)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def profile_train(model_cfg: dict, train_cfg: dict, batch: int, seq_len: int, device, steps: int = 5,
                  top: int = 40) -> str:
    """Kernel-time table of compiled training steps run without the CUDA graph (a graph replay hides
    its kernels from the profiler); the time split is the same."""
    prof = profiled_steps(model_cfg, train_cfg, batch, seq_len, device, steps)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70)


def profiled_steps(model_cfg: dict, train_cfg: dict, batch: int, seq_len: int, device, steps: int = 5):
    """torch.profiler's record of `steps` compiled training steps, without the CUDA graph, after three
    unrecorded ones."""
    from torch.profiler import ProfilerActivity, profile

    _fresh_compile_state()
    cfg = TrainConfig.from_dict({**train_cfg, "batch_size": batch, "compile": True, "device": device.type,
                                 "wandb": {}})
    mcfg = GPTConfig.from_dict(model_cfg)
    model = GPT(mcfg).to(device)
    opt = make_optimizer(model, cfg, device)
    rows = torch.randint(0, mcfg.vocab_size, (4 * batch, seq_len + 1), dtype=torch.int32, device=device)
    from .distributed import DistInfo

    stepper = Stepper(model, opt, cfg, device, DistInfo(), rows)
    stepper.eager_steps_left = None  # compiled steps, never captured: the profiler sees each kernel
    idx = torch.randint(0, 4 * batch, (steps + 3, batch), device=device)
    for s in range(3):
        stepper.step(s, idx[s])
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for s in range(3, steps + 3):
            stepper.step(s, idx[s])
        _sync(device)
    return prof


def bench_eval(model_cfg: dict, rows: int, seq_len: int, batch: int, device, compiled: bool, repeats: int = 3) -> dict:
    """Time one evaluation pass over `rows` random rows (best of `repeats`, after one warm-up pass)."""
    _fresh_compile_state()
    mcfg = GPTConfig.from_dict(model_cfg)
    model = GPT(mcfg).to(device)
    use_compiled = compiled and device.type == "cuda"  # as training evaluates with train.compile_eval
    # training's compile (bf16, evaluate_loss's default precision): the same cache key
    fn = compile_model(model, torch.bfloat16) if use_compiled else model
    data = torch.randint(0, mcfg.vocab_size, (rows, seq_len + 1), dtype=torch.int32)
    data = data.to(device) if device.type == "cuda" else data.numpy()
    evaluate_loss(fn, data, batch_size=batch, device=device)  # warm-up / compile
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        res = evaluate_loss(fn, data, batch_size=batch, device=device)
        _sync(device)
        times.append(time.perf_counter() - t0)
    sec = min(times)
    return {"rows": rows, "sec": sec, "tokens_per_sec": rows * seq_len / sec, "loss": res["loss"],
            "evaluated": "compiled" if use_compiled else "plain", "expected_loss_random_init": math.log(mcfg.vocab_size)}


def full_run(config: dict, model: str, workdir: Path, n_train: int, n_val: int, max_steps: int | None,
             model_overrides: dict | None = None, train_overrides: dict | None = None) -> dict:
    """The real training entry point (train()) at the config's defaults on synthetic stories, timed
    from the call to its return: data loading, compilation, every evaluation and checkpoint included."""
    from .data import build_synthetic_corpus
    from .train import train

    t0 = time.perf_counter()
    tok = config["tokenizer"]
    paths = build_synthetic_corpus(workdir, n_train=n_train, n_validation=n_val, vocab_size=tok["vocab_size"],
                                   seq_len=config["packing"]["seq_len"], special_tokens=tok["special_tokens"],
                                   min_frequency=tok["min_frequency"])
    data_sec = time.perf_counter() - t0
    tp = {**train_params(config, model), **(train_overrides or {})}
    if max_steps:
        tp["max_steps"] = max_steps
    run_dir = workdir / "run" / model
    t0 = time.perf_counter()
    summary = train(model_config={**model_params(config, model), **(model_overrides or {})}, train_config=tp,
                    train_bin=paths["train"], val_bin=paths["validation"], tokenizer_path=paths["tokenizer"],
                    run_dir=run_dir, eval_batch_size=config["eval"]["batch_size"])
    call_sec = time.perf_counter() - t0
    history = run_dir / "metrics.jsonl"
    return {"model": model, "max_steps": tp["max_steps"], "eval_every": tp["eval_every"], "data_sec": data_sec,
            "call_sec": call_sec, **summary, **time_split(history, tp["batch_size"], config["packing"]["seq_len"])}


def time_split(history: Path, batch: int, seq_len: int) -> dict:
    """Where a run's step time went, from its metrics.jsonl: the median ms/step of its train lines but
    the first (steady steps, comparable with the benchmark's), what the steps took beyond that
    (compilation, CUDA-graph capture), and the first evaluation (with train.compile_eval it compiles
    the evaluation graph) beside the others."""
    rows = [json.loads(line) for line in history.read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    done = next(r for r in rows if r["kind"] == "done")
    evals = [r["sec"] for r in rows if r["kind"] == "eval"]
    ms = [1000 * batch * seq_len / r["tokens_per_sec"] for r in train[1:]]
    steady = float(np.median(ms)) if ms else math.nan
    return {"steady_ms_per_step": steady, "startup_sec": done["train_sec"] - steady * done["final_step"] / 1000,
            "first_eval_sec": evals[0] if evals else math.nan, "other_evals_sec": sum(evals[1:]),
            "n_evals": len(evals)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="tinylm bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", nargs="+", default=[str(DEFAULT_CONFIG)], metavar="FILE",
                    help="workflow config files, each merged over config/config.yaml as `snakemake --configfile` "
                         "merges them (default: config/config.yaml alone)")
    ap.add_argument("--models", nargs="+", default=None, help="model names from the config (default: all)")
    ap.add_argument("--batch-sizes", nargs="+", type=positive_int, default=None, help="default: 64 512 on CUDA, 8 on CPU")
    ap.add_argument("--seq-len", type=positive_int, default=None, help="default: packing.seq_len")
    ap.add_argument("--steps", type=positive_int, default=None, help="timed steps (default 200 on CUDA, 3 on CPU)")
    ap.add_argument("--warmup", type=non_negative_int, default=None, help="untimed steps first (default 20 on CUDA, 1 on CPU)")
    ap.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=None,
                    help="eager = no torch.compile/CUDA graph; compiled = the training default on CUDA")
    ap.add_argument("--eval-rows", type=positive_int, default=None, help="rows per evaluation pass (default 36000 on CUDA, 64 on CPU)")
    ap.add_argument("--eval-batch", type=positive_int, default=None, help="default: eval.batch_size")
    ap.add_argument("--device", default="auto", help="auto (CUDA if present) | cpu | cuda | cuda:N (default: %(default)s)")
    ap.add_argument("--peak-tflops", type=positive_float, default=None,
                    help="the device's peak TFLOP/s for MFU (default: the stated dense bf16 peak of known GPUs)")
    ap.add_argument("--json", default=None, help="write all figures here")
    ap.add_argument("--no-kernels", action="store_true",
                    help="the plain PyTorch paths instead of tinylm.kernels, as TINYLM_KERNELS=0 (before/after)")
    ap.add_argument("--fp32-residual", action="store_true",
                    help="keep the residual stream in fp32 under bf16 autocast (model config fp32_residual)")
    ap.add_argument("--profile", action="store_true",
                    help="CUDA: also print the kernel-time table of each model's compiled step")
    ap.add_argument("--full-run", nargs="+", default=None, metavar="MODEL",
                    help="instead: train MODEL(s) with train() at the config's defaults on synthetic stories")
    ap.add_argument("--full-run-dir", default="bench-full-run")
    ap.add_argument("--full-run-stories", nargs=2, type=positive_int, default=[40000, 8000], metavar=("TRAIN", "VAL"))
    ap.add_argument("--full-run-steps", type=positive_int, default=None, help="override train.max_steps")
    ap.add_argument("--full-run-compile-eval", action="store_true", help="set train.compile_eval")
    args = ap.parse_args(argv)
    if args.no_kernels:
        from . import kernels

        os.environ[kernels.SWITCH] = "0"

    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for path in map(Path, args.config):
        if not path.is_file():
            ap.error(f"--config {path}: no such file")
        try:
            settings = check_yaml_syntax(path) or {}
        except ConfigError as e:
            ap.error(f"--config {e}")
        if not isinstance(settings, dict):
            ap.error(f"--config {path}: holds a {type(settings).__name__}, not settings (key: value lines)")
        merge_config(config, settings)
        try:  # what Snakemake would refuse before any job, named as it does, before any work
            check_config(config)
        except ConfigError as e:
            ap.error(f"--config {path}: {e}")
    for flag, names in (("--models", args.models), ("--full-run", args.full_run)):
        if unknown := [m for m in names or [] if m not in config["models"]]:
            ap.error(f"{flag} {' '.join(unknown)}: not a model of the config ({', '.join(config['models'])})")
    try:
        device = resolve_device(args.device, setting="--device", warn_cpu=False)
    except ConfigError as e:
        ap.error(str(e))
    cuda = device.type == "cuda"
    if cuda:
        if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):  # torch >= 2.6
            # a figure of the plain model labelled "compiled" is worse than no figure
            torch._dynamo.config.fail_on_recompile_limit_hit = True
    models = args.models or list(config["models"])
    batches = args.batch_sizes or ([64, 512] if cuda else [8])
    seq_len = args.seq_len or config["packing"]["seq_len"]
    # learned positions: a longer row fails in the model's forward, after the models before it were timed
    if short := {m: n for m in models if (n := GPTConfig.from_dict(model_params(config, m)).max_seq_len) < seq_len}:
        least = min(short.values())
        ap.error(f"--seq-len {seq_len}: more positions than model{'s' * (len(short) > 1)} {', '.join(short)} "
                 f"{'have' if len(short) > 1 else 'has'} (max_seq_len {', '.join(map(str, dict.fromkeys(short.values())))}); "
                 f"give at most {least}, or raise max_seq_len in a --config file")
    steps = args.steps or (200 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (20 if cuda else 1)
    modes = args.modes or (["eager", "compiled"] if cuda else ["eager"])
    eval_rows = args.eval_rows or (36000 if cuda else 64)
    eval_batch = args.eval_batch or config["eval"]["batch_size"]
    peak, peak_text = device_peak(device, args.peak_tflops)
    env = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
           "peak": peak_text, "kernels": not args.no_kernels, "fp32_residual": args.fp32_residual,
           "seq_len": seq_len, "steps": steps, "warmup": warmup, "config": args.config}
    print(f"# tinylm.bench on {env['device']}, torch {env['torch']}; peak {peak_text}"
          f"{'' if env['kernels'] else '; plain attention and loss (--no-kernels)'}"
          f"{'; fp32 residual stream' if args.fp32_residual else ''}", flush=True)
    overrides = {"fp32_residual": True} if args.fp32_residual else {}
    if args.full_run:
        from .io import setup_logging

        setup_logging()
        train_over = {"compile_eval": True} if args.full_run_compile_eval else {}
        runs = [full_run(config, m, Path(args.full_run_dir), *args.full_run_stories, args.full_run_steps,
                         overrides, train_over) for m in args.full_run]
        for r in runs:
            print(f"full run {r['model']}: {r['final_step']} steps (eval every {r['eval_every']}): "
                  f"train() call {r['call_sec']:.1f} s, training wall {r['train_wall_sec']:.1f} s "
                  f"(steps {r['train_sec']:.1f} s + evaluation {r['eval_sec']:.1f} s), "
                  f"{r['train_tokens_per_sec'] / 1e6:.2f} M tok/s, best val loss {r['best_val_loss']:.4f}")
            steps = (f"{r['steady_ms_per_step']:.3f} ms/step (median of the train lines but the first) and "
                     f"{r['startup_sec']:.1f} s beyond that (compilation, capture)"
                     if math.isfinite(r["steady_ms_per_step"]) else
                     "fewer than two train lines logged, no steady pace apart from start-up (more steps, or a smaller train.log_every)")
            print(f"  steps: {steps}; evaluation: first "
                  f"{r['first_eval_sec']:.2f} s, {r['n_evals'] - 1} more in {r['other_evals_sec']:.2f} s")
        if args.json:
            write_json(args.json, {"env": env, "full_runs": runs})
        return

    results = []
    mem_label = "peak GPU memory" if cuda else "peak RSS"
    for mode in modes:
        for name in models:
            mp, tp = {**model_params(config, name), **overrides}, train_params(config, name)
            for b in batches:
                r = bench_train(mp, tp, b, seq_len, device, steps, warmup, compiled=(mode == "compiled"))
                r.update(kind="train", model=name, batch=b, mode=mode)
                r["mfu"] = r["tokens_per_sec"] * r["flops_per_token"] / (peak * 1e12) if peak else None
                results.append(r)
                print(f"train {name:9s} {mode:8s} batch {b:5d}: {_mtok(r['tokens_per_sec']):>8s} M tok/s "
                      f"{r['ms_per_step']:8.2f} ms/step  MFU {_pct(r['mfu'])}  {mem_label} {r['peak_mem_gib']:.2f} GiB",
                      flush=True)
            if args.profile and mode == "compiled" and cuda:
                for b in batches:
                    print(f"\n## profile: {name}, batch {b}\n" + profile_train(mp, tp, b, seq_len, device), flush=True)
            r = bench_eval(mp, eval_rows, seq_len, eval_batch, device, compiled=(mode == "compiled"))
            r.update(kind="eval", model=name, batch=min(eval_batch, eval_rows), mode=mode)  # rows a pass holds
            results.append(r)
            print(f"eval  {name:9s} {mode:8s} {eval_rows} rows: {r['sec']:.3f} s "
                  f"({_mtok(r['tokens_per_sec'])} M tok/s), {r['evaluated']} model", flush=True)

    print(f"\n| kind | model | mode | batch | tokens/s | ms/step or s/pass | MFU | {mem_label} (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        t = f"{r['ms_per_step']:.2f} ms" if r["kind"] == "train" else f"{r['sec']:.3f} s ({r['rows']} rows)"
        mem = f"{r['peak_mem_gib']:.2f}" if "peak_mem_gib" in r else "-"
        print(f"| {r['kind']} | {r['model']} | {r['mode']} | {r['batch']} | {_mtok(r['tokens_per_sec'])}M | {t} | "
              f"{_pct(r.get('mfu'))} | {mem} |")
    if args.json:
        write_json(args.json, {"env": env, "results": results})


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _mtok(tokens_per_sec: float) -> str:
    """Tokens/s in millions: three decimals, or below 0.1M three significant digits (a CPU's few hundred
    tokens/s would read 0.000)."""
    m = tokens_per_sec / 1e6
    return f"{m:.3f}" if m >= 0.1 else f"{m:.3g}"


if __name__ == "__main__":
    with ctrl_c_ends_quietly():  # as `tinylm bench` ends on Ctrl-C (tinylm.__main__)
        main()
