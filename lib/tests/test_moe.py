"""MoE routing against a slow per-token reference; losses, statistics, no host sync, router gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from tinylm import moe as moe_module
from tinylm.model import GPTConfig
from tinylm.moe import MoE

E, K, D = 4, 2, 16


def make_moe(**overrides) -> MoE:
    torch.manual_seed(0)
    cfg = GPTConfig(
        **{
            "d_model": D,
            "n_layers": 1,
            "n_heads": 2,
            "d_ff": 32,
            "ffn": "moe",
            "n_experts": E,
            "top_k": K,
            **overrides,
        }
    )
    moe = MoE(cfg)
    with torch.no_grad():  # non-zero biases so that they are tested too
        moe.b1.normal_(0, 0.1)
        moe.b2.normal_(0, 0.1)
    return moe


def reference(moe: MoE, x_TD: torch.Tensor, capacity: int):
    """Token by token, in flattened order: route, queue, drop beyond capacity, run kept experts.
    Returns the output, which assignments were kept, and the assignments routed to each expert
    (kept or dropped: the load the balance loss and expert_load count)."""
    y_TD = torch.zeros_like(x_TD)
    queue = [0] * E  # tokens assigned to each expert so far
    keep = []
    for t, x in enumerate(x_TD):
        probs = (moe.router.weight @ x).softmax(dim=0)
        gates, experts = probs.topk(moe.top_k)
        if moe.top_k > 1:  # one expert keeps its probability as its gate (Switch Transformer)
            gates = gates / gates.sum()
        row = []
        for g, e in zip(gates, experts.tolist(), strict=True):
            kept = queue[e] < capacity
            queue[e] += 1
            row.append(kept)
            if kept:
                h = F.gelu(x @ moe.w1[e] + moe.b1[e])
                y_TD[t] += g * (h @ moe.w2[e] + moe.b2[e])
        keep.append(row)
    return y_TD, torch.tensor(keep), torch.tensor(queue, dtype=torch.float)


@pytest.mark.parametrize("overrides", [{"drop_tokens": False}, {"capacity_factor": 4.0},
                                       {"drop_tokens": False, "top_k": 1}])
def test_matches_reference_when_nothing_is_dropped(overrides):
    moe = make_moe(**overrides)
    x = torch.randn(3, 8, D)
    y, stats = moe(x)
    assert moe.capacity(24) == 24
    ref, keep, _ = reference(moe, x.view(-1, D), capacity=24)
    torch.testing.assert_close(y.view(-1, D), ref)
    assert keep.all() and float(stats["dropped_frac"]) == 0.0


def test_small_capacity_drops_exactly_the_late_assignments():
    moe = make_moe(capacity_factor=0.5)
    x = torch.randn(2, 12, D)
    T = 24
    C = moe.capacity(T)
    assert C == math.ceil(0.5 * T * K / E) == 6
    y, stats = moe(x)
    ref, keep_ref, load_ref = reference(moe, x.view(-1, D), capacity=C)
    r = moe.route(x.view(-1, D))
    assert torch.equal(r.keep_TK, keep_ref)
    assert 0 < int((~keep_ref).sum()) < T * K  # the test really drops something
    torch.testing.assert_close(y.view(-1, D), ref)
    all_dropped = ~keep_ref.any(dim=1)
    assert all_dropped.any() and float(y.detach().view(-1, D)[all_dropped].abs().max()) == 0.0
    torch.testing.assert_close(stats["dropped_frac"], (~keep_ref).float().mean())
    torch.testing.assert_close(stats["expert_load"], load_ref / load_ref.sum())
    assert load_ref.max() > C  # an expert overflowed: its load counts its dropped assignments too


def test_gradients_match_reference_when_dropping():
    moe = make_moe(capacity_factor=0.5)
    x = torch.randn(2, 12, D, requires_grad=True)
    params = [x, *moe.parameters()]
    y, _ = moe(x)
    grads = torch.autograd.grad((y * torch.linspace(-1, 1, D)).square().sum(), params)
    ref, keep, _ = reference(moe, x.view(-1, D), capacity=moe.capacity(24))
    assert not keep.all()
    ref_grads = torch.autograd.grad((ref * torch.linspace(-1, 1, D)).square().sum(), params)
    for name, g, r in zip(["x", *(n for n, _ in moe.named_parameters())], grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, msg=lambda m, name=name: f"{name}: {m}")


def test_inference_combine_matches_training_combine():
    """Without autograd the combine is kernels.moe_combine (a matmul on the CPU): same outputs as the
    elementwise sum, drops too."""
    moe = make_moe(capacity_factor=0.5)
    x = torch.randn(2, 12, D)
    y_train, _ = moe(x)
    assert y_train.requires_grad  # the elementwise form ran
    with torch.no_grad():
        y_eval, stats = moe(x)
    ref, keep, _ = reference(moe, x.view(-1, D), capacity=moe.capacity(24))
    assert not keep.all() and float(stats["dropped_frac"]) > 0
    torch.testing.assert_close(y_eval.view(-1, D), ref)
    torch.testing.assert_close(y_eval, y_train.detach())


def test_balance_and_z_loss_follow_their_formulas():
    moe = make_moe(capacity_factor=0.75)
    x = torch.randn(2, 10, D)
    _, stats = moe(x)
    x_TD = x.view(-1, D)
    logits = x_TD @ moe.router.weight.T
    importance = logits.softmax(dim=-1).sum(dim=0)
    _, _, load = reference(moe, x_TD, capacity=moe.capacity(20))
    balance = E * (importance / importance.sum() * load / load.sum()).sum()
    z = (torch.logsumexp(logits, dim=-1) ** 2).mean()
    torch.testing.assert_close(stats["balance_loss"], balance)
    torch.testing.assert_close(stats["z_loss"], z)


def test_an_overloaded_expert_counts_its_dropped_assignments_in_the_balance_loss():
    """Switch Transformer's balance loss: E x sum over experts of (mean router probability) x (share
    of the routed assignments), counted before the capacity drops them. Counting only the kept ones
    capped an overloaded expert's share at its capacity: the loss understated the imbalance it is
    there to correct, and the expert-load plot hid the overload (the dropped share shows the drops)."""
    moe = make_moe(top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        moe.router.weight.copy_(20 * torch.eye(E, D))  # a token one-hot in dim e goes to expert e
    x_TD = torch.eye(D)[[0, 0, 0, 0, 0, 1, 2, 3]]  # 5 tokens for expert 0, one for each other
    assert moe.capacity(8) == 2
    _, stats = moe(x_TD.unsqueeze(0))
    share = torch.tensor([5.0, 1.0, 1.0, 1.0]) / 8
    probs = (x_TD @ moe.router.weight.T).softmax(dim=-1).mean(dim=0)
    torch.testing.assert_close(stats["expert_load"], share)
    torch.testing.assert_close(stats["balance_loss"], E * (probs * share).sum())
    assert stats["balance_loss"] > 1.7  # uniform routing gives 1
    torch.testing.assert_close(stats["dropped_frac"], torch.tensor(3 / 8))  # expert 0 keeps 2 of 5


def test_decoding_is_dropless():
    moe = make_moe(capacity_factor=0.25)
    x = torch.randn(1, 16, D)
    y, stats = moe(x, drop_tokens=False)
    torch.testing.assert_close(y.view(-1, D), reference(moe, x.view(-1, D), capacity=16)[0])
    assert float(stats["dropped_frac"]) == 0.0


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_gets_gradients(top_k):
    moe = make_moe(capacity_factor=0.5, top_k=top_k)
    y, _ = moe(torch.randn(2, 8, D))
    y.square().sum().backward()  # through the gates alone, without the auxiliary losses
    assert moe.router.weight.grad is not None and float(moe.router.weight.grad.abs().sum()) > 0


def sorted_routing(expert_TK: torch.Tensor, C: int):
    """The queues as an earlier moe.py built them, from stable argsorts of the assignments by expert:
    (keep_TK, slot_TK, token_EC, filled_EC)."""
    T, K = expert_TK.shape
    expert_A = expert_TK.flatten()
    order_A = torch.argsort(expert_A, stable=True)
    rank_A = torch.argsort(order_A)
    count_E = torch.bincount(expert_A, minlength=E)
    start_E = count_E.cumsum(0) - count_E
    pos_TK = (rank_A - start_E[expert_A]).view(T, K)
    keep_TK = pos_TK < C
    slot_TK = torch.where(keep_TK, expert_TK * C + pos_TK, 0)
    c_C = torch.arange(C)
    filled_EC = c_C < count_E.unsqueeze(1)
    token_EC = order_A[(start_E.unsqueeze(1) + c_C).clamp(max=T * K - 1)] // K
    return keep_TK, slot_TK, token_EC, filled_EC


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("drop_tokens", [True, False])
@pytest.mark.parametrize("skew", [0.0, 1.0, 10.0], ids=["mixed", "skewed", "two-experts-take-all"])
def test_sort_free_queues_equal_the_sorted_ones(top_k, drop_tokens, skew):
    moe = make_moe(top_k=top_k, capacity_factor=1.0)
    x_TD = torch.randn(60, D)
    with torch.no_grad():  # feature 0, set to skew in every token, favours expert 0, then 1, ...
        moe.router.weight[:, 0] = torch.linspace(1, -1, E)
        x_TD[:, 0] = skew
    r = moe.route(x_TD, drop_tokens)
    keep, slot, token, filled = sorted_routing(r.expert_TK, r.capacity)
    assert r.capacity == (60 * top_k // E if drop_tokens else 60)
    assert torch.equal(r.keep_TK, keep) and torch.equal(r.slot_TK, slot)
    assert torch.equal(r.filled_EC, filled)
    assert torch.equal(r.token_EC[filled], token[filled])
    assert int(r.token_EC.min()) >= 0 and int(r.token_EC.max()) < 60  # unfilled slots read a real token
    assert torch.equal(r.count_E, torch.bincount(r.expert_TK.flatten(), minlength=E).int())
    if drop_tokens:  # queues overflow, and some slots stay empty
        assert not keep.all() and not filled.all()
    if skew == 10.0:
        assert int(r.count_E[:top_k].sum()) == 60 * top_k


def test_training_step_compiles_as_one_graph(tiny_gpt):
    """fullgraph=True fails on any graph break: .item(), data-dependent shapes, host syncs."""
    torch._dynamo.reset()
    model = tiny_gpt(ffn="moe", n_experts=4, capacity_factor=0.5).train()
    idx = torch.randint(0, 97, (2, 16))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(idx, idx)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    eager = model(idx, idx)
    eager["loss"].backward()
    for key in ("loss", "balance_loss", "z_loss", "dropped_frac", "expert_load"):
        torch.testing.assert_close(out[key], eager[key])
    assert float(eager["dropped_frac"]) > 0
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
    assert float(model.blocks[0].ffn.router.weight.grad.abs().sum()) > 0
    with torch.no_grad():  # the inference graph (moe_combine) is one graph too
        inf = compiled(idx, idx)
        torch.testing.assert_close(inf["ce_loss"], model(idx, idx)["ce_loss"])


@pytest.mark.parametrize("A", [7, 4096, 4097, 3 * 4096, 2 * 4096 + 5])
def test_running_count_is_a_cumsum(A):
    hit_EA = torch.rand(3, A, generator=torch.Generator().manual_seed(A)) < 0.3
    got = moe_module.running_count(hit_EA)
    assert got.dtype == torch.int32 and got.is_contiguous()
    assert torch.equal(got, hit_EA.int().cumsum(dim=1, dtype=torch.int32))


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_top_k_equals_torch_topk(k):
    p_TE = torch.rand(200, 8, generator=torch.Generator().manual_seed(k), requires_grad=True)
    values, indices = moe_module.top_k(p_TE, k)
    want_values, want_indices = p_TE.topk(k, dim=-1)
    assert torch.equal(indices, want_indices) and torch.equal(values, want_values)
    g = torch.randn(200, k, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad((values * g).sum(), p_TE)
    (want_grad,) = torch.autograd.grad((want_values * g).sum(), p_TE)
    assert torch.equal(grad, want_grad)


def test_top_k_breaks_ties_towards_the_lower_expert():
    _, indices = moe_module.top_k(torch.tensor([[0.25, 0.5, 0.25, 0.0]]), 2)
    assert indices.tolist() == [[1, 0]]


def test_masked_gather_backward_equals_the_scatter_add_of_plain_indexing():
    """Both MoE gathers, built from real routing: their gather-only backward against autograd's own
    backward of the same indexing (a scatter-add), in float64."""
    moe = make_moe(capacity_factor=0.5)
    x_TD = torch.randn(40, D, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        r = moe.route(x_TD.float())
    assert not bool(r.keep_TK.all())  # some assignments dropped, some slots empty
    C = r.capacity
    g_ECD = torch.randn(E * C, D, dtype=torch.float64)
    got = moe_module.MaskedGather.apply(x_TD, r.token_EC.flatten(), r.filled_EC.flatten(), r.slot_TK, r.keep_TK)
    want = torch.where(r.filled_EC.flatten().unsqueeze(-1), x_TD[r.token_EC.flatten()], 0.0)
    assert torch.equal(got, want)
    (grad,) = torch.autograd.grad((got * g_ECD).sum(), x_TD)
    (want_grad,) = torch.autograd.grad((want * g_ECD).sum(), x_TD)
    torch.testing.assert_close(grad, want_grad)

    y_SD = torch.randn(E * C, D, dtype=torch.float64, requires_grad=True)
    g_AD = torch.randn(r.keep_TK.numel(), D, dtype=torch.float64)
    got = moe_module.MaskedGather.apply(y_SD, r.slot_TK.flatten(), r.keep_TK.flatten(), r.assign_EC.view(-1, 1),
                                        r.filled_EC.view(-1, 1))
    want = torch.where(r.keep_TK.flatten().unsqueeze(-1), y_SD[r.slot_TK.flatten()], 0.0)
    assert torch.equal(got, want)
    (grad,) = torch.autograd.grad((got * g_AD).sum(), y_SD)
    (want_grad,) = torch.autograd.grad((want * g_AD).sum(), y_SD)
    torch.testing.assert_close(grad, want_grad)


@pytest.mark.parametrize("factor, n_tokens, capacity", [(1.1, 50, 11), (0.7, 100, 14), (1.25, 8192, 2048), (1.3, 49, 13)])
def test_capacity_is_the_ceiling_of_the_factor_as_written(factor, n_tokens, capacity):
    """capacity_factor x tokens x top_k / experts in float arithmetic can land just above a whole number
    (1.1 x 50 x 2 / 10 = 11.000000000000002): the ceiling then gave each expert a slot the documented
    formula does not."""
    moe = make_moe(capacity_factor=factor, n_experts=10, top_k=2)
    assert moe.capacity(n_tokens) == capacity
