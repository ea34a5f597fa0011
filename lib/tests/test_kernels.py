"""tinylm.kernels on the CPU: the fallback paths are the plain PyTorch ones, and the switch works.

The Triton kernels themselves run only on CUDA; lib/tests/test_cuda.py compares them with these
fallbacks on a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tinylm import kernels
from tinylm.errors import ConfigError
from tinylm.kernels import attention
from tinylm.kernels.residual_norm import _LinearTallGrad


def test_cpu_attention_is_sdpa_of_the_split_heads():
    torch.manual_seed(0)
    B, T, H, Dh = 2, 9, 3, 8
    qkv = torch.randn(B, T, 3 * H * Dh)
    assert not kernels.attention_fused(qkv, H)
    q, k, v = (t.view(B, T, H, Dh).transpose(1, 2) for t in qkv.split(H * Dh, dim=2))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, H * Dh)
    torch.testing.assert_close(kernels.causal_attention(qkv, H), want)


def test_cpu_linear_attention_is_attention_of_the_projection_with_all_gradients():
    torch.manual_seed(0)
    B, T, H, Dh = 2, 9, 3, 8
    x = torch.randn(B, T, H * Dh, requires_grad=True)
    w = torch.randn(3 * H * Dh, H * Dh, requires_grad=True)
    b = torch.randn(3 * H * Dh, requires_grad=True)
    got = kernels.linear_causal_attention(x, w, b, H)
    want = kernels.reference_attention(F.linear(x, w, b), H)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    for a, c in zip(torch.autograd.grad(got, (x, w, b), g), torch.autograd.grad(want, (x, w, b), g), strict=True):
        torch.testing.assert_close(a, c)


def test_cpu_residual_layer_norm_is_projection_add_and_norm():
    torch.manual_seed(0)
    x, h = torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    pw, pb, nw, nb = torch.randn(8, 12), torch.randn(8), torch.randn(8), torch.randn(8)
    assert not kernels.residual_norm_fused(x)
    xs, y = kernels.residual_layer_norm(x, h, pw, pb, nw, nb, 1e-5)
    want = x + F.linear(h, pw, pb)
    torch.testing.assert_close(xs, want)
    torch.testing.assert_close(y, F.layer_norm(want, (8,), nw, nb, 1e-5))
    last = kernels.residual_layer_norm(x, h, pw, pb, nw, nb, 1e-5, keep_residual=False)
    torch.testing.assert_close(last, y)


def test_tall_weight_gradient_linear_is_the_linear_layer_with_its_gradients():
    """The function behind the fused path's wide projections (CUDA only there) is plain autograd math:
    checked here in float64 against F.linear, with a 3-d input as the model passes it."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    got = _LinearTallGrad.apply(x, w)
    want = F.linear(x, w)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    for a, c in zip(torch.autograd.grad(got, (x, w), g), torch.autograd.grad(want, (x, w), g), strict=True):
        torch.testing.assert_close(a, c)
    assert torch.autograd.gradcheck(_LinearTallGrad.apply, (x[:1, :2].detach().requires_grad_(True), w))
    frozen = _LinearTallGrad.apply(x, w.detach())  # a frozen weight: only x gets a gradient
    (gx,) = torch.autograd.grad(frozen, (x,), g)
    torch.testing.assert_close(gx, g @ w.detach())


def test_cpu_linear_gelu_is_gelu_of_the_linear_layer():
    torch.manual_seed(0)
    x, w, b = torch.randn(6, 5, 8), torch.randn(16, 8), torch.randn(16)
    assert not kernels.gelu_fused(x)
    torch.testing.assert_close(kernels.linear_gelu(x, w, b), F.gelu(F.linear(x, w, b)))


