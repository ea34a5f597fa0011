"""GPT: causality, attention, shapes, tied weights, preset sizes, config validation, loss at init."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from tinylm.errors import ConfigError
from tinylm.model import GPT, GPTConfig

CONFIG_YAML = Path(__file__).resolve().parents[2] / "config" / "config.yaml"


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_shapes_and_keys(ffn, tiny_gpt):
    model = tiny_gpt(ffn=ffn, n_experts=4, drop_tokens=False)
    idx = torch.randint(0, 97, (3, 10))
    out = model(idx)
    assert set(out) == {"logits"} and out["logits"].shape == (3, 10, 97)
    out = model(idx, idx)
    moe_keys = {"balance_loss", "z_loss", "dropped_frac", "expert_load"} if ffn == "moe" else set()
    assert set(out) == {"loss", "ce_loss"} | moe_keys  # the loss path never hands out logits
    assert out["loss"].shape == out["ce_loss"].shape == ()
    if ffn == "moe":
        assert out["expert_load"].shape == (2, 4)


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_future_tokens_do_not_change_earlier_logits(ffn, tiny_gpt):
    # Dropless MoE: with a capacity, row 1's drops depend on row 0's later tokens (flattened token
    # order), which is routing, not attention.
    model = tiny_gpt(ffn=ffn, drop_tokens=False)
    idx = torch.randint(0, 97, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = torch.randint(0, 97, (2, 5))
    a, b = model(idx)["logits"], model(changed)["logits"]
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_sdpa_matches_explicit_lower_triangular_mask(tiny_gpt):
    model = tiny_gpt()
    attn = model.blocks[0].attn
    x = torch.randn(2, 9, 32)
    B, T, D, H = 2, 9, 32, 4
    q, k, v = attn.qkv(x).split(D, dim=2)
    q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(D // H)
    scores = scores.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), float("-inf"))
    y = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, T, D)
    torch.testing.assert_close(attn(x), y)  # the block applies attn.proj with the residual add


def test_tied_embeddings_share_storage(tiny_gpt):
    model = tiny_gpt()
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    assert model.lm_head.bias is None


def presets():
    cfg = yaml.safe_load(CONFIG_YAML.read_text())
    for name, entry in cfg["models"].items():
        d = {k: v for k, v in entry.items() if k != "train"}
        yield name, GPTConfig.from_dict({**d, "vocab_size": cfg["tokenizer"]["vocab_size"]})


def test_preset_parameter_counts():
    counts = {name: GPT(c).num_params() for name, c in presets()}
    assert counts == {"baseline": 6_868_992, "falcon": 16_347_648, "condor": 2_460_544}


def test_config_round_trip_and_flattening(tiny_config):
    for _, c in presets():
        assert GPTConfig.from_dict(c.to_dict()) == c
    nested = GPTConfig.from_dict(tiny_config(ffn="moe", moe={"n_experts": 4, "top_k": 1}))
    assert (nested.n_experts, nested.top_k, nested.expert_hidden) == (4, 1, 64)
    assert "moe" not in nested.to_dict()


@pytest.mark.parametrize(
    "change, words",
    [
        ({"d_modl": 32}, ["unknown key d_modl"]),
        ({"moe": {"n_expert": 4}}, ["unknown key moe.n_expert"]),
        ({"train": {"lr": 1.0}}, ["unknown key train"]),
        ({"ffn": "sparse"}, ["ffn", "'sparse'"]),
        ({"n_heads": 5}, ["n_heads = 5", "d_model = 32"]),
        ({"ffn": "moe", "top_k": 9}, ["top_k = 9", "n_experts = 8"]),
        ({"capacity_factor": 0}, ["capacity_factor = 0"]),
        ({"capacity_factor": -1.5}, ["capacity_factor = -1.5"]),
        ({"d_model": 0}, ["d_model = 0"]),
        ({"n_layers": -2}, ["n_layers = -2"]),
        ({"vocab_size": 0}, ["vocab_size = 0"]),
        ({"d_ff_expert": 0}, ["d_ff_expert = 0"]),
        ({"d_ff": 2.5}, ["d_ff: 2.5", "'integer'"]),
        ({"fp32_residual": "yes"}, ["fp32_residual: 'yes'", "'boolean'"]),
        # nan passes every bound; it crashed the MoE's capacity (math.ceil) or made every loss nan
        ({"capacity_factor": float("nan")}, ["capacity_factor = nan", "finite"]),
        ({"capacity_factor": float("inf")}, ["capacity_factor = inf", "finite"]),
        ({"aux_loss_coef": float("nan")}, ["aux_loss_coef = nan", "finite"]),
        ({"z_loss_coef": float("inf")}, ["z_loss_coef = inf", "finite"]),
    ],
)
def test_config_errors_name_key_and_value(change, words, tiny_config):
    with pytest.raises(ConfigError) as e:
        GPTConfig.from_dict(tiny_config(**change))
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("ffn,fused_blocks,fused_adds,bf16_stream", [
    ("dense", True, 4, True), ("dense", False, 4, True), ("moe", True, 2, True), ("moe", False, 0, False)])
def test_which_adds_take_the_fused_path(monkeypatch, tiny_config, ffn, fused_blocks, fused_adds, bf16_stream):
    """Both adds of a dense block and the add after attention of an MoE block go through
    residual_layer_norm, with a bf16 stream on the fused path; moe_fused_blocks: false (how MoE models
    ran until 2026-12-06) keeps an MoE block's adds plain and its stream fp32. On the CPU the fused call
    runs the plain layers, so this counts the calls and asks _bf16_residual as CUDA would answer."""
    import tinylm.model as model_module

    calls = []
    fused = model_module.residual_layer_norm
    monkeypatch.setattr(model_module, "residual_layer_norm", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    cfg = GPTConfig.from_dict(tiny_config(ffn=ffn, n_layers=2, n_experts=4, top_k=2, moe_fused_blocks=fused_blocks))
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    assert torch.isfinite(model(idx, idx)["loss"])
    assert len(calls) == fused_adds
    monkeypatch.setattr(model_module, "residual_norm_fused", lambda x: True)
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device: torch.bfloat16)
    assert model._bf16_residual(torch.zeros(2, 8, cfg.d_model)) is bf16_stream


def test_residual_stream_stays_fp32_off_the_fused_path(tiny_config):
    # bf16 between blocks only on CUDA under bf16 autocast with the kernels (tests/test_cuda.py); on the
    # CPU, autocast or not, the stream is the embeddings' dtype.
    model = GPT(GPTConfig.from_dict(tiny_config()))
    x = torch.zeros(2, 3, model.config.d_model)
    assert not model._bf16_residual(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not model._bf16_residual(x)
    assert GPTConfig.from_dict(tiny_config(fp32_residual=True)).to_dict()["fp32_residual"] is True


def test_missing_key_is_a_config_error(tiny_config):
    d = tiny_config()
    del d["d_model"]
    with pytest.raises(ConfigError, match="d_model"):
        GPTConfig.from_dict(d)


def test_longer_than_max_seq_len_is_an_error(tiny_gpt):
    with pytest.raises(ValueError, match="max_seq_len = 16"):
        tiny_gpt()(torch.zeros(1, 17, dtype=torch.long))


def test_uniform_output_has_loss_ln_vocab(tiny_gpt):
    model = tiny_gpt()
    with torch.no_grad():
        model.tok_emb.weight.zero_()  # tied: every logit is 0
    idx = torch.randint(0, 97, (2, 8))
    out = model(idx, idx.roll(1, dims=1))
    torch.testing.assert_close(out["loss"], torch.tensor(math.log(97)))


def test_loss_is_cross_entropy_plus_weighted_router_losses(tiny_gpt):
    model = tiny_gpt(ffn="moe", aux_loss_coef=0.5, z_loss_coef=0.25)
    idx = torch.randint(0, 97, (2, 8))
    out = model(idx, idx)
    ce = F.cross_entropy(model(idx)["logits"].flatten(0, 1), idx.flatten())
    torch.testing.assert_close(out["ce_loss"], ce)
    torch.testing.assert_close(out["loss"], ce + 0.5 * out["balance_loss"] + 0.25 * out["z_loss"])


def test_init_and_flops(tiny_gpt):
    model = tiny_gpt()
    torch.testing.assert_close(
        model.blocks[1].attn.proj.weight.std(), torch.tensor(0.01), atol=2e-3, rtol=0
    )
    assert float(model.blocks[0].ffn.fc.bias.detach().abs().max()) == 0.0
    d, L, V, f, T = 32, 2, 97, 64, 16
    assert model.flops_per_token(T) == 6 * (L * (4 * d * d + 2 * d * f) + V * d) + 12 * L * d * T
    moe = tiny_gpt(ffn="moe", n_experts=4, top_k=2)  # expert width 64 // 2 = 32
    assert (
        moe.flops_per_token(T)
        == 6 * (L * (4 * d * d + d * 4 + 2 * 2 * d * 32) + V * d) + 12 * L * d * T
    )
    # padded: the experts run capacity_factor times the routed tokens (every token through every
    # expert without dropping); dense models have no padding
    cf = moe.config.capacity_factor
    assert moe.config.flops_per_token(T, padded=True) == round(
        moe.flops_per_token(T) + 6 * L * (cf - 1) * 2 * 2 * d * 32)
    undropped = tiny_gpt(ffn="moe", n_experts=4, top_k=2, drop_tokens=False)
    assert undropped.config.flops_per_token(T, padded=True) == moe.flops_per_token(T) + 6 * L * 2 * d * 32 * 2
    assert model.config.flops_per_token(T, padded=True) == model.flops_per_token(T)


def test_compiled_cross_entropy_matches_library_value_and_gradient():
    """The compiled form of the plain loss (indicator instead of scatter) is F.cross_entropy."""
    from tinylm.kernels import IGNORE
    from tinylm.kernels import reference_cross_entropy as cross_entropy

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(60, 97, generator=g).requires_grad_()
    targets = torch.randint(0, 97, (60,), generator=g)
    targets[::7] = IGNORE  # padded evaluation rows count nowhere
    ref = F.cross_entropy(logits, targets)
    (ref_grad,) = torch.autograd.grad(3.0 * ref, logits)
    out = torch.compile(cross_entropy, backend="aot_eager", fullgraph=True)(logits, targets)
    (grad,) = torch.autograd.grad(3.0 * out, logits)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_padded_flops_count_the_slots_the_experts_run(tiny_config):
    """A queue holds at most every token (MoE.capacity): at capacity_factor * top_k / n_experts > 1 the
    experts run every token each, n_experts / top_k times the routed tokens, not capacity_factor times."""
    from tinylm.moe import MoE

    T = 4096
    for cf in (0.5, 1.25, 2.0, 4.0):
        cfg = GPTConfig(**tiny_config(ffn="moe", n_experts=4, top_k=2, capacity_factor=cf))
        slots = cfg.n_experts * MoE(cfg).capacity(T)  # the rows the experts' products run per T tokens
        sparse = GPTConfig(**tiny_config(ffn="moe", n_experts=4, top_k=2, capacity_factor=1.0))
        per_slot = 6 * cfg.n_layers * 2 * cfg.d_model * cfg.expert_hidden
        extra = cfg.flops_per_token(16, padded=True) - sparse.flops_per_token(16, padded=True)
        assert extra == pytest.approx(per_slot * (slots / T - cfg.top_k), abs=1), cf
