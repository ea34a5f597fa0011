"""Where falcon's feed-forward time goes: the MoE layer and its parts against the dense MLP, one layer.

    python3 dev/moe-parts.py [--model falcon] [--batch 64 512] [--iters 50]

The layer is built from the config as the model builds it (`tinylm.moe.MoE`, `tinylm.model.MLP`) and
run on (batch x seq_len) tokens of d_model, in bf16 autocast like training. Each part is compiled,
then its forward + backward is captured in a CUDA graph and replayed (as the training step is), and
timed with CUDA events:

    dense     the dense MLP with its output projection (baseline's feed-forward)
    moe       the whole MoE layer, its balance and z losses in the loss (falcon's feed-forward)
    nolosses  the whole MoE layer without the balance and z losses and the statistics (what they cost)
    route     routing alone: router, softmax, top-k, queues and slots (`MoE.route`); the gradient
              reaches the router through the gates
    experts   the experts' two batched products + biases + GELU on filled slots (E, C, D)
    balanced  the same on T * K / E rows per expert: no capacity padding, every expert as busy as the
              others, routing free; the least any layout of the experts as batched products pays
    grouped   the same products as torch._grouped_mm over the T * K assignments laid out expert by
              expert (no capacity padding: the kept rows, and the dropped ones in the last group), with
              the group sizes of a real routing; what a grouped-product MoE would pay for its experts
    move      dispatch and combine alone (the experts replaced by the identity), on a routing
              computed beforehand

moe also holds the balance and z losses, which no part does; the sum of the parts next to moe shows
roughly what the compiler fuses across them. moe minus dense is what falcon's step pays per layer
over baseline's (times n_layers per step). Also
prints the CUDA kernels of one call of each part (profiled without the graph). `--device cpu` runs
each part once on small shapes and checks the script itself, without timing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))

from tinylm.config import GPTConfig  # noqa: E402
from tinylm.devices import allow_tf32, on_side_stream  # noqa: E402
from tinylm.model import MLP  # noqa: E402
from tinylm.moe import MaskedGather, MoE  # noqa: E402
from tinylm.step import compile_model  # noqa: E402
from tinylm.workflow import model_params  # noqa: E402


def parts(cfg: GPTConfig, device: torch.device) -> dict:
    """name -> (module holding the parameters, fn(x) -> the loss, or (loss, other outputs))."""
    moe = MoE(cfg).to(device)
    mlp = MLP(cfg).to(device)

    def dense(x):
        return mlp.out_proj(mlp(x)[0]).float().square().mean()

    def whole(x):  # the statistics are returned, as the training step keeps them
        y, stats = moe(x)
        loss = y.float().square().mean() + 0.01 * stats["balance_loss"] + 1e-3 * stats["z_loss"]
        return loss, stats["dropped_frac"], stats["expert_load"]

    def nolosses(x):  # the statistics are not returned, so the compiler drops them
        return moe(x)[0].float().square().mean()

    def route(x):  # the slots are returned: what the compiler drops is not timed
        r = moe.route(x)
        return (r.gate_TK * r.keep_TK).sum(), r.slot_TK, r.token_EC, r.filled_EC, r.assign_EC

    def experts(x_ECD):
        a = torch.bmm(x_ECD, moe.w1)
        h = F.gelu(a + moe.b1.unsqueeze(1).to(a.dtype))
        y = torch.bmm(h, moe.w2)
        return (y + moe.b2.unsqueeze(1).to(y.dtype)).float().square().mean()

    def grouped(x_AD):  # rows of expert e are offs[e - 1]:offs[e] (routed_for); the last group runs to A
        offs, expert_A = groups[x_AD.shape]
        a = torch._grouped_mm(x_AD.bfloat16(), moe.w1.bfloat16(), offs=offs)
        h = F.gelu(a + moe.b1.to(a.dtype)[expert_A])
        y = torch._grouped_mm(h, moe.w2.bfloat16(), offs=offs)
        return (y + moe.b2.to(y.dtype)[expert_A]).float().square().mean()

    groups = {}

    def groups_for(x_AD):
        A = x_AD.shape[0]
        with torch.no_grad(), torch.autocast(x_AD.device.type, dtype=torch.bfloat16):
            r = moe.route(torch.randn(A // moe.top_k, cfg.d_model, device=x_AD.device))
        offs = r.count_E.clamp(max=r.capacity).cumsum(0).to(torch.int32)
        offs[-1] = A
        sizes = torch.diff(offs, prepend=offs.new_zeros(1))
        groups[x_AD.shape] = offs, torch.repeat_interleave(torch.arange(moe.n_experts, device=x_AD.device), sizes)

    grouped.prepare = groups_for
    routed = {}

    def move(x):  # the routing of x comes from outside (routed_for), so only the moves are timed
        r = routed[x.shape]
        T, D = x.shape
        x_ECD = MaskedGather.apply(x, r.token_EC.flatten(), r.filled_EC.flatten(), r.slot_TK, r.keep_TK)
        y_TKD = MaskedGather.apply(x_ECD, r.slot_TK.flatten(), r.keep_TK.flatten(), r.assign_EC.view(-1, 1),
                                   r.filled_EC.view(-1, 1)).view(T, moe.top_k, D)
        return (y_TKD * r.gate_TK.unsqueeze(-1)).sum(dim=1).float().square().mean()

    def routed_for(x):
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16):
            routed[x.shape] = moe.route(x)

    move.prepare = routed_for
    return {"dense": (mlp, dense), "moe": (moe, whole), "nolosses": (moe, nolosses), "route": (moe, route), "experts": (moe, experts),
            "balanced": (moe, experts), "grouped": (moe, grouped), "move": (moe, move)}


def inputs(name: str, cfg: GPTConfig, moe: MoE, tokens: int, device: torch.device) -> torch.Tensor:
    if name == "experts":
        shape = (cfg.n_experts, moe.capacity(tokens), cfg.d_model)
    elif name == "balanced":
        shape = (cfg.n_experts, tokens * cfg.top_k // cfg.n_experts, cfg.d_model)
    elif name == "grouped":
        shape = (tokens * cfg.top_k, cfg.d_model)
    else:
        shape = (tokens, cfg.d_model)
    return torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True)


def kernels_per_call(step, device) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not any(s in e.name for s in ("Memcpy", "Memset")))


def time_part(fn, x, params, device, iters: int) -> tuple[float, int]:
    """ms per forward + backward, replayed from a CUDA graph; CUDA kernels of one call."""
    compiled = compile_model(fn, torch.bfloat16)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = compiled(x)
        (out[0] if isinstance(out, tuple) else out).backward()

    for _ in range(3):
        on_side_stream(step)
    n_kernels = kernels_per_call(step, device)
    graph = torch.cuda.CUDAGraph()
    on_side_stream(step)
    for t in [x, *params]:  # as the Stepper does: the captured backward writes fresh gradient buffers
        t.grad = None
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / iters, n_kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--model", default="falcon")
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    params = model_params(config, args.model)
    cfg = GPTConfig(**params)
    device = torch.device(args.device)
    seq_len = config["packing"]["seq_len"]
    allow_tf32()
    for batch in args.batch:
        tokens = batch * seq_len if device.type == "cuda" else 64
        torch.manual_seed(0)
        table = parts(cfg, device)
        moe = table["moe"][0]
        print(f"== {args.model}, batch {batch}: {tokens} tokens, d_model {cfg.d_model}, {cfg.n_experts} experts, "
              f"top {cfg.top_k}, capacity {moe.capacity(tokens)} slots each, expert width {cfg.expert_hidden}",
              flush=True)
        for name, (module, fn) in table.items():
            x = inputs(name, cfg, moe, tokens, device)
            if hasattr(fn, "prepare"):
                fn.prepare(x)
            try:
                if device.type != "cuda":
                    with torch.autocast(device.type, dtype=torch.bfloat16):
                        out = fn(x)
                    (out[0] if isinstance(out, tuple) else out).backward()
                    print(f"  {name:8s} ran (no timing off CUDA)", flush=True)
                    continue
                ms, n = time_part(fn, x, list(module.parameters()), device, args.iters)
            except Exception as e:  # one part's failure (an op the compiler or GPU lacks) leaves the others
                why = (str(e).strip().splitlines() or [""])[0][:200]
                print(f"  {name:8s} failed: {type(e).__name__}: {why}", flush=True)
                continue
            print(f"  {name:8s} {ms:7.3f} ms forward + backward  {n:4d} kernels", flush=True)


if __name__ == "__main__":
    main()