def test_cpu_linear_cross_entropy_is_the_library_loss_with_ignored_rows():
    torch.manual_seed(0)
    x, w = torch.randn(30, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    targets[::4] = kernels.IGNORE
    assert not kernels.cross_entropy_fused(x, w)
    got = kernels.linear_cross_entropy(x, w, targets)
    want = F.cross_entropy(x @ w.t(), targets, ignore_index=kernels.IGNORE)
    torch.testing.assert_close(got, want)
    g = torch.autograd.grad(got, (x, w))
    torch.testing.assert_close(g, torch.autograd.grad(want, (x, w)))


def test_switch_is_the_environment_variable_read_at_each_call(monkeypatch):
    monkeypatch.delenv("TINYLM_KERNELS", raising=False)
    assert kernels.enabled()
    for value, on in (("0", False), ("1", True), ("", True)):
        monkeypatch.setenv("TINYLM_KERNELS", value)
        assert kernels.enabled() is on
    monkeypatch.setenv("TINYLM_KERNELS", "off")
    with pytest.raises(ConfigError, match="TINYLM_KERNELS='off'.*0.*1"):
        kernels.enabled()


def test_eligibility_reads_the_switch_at_the_call(monkeypatch):
    """A CUDA bf16 input's path, with Triton stubbed in: the kernels unless TINYLM_KERNELS=0."""
    monkeypatch.setattr(attention, "triton", object())
    monkeypatch.delenv("TINYLM_KERNELS", raising=False)
    assert attention._attention_ok(True, torch.bfloat16, (2, 16, 3 * 64), 1)
    monkeypatch.setenv("TINYLM_KERNELS", "0")
    assert not attention._attention_ok(True, torch.bfloat16, (2, 16, 3 * 64), 1)


def test_disabled_restores_the_switch_even_on_error(monkeypatch):
    monkeypatch.delenv("TINYLM_KERNELS", raising=False)
    with pytest.raises(RuntimeError), kernels.disabled():
        assert not kernels.enabled()
        raise RuntimeError("inside")
    assert "TINYLM_KERNELS" not in os.environ  # unset again, as it was
    monkeypatch.setenv("TINYLM_KERNELS", "1")
    with kernels.disabled():
        assert os.environ["TINYLM_KERNELS"] == "0"
    assert os.environ["TINYLM_KERNELS"] == "1"  # restores what it found


def test_sources_digest_changes_with_any_kernel_module(tmp_path):
    """A tile change in a triton_op wrapper must change the digest compile_model adds to torch's
    compile-cache key: a cached graph would otherwise keep launching with the old tiles."""
    import shutil

    from tinylm.kernels.common import KERNELS_DIR

    same, edited = tmp_path / "same", tmp_path / "edited"
    for folder in (same, edited):
        shutil.copytree(KERNELS_DIR, folder, ignore=shutil.ignore_patterns("__pycache__"))
    combine = edited / "combine.py"
    text = combine.read_text()
    assert "_COMBINE_TILES = (32, 4)" in text
    combine.write_text(text.replace("_COMBINE_TILES = (32, 4)", "_COMBINE_TILES = (16, 4)"))
    assert kernels.source_digest(same) == kernels.source_digest()
    assert kernels.source_digest(edited) != kernels.source_digest()


def test_compiling_adds_the_kernels_digest_and_autocast_dtype_to_torchs_cache_key(monkeypatch):
    """compile_model lets torch's AOTAutograd cache keep training graphs with custom autograd.Functions,
    and keys them by the kernels' sources and the autocast dtype too, after a tag the user set: once,
    and a later call's dtype replaces an earlier one's (torch 2.11 keys by whether autocast is on)."""
    from tinylm.step import compile_model

    monkeypatch.setattr(torch.compiler.config, "cache_key_tag", "mine")
    monkeypatch.setattr(torch._functorch.config, "autograd_cache_allow_custom_autograd_functions", False)
    ours = f"tinylm-kernels-{kernels.source_digest()}-autocast"
    for _ in range(2):
        compile_model(torch.nn.Linear(2, 2), torch.bfloat16)
    assert torch.compiler.config.cache_key_tag == f"mine+{ours}-bfloat16"
    assert torch._functorch.config.autograd_cache_allow_custom_autograd_functions
    compile_model(torch.nn.Linear(2, 2), torch.float16)
    assert torch.compiler.config.cache_key_tag == f"mine+{ours}-float16"
    compile_model(torch.nn.Linear(2, 2), None)
    assert torch.compiler.config.cache_key_tag == f"mine+{ours}-off"
    monkeypatch.setattr(torch.compiler.config, "cache_key_tag", "")
    compile_model(torch.nn.Linear(2, 2), torch.bfloat16)
    assert torch.compiler.config.cache_key_tag == f"{ours}-bfloat16"
