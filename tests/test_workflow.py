"""The Snakemake workflow itself: lint, dry runs, the offline demo end to end, reruns, verify."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import DEMO_CONFIGS, REPO, planned_jobs, snakemake

MODELS = ["baseline", "falcon", "condor"]
DEMO = "artifacts/demo"  # config/demo.yaml's results_dir


def test_lint_is_clean(repo_copy):
    res = snakemake(repo_copy, "--lint", check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Lints for" not in res.stdout + res.stderr


def test_jobs_import_the_library_from_a_checkout_whose_path_holds_a_space(tmp_path):
    """The rules' shell prefix puts the checkout's lib/ on PYTHONPATH: a checkout path with a space in
    it (a "My Projects" folder) broke its `export`, and with it every job. rule verify is the cheapest
    job: with nothing built it says so, from the library."""
    from conftest import copy_repo

    work = copy_repo(tmp_path / "my checkout")
    res = snakemake(work, "--cores", "1", "verify", check=False)
    out = res.stdout + res.stderr
    assert "not a valid identifier" not in out and "nothing this config makes is built yet" in out, out[-3000:]


def test_dry_run_default_config_plans_the_whole_chain(repo_copy):
    jobs = planned_jobs(snakemake(repo_copy, "-n", "--cores", "4"))
    assert jobs == {"all": 1, "download_tinystories": 1, "train_tokenizer": 1, "pack_tokens": 3,
                    "train_model": 3, "evaluate_model": 3, "summarize": 1}


def test_dry_run_one_model_target(repo_copy):
    jobs = planned_jobs(snakemake(repo_copy, "-n", "--cores", "4", "artifacts/runs/condor/metrics.json"))
    assert jobs == {"download_tinystories": 1, "train_tokenizer": 1, "pack_tokens": 3, "train_model": 1,
                    "evaluate_model": 1}


def test_evaluation_job_replays_a_cuda_graph_only_where_the_run_compiles(repo_copy):
    """evaluate_model hands the run's train.compile to evaluate_run as cuda_graph: with compile off
    a run and its evaluation run the plain model as it is (README, "Training")."""
    for compile_ in ("true", "false"):
        (repo_copy / "compile.yaml").write_text(f"train: {{compile: {compile_}}}\n")
        res = snakemake(repo_copy, "-n", "-p", "--cores", "1", "artifacts/runs/condor/metrics.json",
                        "--configfile", "compile.yaml")
        commands = [line for line in (res.stdout + res.stderr).splitlines() if "evaluate_model.py" in line]
        assert commands and all(f'"cuda_graph": {compile_}' in line for line in commands), commands


def test_a_whole_number_for_a_setting_of_type_number_is_passed_as_the_same_parameter(repo_copy):
    """`grad_clip: 1` is the default 1.0 and `temperature: 1` is 1.0: the rules' parameters, which decide
    whether Snakemake reruns a finished job, carry them as the default's type, so writing a value without
    its point retrains and re-evaluates nothing."""
    (repo_copy / "ints.yaml").write_text("train: {grad_clip: 1, weight_decay: 0}\neval: {temperature: 1}\n")
    res = snakemake(repo_copy, "-n", "-p", "--cores", "1", "artifacts/runs/condor/metrics.json",
                    "--configfile", "ints.yaml")
    lines = (res.stdout + res.stderr).splitlines()
    train = [line for line in lines if "train_model.py" in line]
    evaluate = [line for line in lines if "evaluate_model.py" in line]
    assert train and all('"grad_clip": 1.0' in line and '"weight_decay": 0.0' in line for line in train), train
    assert evaluate and all('"temperature": 1.0' in line for line in evaluate), evaluate


def job_priorities(res, rule: str, wildcard: str = "run") -> dict[str, float]:
    """`wildcard`'s value -> priority of each `rule` job a dry run lists (0 where it prints none)."""
    out = {}
    for block in re.split(r"^\[.*\]$|^$", res.stdout + res.stderr, flags=re.M):  # a job's time, or a blank line
        if re.match(rf"\s*(local)?rule {rule}:", block):
            run = re.search(rf"wildcards: {wildcard}=([^,\s]+)", block).group(1)
            prio = re.search(r"priority: (\S+)", block)
            out[run] = float(prio.group(1)) if prio else 0.0
    return out


def test_the_costliest_run_trains_first_and_its_evaluation_keeps_its_place(repo_copy):
    """Costliest first: on one GPU the study then ends on condor's short evaluation instead of
    falcon's. Each evaluation has its run's priority, so a finished run's evaluation goes before the
    next training where they compete for cores."""
    res = snakemake(repo_copy, "-n", "--cores", "4")
    train = job_priorities(res, "train_model")
    assert set(train) == set(MODELS)
    assert train["falcon"] > train["baseline"] > train["condor"] > 0, train
    assert job_priorities(res, "evaluate_model") == train
    # the splits come before any training: the test split, which only evaluations read, waited behind
    # the trainings when its priority was lower than theirs together (Snakemake's default scheduler
    # starts the set of jobs whose priorities sum highest)
    pack = job_priorities(res, "pack_tokens", "split")
    assert set(pack) == {"train", "validation", "test"}
    assert min(pack.values()) > 2 * sum(train.values()), pack


def test_dry_run_demo_config(repo_copy):
    jobs = planned_jobs(snakemake(repo_copy, "-n", "--cores", "4", "--configfile", "config/demo.yaml"))
    assert jobs["train_model"] == 3 and jobs["download_tinystories"] == 1


def test_dry_run_sweep_demo_plans_one_job_per_run(repo_copy):
    res = snakemake(repo_copy, "-n", "--cores", "4", "--configfile", "config/sweep-demo.yaml")
    assert planned_jobs(res) == {"all": 1, "download_tinystories": 1, "train_tokenizer": 1, "pack_tokens": 3,
                                 "train_model": 4, "evaluate_model": 4, "summarize": 1}
    runs = set(re.findall(r"artifacts/sweep-demo/runs/([^/]+)/metrics\.json", res.stdout + res.stderr))
    assert runs == {f"condor-lr{lr}-seed{seed}" for lr in ("0.001", "0.003") for seed in (1, 2)}


# A config on local text files (written by local_config), with the demo's tokenizer name on other data;
# condor alone (seeds: [] runs a model at none): the point is where its files go.
LOCAL_CONFIG = """
results_dir: artifacts/local
dataset:
  name: local-stories
  source: local
  local: {train: stories/train.txt, validation: stories/validation.txt}
  test_n: 60
  train_n: null
tokenizer: {name: demo-bpe2048, vocab_size: 2048}
packing: {seq_len: 64}
train: {lr: 1.0e-3}
models: {baseline: {seeds: []}, falcon: {seeds: []}}
"""
# Shrinks any config to seconds per run, for tests that run several configs.
TINY = "train: {batch_size: 8, max_steps: 20, warmup_steps: 2, eval_every: 10, eval_rows: 64, save_every: 10, log_every: 5}\neval: {max_new_tokens: 8}\n"


