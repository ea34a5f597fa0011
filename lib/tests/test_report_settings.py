"""The run-settings page: built from each run's config.json and metrics.json, never from a config."""

import json
from pathlib import Path

import fake_runs

from tinylm.report.pages import run_settings_html
from tinylm.report.records import precision_as_run, read_run, recorded_settings


def entry(run_dir: Path, **extra) -> dict:
    return {
        "history": run_dir / "metrics.jsonl",
        "metrics": run_dir / "metrics.json",
        "config": run_dir / "config.json",
        **extra,
    }


def test_precision_as_run():
    # A CPU run trains in fp32 whatever train.precision asked for.
    assert precision_as_run({"device": "cpu", "train_config": {"precision": "bf16"}}) == "fp32"
    assert precision_as_run({"device": "cuda:0", "train_config": {"precision": "bf16"}}) == "bf16"
    # Recorded as run, where config.json holds it, it wins.
    assert (
        precision_as_run(
            {"device": "cuda:0", "precision": "fp32", "train_config": {"precision": "bf16"}}
        )
        == "fp32"
    )


def test_settings_come_from_the_records(tmp_path):
    runs = {
        "condor-seed1": fake_runs.write_fake_run(
            tmp_path / "a",
            "condor-seed1",
            seed=1,
            max_steps=200,
            train_config={"precision": "bf16"},
        ),
        "condor-seed2": fake_runs.write_fake_run(
            tmp_path / "b", "condor-seed2", seed=2, max_steps=200, diverge_at=120, device="cuda:0"
        ),
    }
    records = [read_run(run, entry(d, model="condor", setting="condor")) for run, d in runs.items()]
    ok, diverged = (recorded_settings(r) for r in records)
    assert ok["device"] == "cpu" and ok["precision"] == "fp32"
    assert diverged["device"] == "cuda:0" and diverged["precision"] == "bf16"
    assert ok["seed"] == "1" and diverged["seed"] == "2"
    assert ok["steps run"] == "200" and diverged["steps run"] == "110"
    assert ok["max_steps"] == "200" and ok["batch_size"] == "8"
    assert ok["train data"] == "data/processed/bpe2048/train.bin"
    assert ok["tokenizer"] == "artifacts/tokenizers/bpe2048/tokenizer.json (sha256 abababababab…)"
    assert ok["parameters"] == "2,000,000" and ok["stop reason"] == "max_steps"

    page = run_settings_html(records)
    shared, differing = page.split("Differing between runs")
    assert "<th>max_steps</th><td>200</td>" in shared  # the same in both runs: said once
    assert "data/processed/bpe2048/train.bin" in shared
    for text in (
        "<th>run</th>",
        "<th>device</th>",
        "<th>precision</th>",
        "<th>seed</th>",
        "<td>cuda:0</td>",
        "<td>fp32</td>",
        "<th>condor-seed2</th>",
    ):
        assert text in differing, text


def test_settings_page_changes_with_the_record_only(tmp_path):
    run_dir = fake_runs.write_fake_run(tmp_path / "r", "condor", seed=5, max_steps=200)
    config = json.loads((run_dir / "config.json").read_text())
    config["train_config"]["batch_size"] = 48
    (run_dir / "config.json").write_text(json.dumps(config))
    page = run_settings_html([read_run("condor", entry(run_dir))])
    assert "<th>batch_size</th><td>48</td>" in page
    assert "Differing between runs" not in page  # one run: every setting is shared
