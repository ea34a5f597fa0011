"""The Snakemake workflow itself: lint, dry runs, the offline demo end to end, reruns, verify."""

from __future__ import annotations

import json
import math
import shutil
import time

import pandas as pd
import pytest
from conftest import planned_jobs, snakemake

MODELS = ["baseline", "falcon", "condor"]


def test_lint_is_clean(repo_copy):
    res = snakemake(repo_copy, "--lint", check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Lints for" not in res.stdout + res.stderr


def test_dry_run_default_config_plans_the_whole_chain(repo_copy):
    jobs = planned_jobs(snakemake(repo_copy, "-n", "--cores", "4"))
    assert jobs == {"all": 1, "download_tinystories": 1, "train_tokenizer": 1, "pack_tokens": 3,
                    "train_model": 3, "evaluate_model": 3, "summarize": 1}


def test_dry_run_one_model_target(repo_copy):
    jobs = planned_jobs(snakemake(repo_copy, "-n", "--cores", "4", "artifacts/runs/condor/metrics.json"))
    assert jobs == {"download_tinystories": 1, "train_tokenizer": 1, "pack_tokens": 3, "train_model": 1,
                    "evaluate_model": 1}


def test_dry_run_demo_config(repo_copy):
    jobs = planned_jobs(snakemake(repo_copy, "-n", "--cores", "4", "--configfile", "config/demo.yaml"))
    assert jobs["train_model"] == 3 and jobs["download_tinystories"] == 1


def overrides(workdir, text: str) -> str:
    """A config file (merged over config.yaml) in the work copy; returns its name."""
    (workdir / "override.yaml").write_text(text)
    return "override.yaml"


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("packing: {seq_len: 0}", "packing.seq_len = 0 must be >= 1"),
        ("train: {gpus: 0}", "train.gpus = 0"),
        ("models: {condor: {n_heads: 3}}", "n_heads"),
        ("bogus: 1", "bogus"),
        ("train: {batch_size: many}", "batch_size"),
    ],
)
def test_bad_config_fails_before_any_job(repo_copy, yaml_text, message):
    res = snakemake(repo_copy, "--cores", "1", "--configfile", overrides(repo_copy, yaml_text), check=False)
    assert res.returncode != 0 and message in res.stdout + res.stderr
    assert not (repo_copy / "data").exists() and not (repo_copy / "logs").exists()


def test_hub_download_without_network_fails_at_once_naming_the_alternatives(repo_copy):
    t0 = time.monotonic()
    res = snakemake(repo_copy, "--cores", "1", "data/raw/tinystories/train.txt", check=False, timeout=300)
    elapsed = time.monotonic() - t0
    log = (repo_copy / "logs" / "download_tinystories.log").read_text()
    assert res.returncode != 0
    assert "source: local" in log and "synthetic" in log, log
    assert elapsed < 120, f"the failing download took {elapsed:.0f} s"
    assert not (repo_copy / "data" / "raw" / "tinystories" / "train.txt").exists()


@pytest.mark.slow
def test_demo_builds_every_model_end_to_end(demo_run):
    for model in MODELS:
        metrics = json.loads((demo_run / "artifacts" / "runs" / model / "metrics.json").read_text())
        for key in ("val_loss", "val_ppl", "val_bpb", "test_loss", "test_ppl", "test_bpb", "train_tokens_per_sec",
                    "train_wall_sec"):
            assert math.isfinite(metrics[key]), (model, key)
        assert metrics["model"] == model and metrics["best_step"] > 0 and metrics["n_params"] > 0
        assert metrics["val_loss"] < math.log(2048) - 1.0  # learned something beyond uniform over the vocab
        assert len(metrics["samples"]) == 6 and all(s["completion"].strip() for s in metrics["samples"])
        assert (demo_run / "artifacts" / "runs" / model / "checkpoints" / "best_model.pt").stat().st_size > 0
    table = pd.read_csv(demo_run / "artifacts" / "summary.csv")
    assert sorted(table["model"]) == sorted(MODELS)
    for log in ("download_tinystories", "train_tokenizer", "pack_tokens/train", "train_model/falcon",
                "evaluate_model/condor", "summarize"):
        assert (demo_run / "logs" / f"{log}.log").stat().st_size > 0, log


@pytest.mark.slow
def test_second_run_does_nothing(demo_run):
    res = snakemake(demo_run, "-n", "--cores", "2", "--configfile", "config/demo.yaml")
    assert "Nothing to be done" in res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("packing: {seq_len: 32}", {"pack_tokens": 3, "train_model": 3, "evaluate_model": 3, "summarize": 1, "all": 1}),
        ("tokenizer: {vocab_size: 1024}",
         {"train_tokenizer": 1, "pack_tokens": 3, "train_model": 3, "evaluate_model": 3, "summarize": 1, "all": 1}),
        ("dataset: {train_n: 2000}",
         {"download_tinystories": 1, "train_tokenizer": 1, "pack_tokens": 3, "train_model": 3, "evaluate_model": 3,
          "summarize": 1, "all": 1}),
        ("eval: {max_new_tokens: 20}", {"evaluate_model": 3, "summarize": 1, "all": 1}),
    ],
)
def test_a_parameter_change_rebuilds_exactly_what_depends_on_it(demo_run, tmp_path, override, expected):
    (tmp_path / "override.yaml").write_text(override)
    res = snakemake(demo_run, "-n", "--cores", "2", "--configfile", "config/demo.yaml", str(tmp_path / "override.yaml"))
    assert planned_jobs(res) == expected


@pytest.mark.slow
def test_verify_passes_then_catches_a_flipped_byte(demo_run, tmp_path):
    work = tmp_path / "copy"
    shutil.copytree(demo_run, work, symlinks=True)
    res = snakemake(work, "verify", "--cores", "1", "--configfile", "config/demo.yaml")
    assert "error" not in res.stdout.lower()
    target = work / "data" / "processed" / "demo-bpe2048" / "validation.bin"
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    res = snakemake(work, "verify", "--cores", "1", "--configfile", "config/demo.yaml", check=False)
    assert res.returncode != 0
    assert "validation.bin" in (work / "logs" / "verify.log").read_text()
    assert "best_model.pt" in res.stdout + res.stderr + (work / "logs" / "verify.log").read_text()


@pytest.mark.slow
def test_report_on_the_demo_run(demo_run, tmp_path):
    work = tmp_path / "copy"
    shutil.copytree(demo_run, work, symlinks=True)
    snakemake(work, "--cores", "1", "--configfile", "config/demo.yaml", "--report", "report.html")
    html = (work / "report.html").read_text(errors="replace")
    assert "summary" in html.lower()
    for model in MODELS:
        assert model in html
    sample = json.loads((work / "artifacts" / "runs" / "condor" / "metrics.json").read_text())["samples"][0]
    assert sample["prompt"] in html


def test_forceall_is_accepted(repo_copy):
    jobs = planned_jobs(snakemake(repo_copy, "-n", "--cores", "2", "--forceall", "--configfile", "config/demo.yaml"))
    assert jobs["download_tinystories"] == 1 and jobs["all"] == 1