def local_config(workdir: Path) -> str:
    """Two small story files in the TinyStories text format, and a config reading them; its name."""
    from tinylm.data.synthetic import generate_stories

    (workdir / "stories").mkdir()
    for split, n, seed in (("train", 600, 1), ("validation", 60, 2)):
        text = "".join(f"{story}\n<|endoftext|>\n" for story in generate_stories(n, seed=seed))
        (workdir / "stories" / f"{split}.txt").write_text(text)
    (workdir / "local.yaml").write_text(LOCAL_CONFIG)
    return "local.yaml"


def planned_paths(res) -> set[str]:
    """Every output, log and benchmark path a dry run lists."""
    lines = re.findall(r"^    (?:output|log|benchmark): (.*)$", res.stdout + res.stderr, re.M)
    return {path for line in lines for path in line.split(", ")}


@pytest.mark.parametrize("typed", ["artifacts/tiny/", "./artifacts/tiny"])
def test_a_results_dir_typed_with_a_slash_or_dot_plans_the_same_paths(repo_copy, typed):
    """results_dir as a user may type it: paths under `artifacts/tiny/` came out as `artifacts/tiny//runs/...`
    and Snakemake warned of a double '/' in each of dozens of rules."""
    res = snakemake(repo_copy, "-n", "--cores", "1", "--configfile", "config/demo.yaml", "--config",
                    f"results_dir={typed}")
    out = res.stdout + res.stderr
    assert "double '/'" not in out and "artifacts/tiny/runs/condor/metrics.json" in out, out[-3000:]
    assert planned_paths(res) == planned_paths(snakemake(repo_copy, "-n", "--cores", "1", "--configfile",
                                                         "config/demo.yaml", "--config", "results_dir=artifacts/tiny"))


