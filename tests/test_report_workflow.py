"""The Snakemake report of the real workflow: rule summarize's report() outputs and report/*.rst.

In a copy of the repository every run of the default config plus a sweep (condor at two learning
rates x two seeds) is fabricated where rules train_model and evaluate_model write it
(tests/fixtures/fake_runs.py): 200 steps on the CPU, where the config asks for 20,000 in bf16. The
real Snakefile then runs only rule summarize on them, and `snakemake --report` must give one
self-contained HTML page holding the tables, the samples, the plots and a section per sweep, whose
statements of settings come from the runs' records, never from the config.
"""

import base64
import csv
import html
import io
import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import copy_repo, snakemake
from fake_runs import completion, write_fake_runs
from snakemake.utils import validate

from tinylm.workflow import expand_runs

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config" / "config.yaml"
SWEEP = {
    "sweeps": {"lr": {"model": "condor", "grid": {"train.lr": [0.001, 0.003]}, "seeds": [1, 2]}},
    "compare_to": "condor-lr0.001",
}



def script_var(page: str, script_id: str):
    """The JSON value the report page assigns in <script id=...>var x = ...</script>."""
    block = re.search(rf'<script id="{script_id}">\s*var \w+ = (.*?);?\s*</script>', page, re.S)
    return json.loads(block.group(1))


def embedded(result: dict) -> bytes:
    return base64.b64decode(result["data_uri"].split("base64,", 1)[1])


@pytest.fixture(scope="module")
def config() -> dict:
    config = {**yaml.safe_load(CONFIG.read_text()), **SWEEP}
    validate(config, str(REPO / "config" / "schema.yaml"))  # the defaults, as the workflow has them
    return config


@pytest.fixture(scope="module")
def run_table(config) -> dict:
    return expand_runs(config)


@pytest.fixture(scope="module")
def report(tmp_path_factory, config, run_table):
    workdir = copy_repo(tmp_path_factory.mktemp("report_workflow") / "repo")
    (workdir / "sweep.yaml").write_text(yaml.safe_dump(SWEEP))
    write_fake_runs(config, workdir / "artifacts" / "runs", run_table)
    # The runs' files are summarize's inputs; with train_model and evaluate_model left out of the
    # allowed rules, Snakemake takes them as they are instead of planning to remake them (and the
    # data and tokenizer before them).
    args = ("--configfile", "sweep.yaml")
    res = snakemake(
        workdir, *args, "--cores", "2", "--allowed-rules", "summarize", "--", "summarize"
    )
    assert "localrule summarize:" in res.stdout + res.stderr
    snakemake(workdir, *args, "--report", "report.html")
    page = (workdir / "report.html").read_text(encoding="utf-8")
    return workdir, page, script_var(page, "results")


def test_report_is_self_contained(report):
    _, page, results = report
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert not re.search(r"url\(\s*[\"']?(https?:)?//", page)
    assert all(r["data_uri"].startswith("data:") for r in results.values())


def test_report_holds_the_summary_tables(report, run_table):
    workdir, _, results = report
    settings = list(dict.fromkeys(row["setting"] for row in run_table.values()))
    for name, key, expected in (
        ("summary.csv", "run", list(run_table)),
        ("summary_by_setting.csv", "setting", settings),
    ):
        data = embedded(results[f"artifacts/{name}"])
        assert data == (workdir / "artifacts" / name).read_bytes()
        assert [row[key] for row in csv.DictReader(io.StringIO(data.decode()))] == expected
    table = embedded(results["artifacts/plots/summary.html"]).decode()
    for name in [*run_table, *settings]:
        assert f"<th>{html.escape(name).replace('-', '-<wbr>')}</th>" in table
    # every other setting against compare_to, one row per metric
    data = embedded(results["artifacts/summary_vs_reference.csv"])
    assert data == (workdir / "artifacts" / "summary_vs_reference.csv").read_bytes()
    rows = list(csv.DictReader(io.StringIO(data.decode())))
    others = [s for s in settings if s != "condor-lr0.001"]
    assert [row["setting"] for row in rows[::4]] == others and {row["reference"] for row in rows} == {"condor-lr0.001"}
    verdicts = {row["setting"]: row["verdict"] for row in rows if row["metric"] == "val_loss"}
    assert verdicts["baseline"] == "too few runs" and verdicts["condor-lr0.003"] != "too few runs"
    assert "<h2>Against condor-lr0.001</h2>" in table


def test_report_holds_the_samples(report, config, run_table):
    _, _, results = report
    samples = embedded(results["artifacts/plots/samples.html"]).decode()
    first = {}
    for run, row in run_table.items():
        first.setdefault(row["setting"], run)
    for run in first.values():  # each setting's first run speaks for it
        assert html.escape(completion(run)) in samples
    assert html.escape(completion("condor-lr0.001-seed2")) not in samples
    for prompt in config["eval"]["prompts"]:
        assert f"<b>{html.escape(prompt)}</b>" in samples


def test_report_holds_the_plots_and_a_section_per_sweep(report, config, run_table):
    workdir, page, results = report
    moe = [r for r, row in run_table.items() if config["models"][row["model"]]["ffn"] == "moe"]
    expected = {"loss_vs_step.png", "loss_vs_time.png", "sweep_lr.png"}
    expected |= {f"{r}_{kind}.png" for r in moe for kind in ("expert_load", "dropped")}
    pngs = {Path(p).name: r for p, r in results.items() if r["mime_type"] == "image/png"}
    assert set(pngs) == expected
    for name, result in pngs.items():
        assert embedded(result) == (workdir / "artifacts" / "plots" / name).read_bytes()
    categories = script_var(page, "categories")
    assert "2. Sweep lr" in json.dumps(categories)
    assert "artifacts/plots/sweep_lr.png" in json.dumps(categories["2. Sweep lr"])


def test_settings_come_from_the_records_not_the_config(report, config):
    _, page, results = report
    settings = embedded(results["artifacts/plots/run_settings.html"]).decode()
    # Recorded: 200 steps on the CPU, in fp32; the config asks for 20,000 in bf16.
    assert "<th>max_steps</th><td>200</td>" in settings
    assert (
        "<th>device</th><td>cpu</td>" in settings and "<th>precision</th><td>fp32</td>" in settings
    )
    assert "<td>0.001</td>" in settings and "<td>0.003</td>" in settings  # the sweep's train.lr
    captions = [r["caption"] for r in results.values()]
    description = script_var(page, "workflow-desc")
    assert all(captions) and not any("system-message" in c for c in [*captions, description])
    steps = config["train"]["max_steps"]
    for text in [*captions, description]:
        for stated in (
            str(steps),
            f"{steps:,}",
            config["dataset"]["hub_id"],
            config["tokenizer"]["name"],
        ):
            assert stated not in text, (stated, text[:300])
