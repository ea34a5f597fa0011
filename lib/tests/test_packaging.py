"""The install's dependency lists: pyproject.toml and environment.yml name the same packages, those
cover every import of the library, the workflow scripts and the tests, and nothing listed goes unused."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CODE = ("lib", "workflow_scripts", "tests")

# Imports no list needs to name: the tests' own helper modules, and optional imports behind an ImportError.
LOCAL = {"tinylm", "conftest", "fake_runs", "faults", "child_env"}
OPTIONAL = {
    "triton": "the CUDA builds of torch bring it; kernels/common.py runs without it",
    "psutil": "only the data benchmark's memory figure, skipped without it",
}
# Listed for what they do outside `import`: a Snakemake executor (profiles/slurm), a pytest plugin
# (`pytest -n`), command-line tools (.ci/run).
NOT_IMPORTED = {"snakemake-executor-plugin-slurm", "pytest-xdist", "ruff", "snakefmt"}
CONDA_NAMES = {"pytorch": "torch"}  # conda-forge's name -> PyPI's


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _spec(requirement: str) -> tuple[str, str]:
    name = _name(requirement)
    return CONDA_NAMES.get(name, name), requirement.strip()[len(name):].replace(" ", "")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _imports() -> dict[str, set[str]]:
    """Top-level module -> the files that import it, over CODE."""
    found: dict[str, set[str]] = {}
    for folder in CODE:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def _third_party() -> dict[str, set[str]]:
    return {m: files for m, files in _imports().items()
            if m not in sys.stdlib_module_names and m not in LOCAL and m not in OPTIONAL}


def _distributions_of(module: str) -> set[str]:
    return {d.lower().replace("_", "-") for d in importlib.metadata.packages_distributions().get(module, [])}


def test_environment_yml_lists_what_pyproject_lists_with_the_same_bounds():
    project = _pyproject()
    pip = dict(map(_spec, project["dependencies"] + project["optional-dependencies"]["dev"]))
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = dict(_spec(d) for d in env["dependencies"] if isinstance(d, str) and _name(d) not in ("python", "pip"))
    assert conda == pip


def test_every_import_is_a_listed_dependency():
    project = _pyproject()
    listed = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    missing = {m: sorted(files)[:3] for m, files in _third_party().items() if not _distributions_of(m) & listed}
    assert not missing, f"imported but not listed in pyproject.toml: {missing}"


def test_every_listed_dependency_is_imported_or_used_otherwise():
    project = _pyproject()
    imported = set().union(*(_distributions_of(m) for m in _third_party()))
    unused = [r for r in project["dependencies"] + project["optional-dependencies"]["dev"]
              if _name(r) not in imported and _name(r) not in NOT_IMPORTED]
    assert not unused, f"listed in pyproject.toml but imported nowhere in {', '.join(CODE)}: {unused}"


def test_the_dev_extra_brings_the_pytest_plugins_the_documented_commands_use():
    docs = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "dev").glob("*.md")]
    uses_n = [str(p.relative_to(ROOT)) for p in docs if re.search(r"pytest[^`\n]* -n \d", p.read_text(encoding="utf-8"))]
    dev = {_name(r) for r in _pyproject()["optional-dependencies"]["dev"]}
    assert not uses_n or "pytest-xdist" in dev, f"{uses_n} run `pytest -n`, which needs pytest-xdist"


# APIs the library calls, and the first release of their distribution that has them.
API_SINCE = {
    "encode_batch_fast": ("tokenizers", "0.20"),  # pack.py; 0.19.1: AttributeError while packing
    "torch.library.triton_op": ("torch", "2.6"),  # kernels/, defined at import wherever triton is
    "torch.library.wrap_triton": ("torch", "2.6"),
}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def test_lower_bounds_admit_no_release_without_an_api_the_library_calls():
    bounds = {}
    for r in _pyproject()["dependencies"]:
        if m := re.search(r">=\s*([\d.]+)", r):
            bounds[_name(r)] = m[1]
    source = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "lib" / "tinylm").rglob("*.py"))
    too_low = {api: f"{dist}>={bounds.get(dist)}, needs {since}" for api, (dist, since) in API_SINCE.items()
               if api in source and _version(bounds.get(dist, "0")) < _version(since)}
    assert not too_low, f"pyproject.toml allows releases without what the library calls: {too_low}"


def test_the_linters_are_held_to_releases_that_pass_on_this_code():
    """.ci/run fails on any ruff or snakefmt finding, and what they find changes between releases: with the
    old floors (ruff 0.5.0, snakefmt 0.10.0) ruff found 8 errors here and snakefmt could not parse
    rules/common.smk. The dev extra holds each to a range that passes, so a new release cannot fail CI."""
    dev = {_name(r): r for r in _pyproject()["optional-dependencies"]["dev"]}
    for tool in ("ruff", "snakefmt"):
        assert re.search(r">=[\d.]+\s*,\s*<[\d.]+", dev[tool]), f"{dev[tool]}: give a floor and a ceiling"


def test_the_library_states_the_version_pyproject_installs():
    """config.json records tinylm.__version__ and `tinylm --version` prints the installed package's
    version (pyproject.toml): one release, one number."""
    import tinylm

    assert tinylm.__version__ == _pyproject()["version"]