def test_a_run_asking_for_more_gpus_than_snakemake_has_is_refused_before_any_job(repo_copy):
    """Snakemake lowers a job's `gpu` request to the --resources limit without a word and starts it;
    torchrun would then start train.gpus processes on GPUs the user did not give. The dry run warns of
    it, the real run stops before its first job, naming the run, the setting and the fix."""
    (repo_copy / "gpus.yaml").write_text("models: {condor: {train: {gpus: 2}}}\n")

    def plan(target: str, gpus: int, *args: str, check: bool = True):
        # --resources takes every word up to the next option: the target goes first
        return snakemake(repo_copy, target, *args, "--cores", "1", "--resources", f"gpu={gpus}",
                         "--configfile", "gpus.yaml", check=check)

    condor = "artifacts/runs/condor/metrics.json"
    dry = plan(condor, 1, "-n")
    assert re.search(r"condor: train.gpus = 2 .* gpu=1", dry.stdout + dry.stderr), dry.stdout[-3000:]
    res = plan(condor, 1, check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and re.search(r"condor: train.gpus = 2 .* gpu=1", out), out[-3000:]
    assert "--resources gpu=2" in out
    assert not (repo_copy / "data").exists()  # no job ran
    given = plan(condor, 2, "-n")  # given the GPUs, the plan goes on
    assert "train.gpus" not in given.stdout + given.stderr
    (repo_copy / "gpus.yaml").write_text("models: {condor: {train: {gpus: 2, device: cpu}}}\n")
    on_cpu = plan(condor, 1, "-n")  # two processes on the CPU use no GPU
    assert "train.gpus" not in on_cpu.stdout + on_cpu.stderr


def test_a_sweep_figure_and_a_moe_figure_of_one_name_are_refused(repo_copy):
    """A MoE model named `sweep` and a sweep named `expert_load` would both write
    plots/sweep_expert_load.png, the later figure over the earlier: refused before any job, naming both."""
    (repo_copy / "clash.yaml").write_text(
        "models:\n  sweep: {d_model: 64, n_layers: 1, n_heads: 2, d_ff: 128, max_seq_len: 128, ffn: moe,\n"
        "          moe: {n_experts: 4, top_k: 2, d_ff_expert: 64}}\n"
        "sweeps:\n  expert_load: {model: condor, grid: {train.lr: [1.0e-3, 2.0e-3]}}\n")
    res = snakemake(repo_copy, "-n", "--cores", "1", "--configfile", "clash.yaml", check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert "artifacts/plots/sweep_expert_load.png" in out and "sweep expert_load" in out and "run sweep" in out


def test_dry_run_configs_write_apart(repo_copy):
    """The default config, the demo, the sweep demo and a local-files config share no file but their
    data, and share data only where they name the same dataset and tokenizer."""
    configs = {"default": (), "demo": ("config/demo.yaml",), "sweep-demo": ("config/sweep-demo.yaml",),
               "smoke": ("config/smoke.yaml",), "local": (local_config(repo_copy),)}
    paths = {}
    for name, files in configs.items():
        args = ("--configfile", *files) if files else ()
        paths[name] = planned_paths(snakemake(repo_copy, "-n", "--forceall", "--cores", "2", *args))
    for name, results in (("default", "artifacts"), ("demo", "artifacts/demo"),
                          ("sweep-demo", "artifacts/sweep-demo"), ("smoke", "artifacts/smoke"),
                          ("local", "artifacts/local")):
        for kind in ("runs", "logs", "benchmarks"):
            assert any(p.startswith(f"{results}/{kind}/") for p in paths[name]), (name, kind)
        # every job is timed, the summary too (dev/study.py prints each job's seconds from these)
        assert f"{results}/benchmarks/summarize.tsv" in paths[name], name
    for (a, planned_a), (b, planned_b) in itertools.combinations(paths.items(), 2):
        shared = planned_a & planned_b
        if {a, b} == {"demo", "sweep-demo"}:  # the same dataset and tokenizer by name: built once for both
            assert shared and all(p.startswith(("data/", "artifacts/tokenizers/", "logs/", "benchmarks/"))
                                  and "synthetic-demo" in p for p in shared), sorted(shared)
        else:
            assert not shared, (a, b, sorted(shared)[:5])


def overrides(workdir, text: str) -> str:
    """A config file (merged over config.yaml) in the work copy; returns its name."""
    (workdir / "override.yaml").write_text(text)
    return "override.yaml"


def parquet_of_numbers(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), path)


LOCAL = "dataset: {source: local, local: {train: stories.txt, validation: %s}}"
STORIES = "Once upon a time.\n<|endoftext|>\nThe end.\n<|endoftext|>\n"
SECRET = "0123456789abcdef-not-a-real-key"
CONFIG_LINES = len((REPO / "config" / "config.yaml").read_text().splitlines())

# Bad inputs a user may give: each is refused before any job runs, with a short message naming it.
# (files to write into the work copy, the config override, a string the message must hold)
BAD_INPUTS = [
    ({}, "packing: {seq_len: 0}", "packing.seq_len = 0 must be >= 1"),
    ({}, "train: {gpus: 0}", "train.gpus = 0"),
    ({}, "models: {condor: {n_heads: 3}}", "n_heads"),
    ({}, "bogus: 1", "unknown key 'bogus' in config"),
    ({}, "train: {batch_size: many}", "batch_size"),
    ({}, "trian: {lr: 0.001}", "unknown key 'trian' in config (did you mean 'train'?)"),
    ({}, "train: {bach_size: 32}", "unknown key 'bach_size' in train (did you mean 'batch_size'?)"),
    ({}, "models: {condor: {n_head: 2}}",
     "override.yaml, line 1: unknown key 'n_head' in models.condor (did you mean 'n_heads'?)"),
    ({}, "train: {seed: -1}", "train.seed = -1 must be >= 0"),
    ({}, "dataset: {seed: -1}", "dataset.seed = -1 must be >= 0"),
    ({}, "eval: {seed: -1}", "eval.seed = -1 must be >= 0"),
    ({}, "dataset: {synthetic: {seed: -1}}", "dataset.synthetic.seed = -1 must be >= 0"),
    ({}, "results_dir: artifacts/x\ntrain:\n  beta2: 1.0\n", "override.yaml, line 3: train.beta2 = 1.0 must be < 1"),
    ({}, "train: {beta1: 1.0}", "train.beta1 = 1.0 must be < 1"),
    ({}, "train: {lr: 0.001, min_lr: 0.01}", "train.min_lr = 0.01 (model baseline) is above train.lr = 0.001"),
    ({}, "models: {condor: {train: {min_lr: 0.5}}}", "train.min_lr = 0.5 (model condor) is above train.lr"),
    ({}, f"train: {{wandb: {{api_key: {SECRET}}}}}", "'train.wandb.api_key' looks like a secret"),
    ({}, f"wandb_api_key: {SECRET}", "WANDB_API_KEY in the environment or in a .env file"),
    ({}, "train: [1, 2", "Config file is not valid JSON or YAML"),  # Snakemake's own check: no line named
    ({"config/config.yaml": "\ntrain: {lr: 0.1\n"}, None, f"config/config.yaml, line {CONFIG_LINES + 3}, column 1"),
    ({"stories.txt": STORIES}, "dataset: {source: local, local: {train: stories.txt}}",
     "dataset.local.validation is not set"),
    ({"stories.txt": STORIES}, LOCAL % "missing.txt", "missing.txt: dataset.local.validation file not found"),
    ({"stories.txt": STORIES, "val.txt": "A story that never ends.\n" * 4000}, LOCAL % "val.txt",
     "val.txt: no line '<|endoftext|>' in its 100000 bytes"),
    ({"stories.txt": STORIES, "val.parquet": parquet_of_numbers}, LOCAL % "val.parquet",
     "val.parquet: column 'text' holds int64, not text"),
    # a story file smaller than one packed row (129 tokens) makes splits that pack into none
    ({"stories.txt": STORIES * 4, "val.txt": "The dog ran.\n<|endoftext|>\n"}, LOCAL % "val.txt",
     "val.txt: the dataset.local.validation file holds 27 bytes, so its validation split would hold at most 29 tokens"),
    ({}, "sweeps: {lr: {model: condor, grid: {train.lrr: [0.001]}}}", "sweeps.lr.grid: unknown key 'train.lrr'"),
    ({}, "sweeps: {lr: {model: condr, grid: {train.lr: [0.001]}}}", "sweeps.lr.model = 'condr'"),
    ({}, "results_dir: data/mine", "results_dir = 'data/mine'"),
    ({}, "train: {lr: 0.01}\nresults_dir: artifacts/x\ntrain: {max_steps: 7}\n",
     "override.yaml, line 3: key 'train' is given twice (also at line 1)"),
]


@pytest.mark.parametrize(("files", "yaml_text", "message"), BAD_INPUTS)
def test_bad_config_fails_before_any_job(repo_copy, files, yaml_text, message):
    for name, content in files.items():
        if callable(content):
            content(repo_copy / name)
        else:
            with open(repo_copy / name, "a") as f:
                f.write(content)
    args = ["--configfile", overrides(repo_copy, yaml_text)] if yaml_text else []
    res = snakemake(repo_copy, "--cores", "1", *args, check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and message in out, out
    assert len(out.splitlines()) <= 15, out
    assert "lib/tinylm/" not in out, out  # the message, without a traceback into the library
    assert SECRET not in out
    assert not any((repo_copy / d).exists() for d in ("data", "logs", "artifacts"))


def test_a_bad_progress_interval_fails_before_any_job(repo_copy):
    """TINYLM_PROGRESS_SEC is read by every training job: a value it cannot use stops Snakemake at the
    start, not each training job after its data was built."""
    res = snakemake(repo_copy, "--cores", "1", "--configfile", "config/demo.yaml", check=False,
                    env={"TINYLM_PROGRESS_SEC": "ten"})
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "TINYLM_PROGRESS_SEC = 'ten': give the seconds between progress lines" in out, out
    assert not any((repo_copy / d).exists() for d in ("data", "logs", "artifacts"))
    # what trains nothing does not read it: a dry run, --unlock
    for args in (["-n"], ["--unlock"]):
        snakemake(repo_copy, "--cores", "1", "--configfile", "config/demo.yaml", *args,
                  env={"TINYLM_PROGRESS_SEC": "ten"})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # a target after --configfile: Snakemake reads it as one more config file
        (("--configfile", "config/demo.yaml", "artifacts/demo/runs/condor/metrics.json"),
         r"--configfile artifacts/demo/runs/condor/metrics\.json is a file this workflow makes, not a config; "
         r"Snakemake reads every path after --configfile as a config file: put targets before it"),
        (("artifacts/demo/runs/condr/metrics.json", "--configfile", "config/demo.yaml"),
         r"artifacts/demo/runs/condr/metrics\.json: this config has no run 'condr' \(its runs: baseline, falcon, "
         r"condor\); did you mean 'condor'\?"),
        (("artifacts/runs/condor/metrics.json", "--configfile", "config/demo.yaml"),
         r"artifacts/runs/condor/metrics\.json: this config writes its results under artifacts/demo/ \(its "
         r"results_dir\), not artifacts/; give the --configfile of the config that writes there"),
        # the README's own-stories target without the --configfile that names its dataset
        (("data/raw/mystories/meta.json",),
         r"data/raw/mystories/meta\.json: this config's dataset is 'tinystories' \(dataset\.name\), not 'mystories'; "
         r"give the --configfile of the config that names it"),
        # of two --configfile options Snakemake reads only the last: demo.yaml would be dropped
        (("--configfile", "config/demo.yaml", "--configfile", "config/smoke.yaml"),
         r"--configfile given 2 times: Snakemake reads only the last \(config/smoke\.yaml\), not config/demo\.yaml"),
    ],
)
def test_a_target_the_config_cannot_make_is_refused_naming_what_it_can(repo_copy, args, message):
    made = repo_copy / "artifacts/demo/runs/condor/metrics.json"  # what the demo would have written
    made.parent.mkdir(parents=True)
    made.write_text(json.dumps({"model": "condor", "val_loss": 3.2}))
    res = snakemake(repo_copy, "-n", "--cores", "1", *args, check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and re.search(message, out), out
    assert len(out.splitlines()) <= 15, out
    assert "lib/tinylm/" not in out, out  # the message, without a traceback into the library


def fake_chain(repo, *, other_tokenizer: str | None = None, truncated: str | None = None,
               other_text: str | None = None, text_paths: bool = True) -> dict:
    """Files of a finished run for the default config (contents made up, sizes and records consistent),
    older to newer as Snakemake made them: raw splits, tokenizer, packed splits, condor's model.
    The split `other_tokenizer` records another tokenizer; the split `truncated` lost two bytes;
    `other_text` (a split, or "tokenizer") records text from another dataset's folder, as a file
    copied from there does; without `text_paths` the metas record no text path (older versions')."""
    raw, tok, proc = (repo / "data/raw/tinystories", repo / "artifacts/tokenizers/tinystories/bpe8192",
                      repo / "data/processed/tinystories/bpe8192")
    run = repo / "artifacts/runs/condor"
    for d in (raw, tok, proc, run / "checkpoints"):
        d.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        (raw / f"{split}.txt").write_text(STORIES)
    (raw / "meta.json").write_text("{}")
    (tok / "tokenizer.json").write_text('{"model": {}}')
    sha = hashlib.sha256((tok / "tokenizer.json").read_bytes()).hexdigest()
    def text(key: str, split: str, name: str) -> dict:
        folder = "tinystories-copy" if name == other_text else "tinystories"
        return {key: {"path": f"data/raw/{folder}/{split}.txt"}} if text_paths else {}

    (tok / "tokenizer_meta.json").write_text(json.dumps({"tokenizer_sha256": sha,
                                                         **text("train_text", "train", "tokenizer")}))
    for split in ("train", "validation", "test"):
        (proc / f"{split}.bin").write_bytes(bytes(2 * 10 * 129 - 2 * (split == truncated)))
        meta = {"shape": [10, 129], "dtype": "uint16", "tokenizer_sha256": "0" * 64 if split == other_tokenizer else sha,
                **text("text", split, split)}
        (proc / f"{split}.meta.json").write_text(json.dumps(meta))
    for name in ("checkpoints/best_model.pt", "metrics.jsonl", "config.json"):
        (run / name).write_text("the last good model")
    paths = [*raw.iterdir(), *tok.iterdir(), *proc.iterdir(), *run.rglob("*.*")]
    for i, p in enumerate(paths):  # one second apart, in the order a run writes them
        os.utime(p, (1e9 + i, 1e9 + i))
    return {"tokenizer": tok / "tokenizer.json", "best": run / "checkpoints/best_model.pt"}


def edit_tokenizer(files):
    files["tokenizer"].write_text('{"model": {"edited": 1}}')


@pytest.mark.parametrize(
    ("chain", "damage", "message"),
    [
        ({}, edit_tokenizer,
         ["bpe8192/tokenizer.json: sha256", "bpe8192/tokenizer_meta.json recorded", "delete"]),
        ({"other_tokenizer": "validation"}, None,
         ["validation.bin: packed with tokenizer sha256 " + "0" * 64, "tokenizer.json has sha256", "delete"]),
        ({"truncated": "test"}, None, ["test.bin: 2578 bytes, but test.meta.json says", "delete"]),
        ({"other_text": "tokenizer"}, None,
         ["bpe8192/tokenizer.json: trained on data/raw/tinystories-copy/train.txt",
          "this config's dataset reads data/raw/tinystories/train.txt", "made for another dataset", "delete"]),
        ({"other_text": "validation"}, None,
         ["bpe8192/validation.bin: packed from data/raw/tinystories-copy/validation.txt",
          "this config's dataset reads data/raw/tinystories/validation.txt", "made for another dataset", "delete"]),
    ],
    ids=["edited tokenizer", "packed with another tokenizer", "truncated split", "tokenizer of another dataset",
         "split of another dataset"],
)
def test_inputs_that_disagree_with_their_records_are_refused_before_any_job(repo_copy, chain, damage, message):
    files = fake_chain(repo_copy, **chain)
    if damage:
        damage(files)
    res = snakemake(repo_copy, "--cores", "1", "artifacts/runs/condor/metrics.json", check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and all(m in out for m in message), out
    assert len(out.splitlines()) <= 15, out
    assert files["best"].read_text() == "the last good model"
    assert not (repo_copy / "logs").exists() and not (repo_copy / "artifacts/logs").exists()


@pytest.mark.parametrize("text_paths", [True, False], ids=["records with text paths", "older records without"])
def test_inputs_that_agree_with_their_records_or_will_be_rebuilt_pass(repo_copy, text_paths):
    files = fake_chain(repo_copy, text_paths=text_paths)
    snakemake(repo_copy, "-n", "--cores", "1", "artifacts/runs/condor/metrics.json")
    # A tokenizer retrained since packing (a run stopped in between): Snakemake repacks, nothing to refuse.
    files["tokenizer"].write_text('{"model": {"retrained": 1}}')
    sha = hashlib.sha256(files["tokenizer"].read_bytes()).hexdigest()
    files["tokenizer"].with_name("tokenizer_meta.json").write_text(json.dumps({"tokenizer_sha256": sha}))
    jobs = planned_jobs(snakemake(repo_copy, "-n", "--cores", "1", "artifacts/runs/condor/metrics.json"))
    assert jobs["pack_tokens"] == 3


def test_forceall_rebuilds_inputs_that_disagree_with_their_records(repo_copy):
    """The check of files on disk guards the last good outputs; --forceall rebuilds them all anyway."""
    files = fake_chain(repo_copy)
    files["tokenizer"].write_text('{"model": {"edited": 1}}')  # not what tokenizer_meta.json recorded
    res = snakemake(repo_copy, "-n", "--cores", "1", "artifacts/runs/condor/metrics.json", check=False)
    assert res.returncode != 0 and "tokenizer.json" in res.stdout + res.stderr
    args = ("-n", "--cores", "1", "--forceall", "artifacts/runs/condor/metrics.json")
    assert planned_jobs(snakemake(repo_copy, *args))["train_tokenizer"] == 1


def test_hub_download_without_network_fails_at_once_naming_the_alternatives(repo_copy):
    t0 = time.monotonic()
    res = snakemake(repo_copy, "--cores", "1", "data/raw/tinystories/train.txt", check=False, timeout=300)
    elapsed = time.monotonic() - t0
    log = (repo_copy / "logs" / "download_tinystories" / "tinystories.log").read_text()
    assert res.returncode != 0
    assert "source: local" in log and "synthetic" in log, log
    # The script's own message reaches the terminal, not just the log, with no profile.
    shown = res.stdout + res.stderr
    assert "error: the Hugging Face hub" in shown and "dataset.source: local" in shown, shown
    assert elapsed < 120, f"the failing download took {elapsed:.0f} s"
    assert not (repo_copy / "data" / "raw" / "tinystories" / "train.txt").exists()


def test_a_split_too_small_for_one_packed_row_is_refused_as_it_is_written_before_the_tokenizer(repo_copy):
    """One synthetic validation story (at most 1,185 tokens) and rows of 2,049: the download job refuses
    the split it writes, naming the setting to raise; no tokenizer is trained, no raw data is left."""
    long_rows = "{max_seq_len: 2048}"
    cfg = overrides(repo_copy, "dataset: {name: few, source: synthetic, synthetic: {n_train: 200, n_validation: 1}}\n"
                               f"packing: {{seq_len: 2048}}\nmodels: {{baseline: {long_rows}, falcon: {long_rows}, "
                               f"condor: {long_rows}}}\n")
    res = snakemake(repo_copy, "data/processed/few/bpe8192/validation.bin", "--cores", "1", "--configfile", cfg,
                    check=False)
    shown = res.stdout + res.stderr
    assert res.returncode != 0 and "Error in rule download_tinystories" in shown, shown
    assert "error: the validation split would hold 1 story of at most" in shown, shown
    assert "raise dataset.synthetic.n_validation (1), or lower packing.seq_len (2048)" in shown, shown
    assert not (repo_copy / "artifacts" / "tokenizers").exists()
    assert not (repo_copy / "data" / "raw" / "few" / "validation.txt").exists()


def test_the_download_job_reads_packing_seq_len_yet_another_one_rebuilds_no_raw_data(repo_copy):
    """packing.seq_len reaches the download job outside its command and params, which Snakemake rebuilds
    it on: raw data built for one seq_len is used as it is by a tokenizer of another."""
    data = "dataset: {name: few, source: synthetic, synthetic: {n_train: 200, n_validation: 20}}\n"
    snakemake(repo_copy, "data/raw/few/meta.json", "--cores", "1", "--configfile",
              overrides(repo_copy, data + "packing: {seq_len: 32}\n"))
    cfg = overrides(repo_copy, data + "tokenizer: {name: other}\npacking: {seq_len: 64}\n")
    res = snakemake(repo_copy, "-n", "data/processed/few/other/validation.bin", "--cores", "1", "--configfile", cfg)
    assert planned_jobs(res) == {"train_tokenizer": 1, "pack_tokens": 1}


@pytest.mark.slow
def test_demo_builds_every_model_end_to_end(demo_run):
    """The demo's whole chain, every model trained (for 60 steps: DEMO_CONFIGS) and evaluated."""
    for model in MODELS:
        metrics = json.loads((demo_run / DEMO / "runs" / model / "metrics.json").read_text())
        for key in ("val_loss", "val_ppl", "val_bpb", "test_loss", "test_ppl", "test_bpb", "train_tokens_per_sec",
                    "train_wall_sec"):
            assert math.isfinite(metrics[key]), (model, key)
        assert metrics["model"] == model and metrics["best_step"] > 0 and metrics["n_params"] > 0
        assert metrics["val_loss"] < math.log(2048) - 1.0  # learned something beyond uniform over the vocab
        assert len(metrics["samples"]) == 6 and all(s["completion"].strip() for s in metrics["samples"])
        assert (demo_run / DEMO / "runs" / model / "checkpoints" / "best_model.pt").stat().st_size > 0
    table = pd.read_csv(demo_run / DEMO / "summary.csv")
    assert sorted(table["model"]) == sorted(MODELS)
    for log in ("logs/download_tinystories/synthetic-demo-short", "logs/train_tokenizer/synthetic-demo-short/demo-bpe2048",
                "logs/pack_tokens/synthetic-demo-short/demo-bpe2048/train", f"{DEMO}/logs/train_model/falcon",
                f"{DEMO}/logs/evaluate_model/condor", f"{DEMO}/logs/summarize"):
        assert (demo_run / f"{log}.log").stat().st_size > 0, log


@pytest.mark.slow
def test_second_run_does_nothing(demo_run):
    res = snakemake(demo_run, "-n", "--cores", "2", "--configfile", *DEMO_CONFIGS)
    assert "Nothing to be done" in res.stdout + res.stderr


@pytest.mark.slow
def test_a_summary_output_missing_from_finished_results_is_built_by_the_default_target(demo_run, tmp_path):
    """Results summarized by an older tinylm lack the outputs added since (summary_vs_reference.csv
    came later): the default target builds them and retrains nothing."""
    work = tmp_path / "repo"
    shutil.copytree(demo_run, work, symlinks=True)
    (work / DEMO / "summary_vs_reference.csv").unlink()
    res = snakemake(work, "-n", "--cores", "2", "--configfile", *DEMO_CONFIGS)
    assert planned_jobs(res) == {"summarize": 1, "all": 1}


@pytest.mark.slow
@pytest.mark.parametrize("lost", ["metrics.jsonl", "config.json", "checkpoints/best_model.pt"])
def test_a_file_deleted_from_a_finished_run_is_made_again_by_the_default_target(demo_run, tmp_path, lost):
    """`snakemake verify` names a run's missing file and says to run snakemake to build it: the default
    target must then train that run again (and evaluate and summarize it), not find nothing to do
    because the run's metrics.json and the summary are still there."""
    work = tmp_path / "repo"
    shutil.copytree(demo_run, work, symlinks=True)
    (work / DEMO / "runs" / "condor" / lost).unlink()
    res = snakemake(work, "-n", "--cores", "2", "--configfile", *DEMO_CONFIGS)
    assert planned_jobs(res) == {"train_model": 1, "evaluate_model": 1, "summarize": 1, "all": 1}
    assert "wildcards: run=condor\n" in res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("eval: {max_new_tokens: 20}", {"evaluate_model": 3, "summarize": 1, "all": 1}),
        ("models: {condor: {train: {lr: 2.0e-3}}}", {"train_model": 1, "evaluate_model": 1, "summarize": 1, "all": 1}),
        # what a run records and reports, not what it computes: nothing to rebuild
        ("train: {log_every: 7, save_every: 99, max_gpus: 4, wandb: {mode: offline}}", {}),
    ],
)
def test_a_parameter_change_rebuilds_exactly_what_depends_on_it(demo_run, tmp_path, override, expected):
    (tmp_path / "override.yaml").write_text(override)
    res = snakemake(demo_run, "-n", "--cores", "2", "--configfile", *DEMO_CONFIGS, str(tmp_path / "override.yaml"))
    assert planned_jobs(res) == expected


