"""Device resolution, shared by training, evaluation, generation and the benchmark."""

import logging

import pytest
import torch

from tinylm.devices import describe_device, precision_on, resolve_device
from tinylm.errors import ConfigError


def test_cpu_and_unknown_names():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"--device = 'tpu' is not a device; use auto, cpu, cuda or cuda:N"):
        resolve_device("tpu", setting="--device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens when no GPU is present")
def test_without_a_gpu_auto_falls_back_and_cuda_fails_naming_the_setting(caplog):
    with caplog.at_level(logging.WARNING, logger="tinylm.devices"):
        assert resolve_device("auto", setting="train.device") == torch.device("cpu")
    assert "set train.device to cuda to require a GPU" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tinylm.devices"):
        assert resolve_device("auto", setting="--device", warn_cpu=False) == torch.device("cpu")
    assert not caplog.text
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=rf"--device = '{name}' but no CUDA GPU is visible"):
            resolve_device(name, setting="--device")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_with_a_gpu_cuda_names_an_index():
    assert resolve_device("auto").type == "cuda" and resolve_device("cuda").index is not None
    with pytest.raises(ConfigError, match="CUDA GPU"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_precision_as_it_runs():
    for setting in ("bf16", "fp16", "fp32"):
        assert precision_on(torch.device("cpu"), setting) == "fp32"  # autocast is CUDA only
        assert precision_on(torch.device("cuda", 0), setting) == setting
    assert describe_device(torch.device("cpu")) == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_is_described_by_index_and_name():
    name = torch.cuda.get_device_name(0)
    assert describe_device(torch.device("cuda", 0)) == f"cuda:0 ({name})"


def test_the_recorded_commit_is_the_commit_even_at_a_release_tag(tmp_path, monkeypatch):
    """config.json's software.tinylm_commit is "the commit of the checkout" (README). `git describe`
    gave the name of an annotated tag instead where one was at or before HEAD: `v1` on a release
    checkout, a name that can be moved or deleted, or `v1-1-g<hash>` a commit after it."""
    import shutil
    import subprocess

    from tinylm import devices

    if shutil.which("git") is None:
        pytest.skip("needs git")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgSign=false",
           "-c", "tag.gpgSign=false"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "lib" / "tinylm").mkdir(parents=True)
    (tmp_path / "lib" / "tinylm" / "devices.py").write_text("# tracked\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    subprocess.run([*git, "tag", "-a", "v1", "-m", "release"], check=True)
    monkeypatch.setattr(devices, "__file__", str(tmp_path / "lib" / "tinylm" / "devices.py"))

    def head() -> str:
        return subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()

    assert devices._checkout_commit() == head()
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "two"], check=True)
    assert devices._checkout_commit() == head()
    (tmp_path / "lib" / "tinylm" / "devices.py").write_text("# changed\n")
    assert devices._checkout_commit() == head() + "-dirty"
