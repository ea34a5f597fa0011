"""The Snakemake report of the real workflow: rule summarize's report() outputs and report/*.rst.

In a copy of the repository every model's run is fabricated where rules train_model and
evaluate_model write it (tests/fixtures/fake_runs.py); the real Snakefile then runs only rule
summarize on them, and `snakemake --report` must give one self-contained HTML page holding the
table, the samples and the plots.
"""

import base64
import csv
import html
import io
import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from conftest import copy_repo, snakemake

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[1] / "config" / "config.yaml"

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from fake_runs import completion, write_fake_runs  # noqa: E402


def script_var(page: str, script_id: str):
    """The JSON value the report page assigns in <script id=...>var x = ...</script>."""
    block = re.search(rf'<script id="{script_id}">\s*var \w+ = (.*?);?\s*</script>', page, re.S)
    return json.loads(block.group(1))


def embedded(result: dict) -> bytes:
    return base64.b64decode(result["data_uri"].split("base64,", 1)[1])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    workdir = copy_repo(tmp_path_factory.mktemp("report_workflow") / "repo")
    write_fake_runs(yaml.safe_load(CONFIG.read_text()), workdir / "artifacts" / "runs")
    # The runs' metrics.json and metrics.jsonl are summarize's inputs; with train_model and
    # evaluate_model left out of the allowed rules, Snakemake takes them as they are instead of
    # planning to remake them (and the data and tokenizer before them).
    res = snakemake(workdir, "--cores", "2", "--allowed-rules", "summarize", "--", "summarize")
    assert "localrule summarize:" in res.stdout + res.stderr
    snakemake(workdir, "--report", "report.html")
    page = (workdir / "report.html").read_text(encoding="utf-8")
    return workdir, page, script_var(page, "results")


def test_report_is_self_contained(report):
    _, page, results = report
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert not re.search(r"url\(\s*[\"']?(https?:)?//", page)
    assert all(r["data_uri"].startswith("data:") for r in results.values())


def test_report_holds_the_summary_table(report):
    workdir, _, results = report
    models = list(yaml.safe_load(CONFIG.read_text())["models"])
    csv_bytes = embedded(results["artifacts/summary.csv"])
    assert csv_bytes == (workdir / "artifacts" / "summary.csv").read_bytes()
    rows = list(csv.DictReader(io.StringIO(csv_bytes.decode())))
    assert sorted(row["model"] for row in rows) == sorted(models)
    table = embedded(results["artifacts/plots/summary.html"]).decode()
    assert all(f"<th>{model}</th>" in table for model in models)


def test_report_holds_the_samples(report):
    _, _, results = report
    config = yaml.safe_load(CONFIG.read_text())
    samples = embedded(results["artifacts/plots/samples.html"]).decode()
    for model in config["models"]:
        assert html.escape(completion(model)) in samples
    for prompt in config["eval"]["prompts"]:
        assert f"<b>{html.escape(prompt)}</b>" in samples


def test_report_holds_the_plots(report):
    workdir, _, results = report
    config = yaml.safe_load(CONFIG.read_text())
    moe = [m for m, c in config["models"].items() if c["ffn"] == "moe"]
    expected = {"loss_vs_step.png", "loss_vs_time.png"}
    expected |= {f"{m}_{kind}.png" for m in moe for kind in ("expert_load", "dropped")}
    pngs = {Path(p).name: r for p, r in results.items() if r["mime_type"] == "image/png"}
    assert set(pngs) == expected
    for name, result in pngs.items():
        assert embedded(result) == (workdir / "artifacts" / "plots" / name).read_bytes()


def test_captions_render_the_config(report):
    _, page, results = report
    config = yaml.safe_load(CONFIG.read_text())
    captions = {Path(p).name: r["caption"] for p, r in results.items()}
    assert all(captions.values()) and not any("system-message" in c for c in captions.values())
    assert f"up to {config['train']['max_steps']} steps" in captions["loss_vs_step.png"]
    assert f"Up to {config['eval']['max_new_tokens']} new tokens" in captions["samples.html"]
    description = script_var(page, "workflow-desc")
    assert "system-message" not in description
    assert all(f"<td>{model}</td>" in description for model in config["models"])