@pytest.mark.slow
def test_reordering_a_grids_keys_redraws_its_sweep_plot_and_retrains_nothing(demo_run, tmp_path):
    """The first grid key is the sweep plot's x axis: a new order is a new plot (summarize reruns)."""
    work = tmp_path / "repo"
    shutil.copytree(demo_run, work, symlinks=True)
    sweep = ("results_dir: artifacts/order\nmodels: {baseline: {seeds: []}, falcon: {seeds: []}, condor: {seeds: [], "
             "d_model: 32, n_heads: 2, d_ff: 64}}\ntrain: {max_steps: 10, eval_every: 5, save_every: 5, log_every: 5}\n"
             "sweeps: {s: {model: condor, grid: {KEYS}, seeds: [1]}}\n")
    grid = {"a": "{train.warmup_steps: [2, 3], train.lr: [1.0e-3]}", "b": "{train.lr: [1.0e-3], train.warmup_steps: [2, 3]}"}
    (work / "order.yaml").write_text(sweep.replace("{KEYS}", grid["a"]))
    snakemake(work, "--cores", "2", "--configfile", *DEMO_CONFIGS, "order.yaml")
    (work / "order.yaml").write_text(sweep.replace("{KEYS}", grid["b"]))
    res = snakemake(work, "-n", "--cores", "2", "--configfile", *DEMO_CONFIGS, "order.yaml")
    assert planned_jobs(res) == {"summarize": 1, "all": 1}


