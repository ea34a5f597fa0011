"""Workflow tests run Snakemake in temporary copies of the repository (its tracked and untracked
source files, never data/ or artifacts/), offline, with the project's own synthetic data."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def _library_test_fixtures():
    """lib/tests/conftest.py as a module: its fixtures are not visible from this folder otherwise."""
    spec = importlib.util.spec_from_file_location("lib_tests_conftest", REPO / "lib" / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The library tests' tiny training configs, defined once for both test folders.
_lib_fixtures = _library_test_fixtures()
tiny_train_model = _lib_fixtures.tiny_train_model
tiny_train_config = _lib_fixtures.tiny_train_config


def source_files(repo: Path = REPO) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=repo, capture_output=True,
                         text=True, check=True).stdout
    return [f for f in out.splitlines() if (repo / f).is_symlink() or (repo / f).is_file()]


def copy_repo(dest: Path) -> Path:
    """The source files, links kept as links (the top-level `slurm` is one), as a fresh clone has them."""
    for rel in source_files():
        src, target = REPO / rel, dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), target)
        else:
            shutil.copy2(src, target)
    return dest


def offline_env() -> dict:
    env = dict(os.environ)
    # A closed local port stands in for the hub, so no test ever downloads, networked machine or not.
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_DATASETS_OFFLINE="0", WANDB_MODE="disabled",
               PYTHONUNBUFFERED="1")
    # These runs use local executors, yet the SLURM plugin asks `scontrol show config` whenever
    # Snakemake starts; where SLURM's tools are installed but no controller answers (this machine
    # before tests/test_slurm.py starts its cluster), that waits 10 s. An empty config fails at once.
    env["SLURM_CONF"] = os.devnull
    # Rules run `python`: the environment this test runs in, as if it were activated.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def snakemake(workdir: Path, *args: str, timeout: int = 900, check: bool = True,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """Run snakemake in workdir, offline (`env` adds variables); fail the test with its logs."""
    res = subprocess.run([SNAKEMAKE, *args], cwd=workdir, capture_output=True, text=True, timeout=timeout,
                         env={**offline_env(), **(env or {})})
    if check and res.returncode != 0:
        # logs/ of the data rules, <results_dir>/logs/ of the others
        found = sorted(p for p in workdir.rglob("*.log") if "logs" in p.relative_to(workdir).parts)
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in found)
        pytest.fail(f"snakemake {' '.join(args)} failed ({res.returncode}):\n{res.stdout[-4000:]}\n"
                    f"{res.stderr[-6000:]}\n{logs}")
    return res


def planned_jobs(res: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> count from a dry run's job stats table."""
    text = res.stdout + res.stderr
    table = text[text.index("Job stats:"):] if "Job stats:" in text else ""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m.group(1) != "total"}


@pytest.fixture()
def repo_copy(tmp_path) -> Path:
    return copy_repo(tmp_path / "repo")


# The offline demo as the tests build it: config/demo.yaml, shortened (tests/fixtures/short-demo.yaml).
DEMO_CONFIGS = ("config/demo.yaml", "tests/fixtures/short-demo.yaml")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """The offline demo (DEMO_CONFIGS), built once end to end; tests must not modify it."""
    work = copy_repo(tmp_path_factory.mktemp("demo") / "repo")
    snakemake(work, "--cores", "2", "--configfile", *DEMO_CONFIGS, timeout=1800)
    return work


# -- data-parallel training, one process against several (tests/test_ddp.py, tests/test_slurm.py) ---------


@pytest.fixture(scope="session")
def packed(tmp_path_factory):
    """Synthetic stories -> a 512-token BPE -> packed rows of 17 tokens (train and validation)."""
    from tinylm.data import build_synthetic_corpus

    return build_synthetic_corpus(tmp_path_factory.mktemp("packed"), n_train=400, n_validation=40,
                                  vocab_size=512, seq_len=16)


def train_script(packed, run_dir: Path, model: dict, train: dict, processes: int,
                 launcher: list[str] | None = None, env: dict | None = None, timeout: int = 300) -> list[dict]:
    """Run workflow_scripts/train_model.py as `processes` data-parallel processes; metrics.jsonl's rows.
    The launcher is rule train_model's (rules/common.smk's train_launcher) unless given. What the
    processes printed is left in run_dir/script-output.txt."""
    params = {"model": model, "train": {**train, "gpus": processes}, "eval_batch_size": 16}
    if launcher is None:
        launcher = [sys.executable]
        if processes > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    cmd = [*launcher, str(REPO / "workflow_scripts" / "train_model.py"), "--name", run_dir.name,
           "--train-bin", str(packed["train"]), "--val-bin", str(packed["validation"]),
           "--tokenizer", str(packed["tokenizer"]), "--best", str(run_dir / "checkpoints" / "best_model.pt"),
           "--history", str(run_dir / "metrics.jsonl"), "--config", str(run_dir / "config.json"),
           "--run-dir", str(run_dir), "--threads", "1", "--params", json.dumps(params)]
    # `python` on PATH is this environment's, for launchers that start it by name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "lib"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert res.returncode == 0, f"{' '.join(cmd[:8])} ... failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    (run_dir / "script-output.txt").write_text(res.stdout + res.stderr)
    assert json.loads((run_dir / "config.json").read_text())["world_size"] == processes
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def one_process_run(packed, tmp_path_factory, tiny_train_model, tiny_train_config):
    """What the data-parallel runs are held to: (model, train, metrics.jsonl's rows) of one process,
    trained once for the suite."""
    model, train = tiny_train_model(), tiny_train_config(max_steps=20, log_every=1)
    return model, train, train_script(packed, tmp_path_factory.mktemp("one") / "one", model, train, processes=1)


def curve(rows: list[dict], kind: str, key: str = "loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if r["kind"] == kind]


def assert_same_curves(one: list[dict], many: list[dict], max_steps: int) -> None:
    """Several processes' training and validation losses are one process's, step by step (1e-4), and
    they moved: equal curves are not two copies of an untrained model."""
    train_one, train_many = curve(one, "train"), curve(many, "train")
    assert [s for s, _ in train_one] == list(range(1, max_steps + 1))
    assert [s for s, _ in train_many] == [s for s, _ in train_one]
    for (step, a), (_, b) in zip(train_one, train_many, strict=True):
        assert b == pytest.approx(a, abs=1e-4), f"step {step}: one process {a}, several {b}"
    eval_one, eval_many = curve(one, "eval", "val_loss"), curve(many, "eval", "val_loss")
    assert eval_one and [s for s, _ in eval_many] == [s for s, _ in eval_one]
    assert [v for _, v in eval_many] == pytest.approx([v for _, v in eval_one], abs=1e-4)
    assert train_one[-1][1] < train_one[0][1] - 0.5
