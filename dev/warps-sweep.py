"""Warp counts of tinylm.kernels' attention backward and loss kernels at the batch-512 shapes (CUDA only).

    PYTHONPATH=lib python3 dev/warps-sweep.py

Attention backward, 512 rows of 128 positions: the baseline's 4 heads of 64 and condor's 2 heads of
128, at 4 and 8 warps (the configured count is marked), with the relative error of dqkv against fp32
attention; the configured launch is checked against the op. Loss kernel, 65,536 x 8,192 bf16
logits, with the gradient (into its own buffer) and loss only, at 4, 8 and 16 warps. A 1 GiB -> 1 GiB
copy is printed for scale (the loss kernel with the gradient moves the same bytes). H100 figures are
in docs/performance.md.
"""

import math

import torch
from triton.testing import do_bench

from tinylm import kernels as K

torch.manual_seed(0)


def ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def attention(B: int, H: int, T: int, DH: int) -> None:
    D = H * DH
    qkv = (1.5 * torch.randn(B, T, 3 * D, device="cuda")).to(torch.bfloat16)
    do = torch.randn(B, T, D, device="cuda").to(torch.bfloat16)
    _, lse = K._attn_fwd(qkv, None, H)
    want, _ = K._attn_bwd(do, qkv, lse, H)
    q32 = qkv.float().requires_grad_(True)
    (exact,) = torch.autograd.grad(K.reference_attention(q32, H), q32, do.float())
    dqkv, part = torch.empty_like(qkv), torch.empty(B, 3 * D, device="cuda")
    for nw in (4, 8):
        def bwd(nw=nw):
            K._attn_bwd_kernel[(B * H,)](qkv, do, lse, dqkv, part, QK_SCALE=math.log2(math.e) / math.sqrt(DH),
                                         SM_SCALE=1 / math.sqrt(DH), T=T, H=H, DH=DH, BLOCK_T=T, num_warps=nw)
        bwd()
        configured = nw == K._bwd_warps(DH)
        ok = "" if not configured or torch.equal(dqkv, want) else "  DIFFERS FROM THE OP"
        err = ((dqkv.float() - exact).norm() / exact.norm()).item()
        mark = " (configured)" if configured else ""
        print(f"attention backward {H} heads of {DH}, warps {nw}: {ms(bwd):.4f} ms, dqkv vs fp32 {err:.2e}{mark}{ok}")

for shape in ((512, 4, 128, 64), (512, 2, 128, 128)):
    attention(*shape)

N, V = 65536, 8192
logits = (2 * torch.randn(N, V, device="cuda")).to(torch.bfloat16)
targets = torch.randint(0, V, (N,), device="cuda")
targets[::97] = K.IGNORE
grads, loss = torch.empty_like(logits), torch.empty(N, device="cuda")
for grad in (True, False):
    for nw in (4, 8, 16):
        def ce(nw=nw, grad=grad):
            K._ce_kernel[(N,)](logits, targets, loss, grads, V=V, BLOCK_V=V, WRITE_GRAD=grad, IGNORE_INDEX=K.IGNORE,
                               num_warps=nw)
        mark = " (configured)" if nw == K._ce_warps(V) else ""
        print(f"loss kernel {'with gradient' if grad else 'loss only    '}, warps {nw:2d}: {ms(ce):.4f} ms{mark}")
print(f"copy 1 GiB -> 1 GiB: {ms(lambda: grads.copy_(logits)):.4f} ms")