@pytest.mark.slow
def test_moving_a_grid_point_to_another_sweep_redraws_both_and_retrains_nothing(demo_run, tmp_path):
    """A run keeps its name when its grid point moves to another sweep of its model: summarize's inputs
    stay the same, but its sweep column and both sweeps' plots change (summarize reruns)."""
    work = tmp_path / "repo"
    shutil.copytree(demo_run, work, symlinks=True)
    sweeps = ("results_dir: artifacts/moved\nmodels: {baseline: {seeds: []}, falcon: {seeds: []}, condor: {seeds: [], "
              "d_model: 32, n_heads: 2, d_ff: 64}}\ntrain: {max_steps: 10, eval_every: 5, save_every: 5, log_every: 5}\n"
              "sweeps: {s: {model: condor, grid: {train.warmup_steps: @S}}, t: {model: condor, grid: {train.warmup_steps: @T}}}\n")
    (work / "moved.yaml").write_text(sweeps.replace("@S", "[2, 3]").replace("@T", "[4]"))
    snakemake(work, "--cores", "2", "--configfile", *DEMO_CONFIGS, "moved.yaml")
    (work / "moved.yaml").write_text(sweeps.replace("@S", "[2]").replace("@T", "[3, 4]"))
    res = snakemake(work, "-n", "--cores", "2", "--configfile", *DEMO_CONFIGS, "moved.yaml")
    assert planned_jobs(res) == {"summarize": 1, "all": 1}


DATA_CHAIN = {"pack_tokens": 3, "train_model": 3, "evaluate_model": 3, "summarize": 1, "all": 1}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "refused", "renamed", "expected"),
    [
        ("packing: {seq_len: 32}", "train.meta.json: built with other settings than this config's (packing.seq_len: "
         "64 there, 32 here)", "tokenizer: {name: bpe-rows32}", {"train_tokenizer": 1, **DATA_CHAIN}),
        ("tokenizer: {vocab_size: 1024}", "tokenizer_meta.json: built with other settings than this "
         "config's (tokenizer.vocab_size: 2048 there, 1024 here)", "tokenizer: {name: bpe1024}",
         {"train_tokenizer": 1, **DATA_CHAIN}),
        ("dataset: {train_n: 2000}", "meta.json: built with other settings than this config's (dataset.train_n: None "
         "there, 2000 here)", "dataset: {name: demo-2000}",
         {"download_tinystories": 1, "train_tokenizer": 1, **DATA_CHAIN}),
    ],
)
def test_a_data_setting_changed_under_its_name_is_refused_and_under_a_new_name_rebuilds(
        demo_run, tmp_path, override, refused, renamed, expected):
    """Data is shared by name: rebuilt with other settings, it would change under every run of every config
    naming it. The refusal names the file, the setting and what to do; with its own name, the change
    builds its own data and what depends on it, and nothing of the demo's."""
    (tmp_path / "override.yaml").write_text(override)
    res = snakemake(demo_run, "-n", "--cores", "2", "--configfile", *DEMO_CONFIGS, str(tmp_path / "override.yaml"),
                    check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and refused in out and "of its own, or delete" in out, out
    (tmp_path / "renamed.yaml").write_text(renamed)
    res = snakemake(demo_run, "-n", "--cores", "2", "--configfile", *DEMO_CONFIGS, str(tmp_path / "override.yaml"),
                    str(tmp_path / "renamed.yaml"))
    assert planned_jobs(res) == expected


@pytest.mark.slow
def test_verify_runs_where_the_data_was_built_with_other_settings(demo_run, tmp_path):
    """The refusal of a config whose shared data was built with other settings sends the user to
    `snakemake verify`; verify only reads and reports, so that check does not stop it."""
    work = tmp_path / "copy"
    shutil.copytree(demo_run, work, symlinks=True)
    (work / "other.yaml").write_text("tokenizer: {vocab_size: 1024}\n")
    refused = snakemake(work, "-n", "--cores", "1", "--configfile", *DEMO_CONFIGS, "other.yaml", check=False)
    assert "built with other settings" in refused.stdout + refused.stderr
    res = snakemake(work, "verify", "--cores", "1", "--configfile", *DEMO_CONFIGS, "other.yaml", check=False)
    assert "built with other settings" not in res.stdout + res.stderr
    assert res.returncode == 0 and (work / DEMO / "logs" / "verify.log").is_file()


@pytest.mark.slow
def test_a_damaged_best_checkpoint_is_refused_before_its_evaluation_deletes_the_metrics(demo_run, tmp_path):
    """Snakemake reruns an evaluation whose checkpoint is newer and deletes its metrics.json first; the
    evaluation then refuses the changed checkpoint, and the good metrics were gone. The check runs
    before any job now, and the last good metrics.json stays."""
    work = tmp_path / "copy"
    shutil.copytree(demo_run, work, symlinks=True)
    best = work / DEMO / "runs" / "condor" / "checkpoints" / "best_model.pt"
    metrics = work / DEMO / "runs" / "condor" / "metrics.json"
    before = metrics.read_bytes()
    with open(best, "ab") as f:
        f.write(b"x")
    # A dry run skips the checks made before the first job (Snakemake's onstart): it warns instead.
    res = snakemake(work, "-n", "--cores", "1", "--configfile", *DEMO_CONFIGS, check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and re.search(r"condor/checkpoints/best_model\.pt: sha256 .* recorded .*\n?.*without "
                                             r"-n, Snakemake stops before any job when it is to evaluate run condor",
                                             out), out[-3000:]
    res = snakemake(work, "--cores", "1", "--configfile", *DEMO_CONFIGS, check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "best_model.pt: sha256" in out and "recorded" in out, out[-3000:]
    assert metrics.read_bytes() == before


@pytest.mark.slow
def test_an_interrupted_run_with_other_settings_is_refused_before_any_job(demo_run, tmp_path):
    """condor interrupted (its last.pt kept, no best_model.pt yet), then train.lr changed: its training
    job would refuse to resume, but only once started, after Snakemake had deleted the other runs'
    outputs it retrains and stopped them. The check runs before any job, and nothing is touched."""
    work = tmp_path / "copy"
    shutil.copytree(demo_run, work, symlinks=True)
    runs = work / DEMO / "runs"
    last = runs / "condor" / "checkpoints" / "last.pt"
    # best_model.pt carries the records a last.pt does (model and train config): a stand-in for one
    (runs / "condor" / "checkpoints" / "best_model.pt").rename(last)
    before = last.read_bytes()
    (work / "lr.yaml").write_text("train: {lr: 0.00123}\n")
    # A dry run skips the checks made before the first job (Snakemake's onstart): it warns instead.
    res = snakemake(work, "-n", "--cores", "1", "--configfile", *DEMO_CONFIGS, "lr.yaml", check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert re.search(r"condor/checkpoints/last\.pt: made with a different train config \(lr: checkpoint .* vs now "
                     r"0\.00123\).*\n?.*without -n, Snakemake stops before any job when it is to train run condor", out), out[-3000:]
    res = snakemake(work, "--cores", "1", "--configfile", *DEMO_CONFIGS, "lr.yaml", check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert "condor/checkpoints/last.pt: made with a different train config (lr: checkpoint" in out, out[-3000:]
    assert "vs now 0.00123); delete the checkpoint to start over, or restore the old settings. Nothing was run" in out
    assert last.read_bytes() == before
    assert (runs / "baseline" / "checkpoints" / "best_model.pt").is_file()  # not deleted for a rerun
    assert "rule train_model:" not in out  # no job started
    assert "lib/tinylm/" not in out, out  # the message, without a traceback into the library


@pytest.mark.slow
def test_verify_passes_then_catches_a_flipped_byte(demo_run, tmp_path):
    work = tmp_path / "copy"
    shutil.copytree(demo_run, work, symlinks=True)
    res = snakemake(work, "verify", "--cores", "1", "--configfile", *DEMO_CONFIGS)
    assert "error" not in res.stdout.lower()
    target = work / "data" / "processed" / "synthetic-demo-short" / "demo-bpe2048" / "validation.bin"
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    res = snakemake(work, "verify", "--cores", "1", "--configfile", *DEMO_CONFIGS, check=False)
    assert res.returncode != 0
    assert "validation.bin" in (work / DEMO / "logs" / "verify.log").read_text()
    assert "best_model.pt" in res.stdout + res.stderr + (work / DEMO / "logs" / "verify.log").read_text()


def test_verify_names_a_tokenizer_copied_in_from_another_dataset(demo_run, tmp_path):
    """The demo's tokenizer as if trained in another dataset's folder and copied here: its files agree
    with its records, and the workflow refuses it; `snakemake verify` names it too."""
    work = tmp_path / "copy"
    shutil.copytree(demo_run, work, symlinks=True)
    raw = work / "data" / "raw" / "synthetic-demo-short"
    shutil.copytree(raw, work / "data" / "raw" / "elsewhere")
    meta_path = work / "artifacts" / "tokenizers" / "synthetic-demo-short" / "demo-bpe2048" / "tokenizer_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["train_text"]["path"] = "data/raw/elsewhere/train.txt"
    meta_path.write_text(json.dumps(meta))
    res = snakemake(work, "verify", "--cores", "1", "--configfile", *DEMO_CONFIGS, check=False)
    log = (work / DEMO / "logs" / "verify.log").read_text()
    assert res.returncode != 0
    assert ("tokenizer_meta.json: trained on data/raw/elsewhere/train.txt, but this config's dataset reads "
            "data/raw/synthetic-demo-short/train.txt: it was made for another dataset and copied in") in log, log


@pytest.mark.slow
def test_report_on_the_demo_run(demo_run, tmp_path):
    work = tmp_path / "copy"
    shutil.copytree(demo_run, work, symlinks=True)
    snakemake(work, "--cores", "1", "--configfile", *DEMO_CONFIGS, "--report", "report.html")
    html = (work / "report.html").read_text(errors="replace")
    assert "summary" in html.lower()
    for model in MODELS:
        assert model in html
    sample = json.loads((work / DEMO / "runs" / "condor" / "metrics.json").read_text())["samples"][0]
    assert sample["prompt"] in html
    # a seed added since: the summary would describe the config before it, so the report is refused
    more = work / "more.yaml"
    more.write_text("models:\n  condor:\n    seeds: [42, 7]\n")
    res = snakemake(work, "--cores", "1", "--configfile", *DEMO_CONFIGS, str(more), "--report", "r2.html", check=False)
    assert res.returncode != 0 and "not yet summarized: condor-seed7" in res.stdout + res.stderr
    assert not (work / "r2.html").exists()


def test_a_report_before_the_results_exist_says_what_to_run(repo_copy):
    """Snakemake's own message names one missing file; the workflow's names the config's results
    folder, what builds it, and the configs whose results are here."""
    summary = repo_copy / "artifacts" / "demo" / "summary.csv"  # another config's results, built
    summary.parent.mkdir(parents=True)
    summary.write_text("run\n")
    res = snakemake(repo_copy, "--cores", "1", "--report", "report.html", check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "artifacts/summary.csv" in out
    assert "snakemake --cores" in out and "--configfile" in out and "artifacts/demo" in out, out[-2000:]
    assert not (repo_copy / "report.html").exists()
    # --report-after-run builds first, and a report of some targets needs no summary: neither is refused
    for extra in (["--report-after-run"], ["artifacts/runs/condor/metrics.json"]):
        res = snakemake(repo_copy, "-n", "--cores", "1", "--report", "report.html", *extra, check=False)
        assert "results are not built yet" not in res.stdout + res.stderr, extra


def test_snakemake_from_another_folder_says_to_run_it_from_the_checkout(repo_copy, tmp_path):
    """With -s from elsewhere, config/config.yaml (the defaults) is not where Snakemake looks, and with a
    --configfile it skipped it without a word: the config then failed as if its models were incomplete."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = snakemake(elsewhere, "-n", "--cores", "1", "-s", str(repo_copy / "Snakefile"),
                    "--configfile", str(repo_copy / "config" / "smoke.yaml"), check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "required property" not in out
    assert f"run snakemake from the checkout ({repo_copy}), or add -d {repo_copy}" in out, out[-2000:]
    res = snakemake(elsewhere, "-n", "--cores", "1", "-s", str(repo_copy / "Snakefile"), "-d", str(repo_copy),
                    "--configfile", str(repo_copy / "config" / "smoke.yaml"))
    assert planned_jobs(res)["all"] == 1


def test_forceall_is_accepted(repo_copy):
    jobs = planned_jobs(snakemake(repo_copy, "-n", "--cores", "2", "--forceall", "--configfile", "config/demo.yaml"))
    assert jobs["download_tinystories"] == 1 and jobs["all"] == 1


def file_hashes(workdir: Path) -> dict[str, str]:
    """sha256 of every file the workflow wrote (data, artifacts, logs, benchmarks), by path."""
    return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in ("data", "artifacts", "logs", "benchmarks") for p in sorted((workdir / d).rglob("*"))
            if p.is_file()}


@pytest.mark.slow
def test_three_configs_run_one_after_another_and_keep_their_results(demo_run, tmp_path):
    """The demo, then the sweep demo (at one seed) and a local-files config (each shrunk to 20 steps) in one
    checkout: each one's files are all still there, unchanged, at the end, and a second run of any
    does nothing. The demo is the session's demo_run, copied: built once for the suite."""
    work = tmp_path / "repo"
    shutil.copytree(demo_run, work, symlinks=True)
    (work / "tiny.yaml").write_text(TINY)
    (work / "one-seed.yaml").write_text("sweeps: {lr: {seeds: [1]}}\n")  # two sweep runs, not four
    seen = file_hashes(work)
    # the sweep demo reads the demo's data: with the same shortening, it finds it built
    sweep = ("config/sweep-demo.yaml", DEMO_CONFIGS[1], "tiny.yaml", "one-seed.yaml")
    configs = [DEMO_CONFIGS, sweep, (local_config(work), "tiny.yaml")]
    for files in configs[1:]:
        snakemake(work, "--cores", "2", "--configfile", *files, timeout=1200)
        now = file_hashes(work)
        changed = sorted(p for p in seen if now.get(p) != seen[p])
        assert not changed, f"{files[0]} changed or removed {changed[:10]}"
        assert set(now) - set(seen), f"{files[0]} wrote nothing"
        seen = now
    for results, n_runs in (("artifacts/demo", 3), ("artifacts/sweep-demo", 2), ("artifacts/local", 1)):
        assert len(list((work / results / "runs").glob("*/metrics.json"))) == n_runs, results
        assert (work / results / "summary.csv").is_file()
    for files in configs:
        res = snakemake(work, "-n", "--cores", "2", "--configfile", *files)
        assert "Nothing to be done" in res.stdout + res.stderr, files[0]


@pytest.mark.slow
def test_a_second_config_naming_the_same_results_dir_is_refused_before_any_job(demo_run, tmp_path):
    """A copy of the demo config that keeps its results_dir would retrain the demo's runs under its own
    settings, deleting theirs: it is refused, naming the owner and the fix. The demo with an override
    file layered over it (a change made on purpose) still plans as usual, and so does the copy given
    a results_dir of its own."""
    mine = tmp_path / "mine.yaml"
    demo = (demo_run / "config/demo.yaml").read_text()
    assert "  lr: 1.0e-3\n" in demo
    mine.write_text(demo.replace("  lr: 1.0e-3\n", "  lr: 2.0e-3\n"))
    before = file_hashes(demo_run)
    res = snakemake(demo_run, "-n", "--cores", "2", "--configfile", str(mine), DEMO_CONFIGS[1], check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Traceback" not in out, out[-3000:]
    assert (f"results_dir = 'artifacts/demo' holds the results of config/demo.yaml (artifacts/demo/config-owner.json), "
            f"and {mine} names it too") in out, out[-3000:]
    (tmp_path / "faster.yaml").write_text("train: {lr: 2.0e-3}\n")
    res = snakemake(demo_run, "-n", "--cores", "2", "--configfile", *DEMO_CONFIGS, str(tmp_path / "faster.yaml"))
    assert planned_jobs(res)["train_model"] == 3
    snakemake(demo_run, "-n", "--cores", "2", "--configfile", str(mine), DEMO_CONFIGS[1], "--config",
              "results_dir=artifacts/mine")
    assert file_hashes(demo_run) == before


def test_a_second_snakemake_leaves_a_run_another_one_trains_alone(repo_copy):
    """The rerun README and docs/cluster.md describe (`--unlock`, then `--rerun-incomplete`) started
    while the first Snakemake's trainer still runs. Snakemake deletes a job's outputs before the job
    starts and again when it fails, so the second one used to delete the first one's run before its
    trainer met the lock; the first then failed on its missing config.json and lost the training.
    Now the second stops before any job, naming the trainer, and the first finishes."""
    import subprocess

    from conftest import SNAKEMAKE, offline_env

    from tinylm.runlock import held_by

    target = "artifacts/demo/runs/condor/metrics.json"
    (repo_copy / "longer.yaml").write_text("train: {max_steps: 400}\n")  # time for the second Snakemake
    args = ["--cores", "1", target, "--configfile", *DEMO_CONFIGS, "longer.yaml"]
    first_log = repo_copy / "first-snakemake.log"  # a file, not a pipe nobody reads while it runs
    with first_log.open("w") as err:  # the child keeps its own copy of the descriptor
        first = subprocess.Popen([SNAKEMAKE, *args], cwd=repo_copy, env=offline_env(), stdout=subprocess.DEVNULL,
                                 stderr=err)
    run_dir = repo_copy / "artifacts/demo/runs/condor"
    try:
        deadline = time.monotonic() + 600
        while held_by(run_dir) is None:  # data, tokenizer, packing, then the trainer takes its lock
            assert first.poll() is None and time.monotonic() < deadline, "the first Snakemake never trained"
            time.sleep(0.2)
        dry = snakemake(repo_copy, "-n", *args[2:], "--rerun-incomplete")
        assert planned_jobs(dry)["train_model"] == 1  # a dry run still plans it, and warns
        assert "artifacts/demo/runs/condor is being trained (pid" in dry.stdout + dry.stderr
        snakemake(repo_copy, "--unlock", *args[2:])
        second = snakemake(repo_copy, *args, "--rerun-incomplete", check=False)
        assert held_by(run_dir) is not None, "the first trainer was done before the second Snakemake ran"
        first.wait(timeout=900)
    finally:
        if first.poll() is None:
            first.kill()
    out = second.stdout + second.stderr
    assert second.returncode != 0 and "artifacts/demo/runs/condor is being trained (pid" in out, out[-3000:]
    assert "rule train_model" not in out.split("is being trained")[0], "a job started before the refusal"
    assert first.returncode == 0, first_log.read_text()[-3000:]
    for name in ("checkpoints/best_model.pt", "config.json", "metrics.jsonl", "metrics.json"):
        assert (run_dir / name).is_file(), name
    done = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert done["kind"] == "done" and done["final_step"] == 400
