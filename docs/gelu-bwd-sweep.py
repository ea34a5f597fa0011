"""Tile sweep of tinylm.kernels._gelu_bwd_kernel at the baseline's batch-512 shape (CUDA only).

    PYTHONPATH=lib python3 docs/gelu-bwd-sweep.py

Prints, fastest first, the kernel's time per tile shape and warp count (each checked against the op
as configured), next to a same-sized copy and the plain GELU backward + bias sum that torch.compile
generates, which the kernel replaces.
"""

import itertools

import torch
import triton
from triton.testing import do_bench

from tinylm import kernels as K

N, F = 65536, 1024
torch.manual_seed(0)
h = torch.randn(N, F, device="cuda", dtype=torch.bfloat16)
da = torch.randn(N, F, device="cuda", dtype=torch.bfloat16)
dh = torch.empty_like(h)
want_dh, want_db = K._gelu_bwd(da, h)


def plain(da, h):
    x = h.float()
    dh = (da.float() * torch.ops.aten.gelu_backward(torch.ones_like(x), x)).to(h.dtype)
    return dh, dh.float().sum(0)


print(f"copy {N} x {F} bf16 (read + write 268 MB): {do_bench(lambda: dh.copy_(h), return_mode='median'):.4f} ms")
compiled = torch.compile(plain)
print(f"compiled plain GELU backward + bias sum: {do_bench(lambda: compiled(da, h), return_mode='median'):.4f} ms")
print(f"tinylm.kernels._gelu_bwd as configured: {do_bench(lambda: K._gelu_bwd(da, h), return_mode='median'):.4f} ms")
rows = []
for br, bc, nw in itertools.product((16, 32, 64, 128), (32, 64, 128, 256), (4, 8)):
    part = torch.empty(triton.cdiv(N, br), F, device="cuda")

    def run(br=br, bc=bc, nw=nw, part=part):
        K._gelu_bwd_kernel[(triton.cdiv(F, bc), triton.cdiv(N, br))](
            da, h, dh, part, N, F=F, BLOCK_R=br, BLOCK_C=bc, num_warps=nw)

    run()
    ok = torch.equal(dh, want_dh) and torch.allclose(part.sum(0), want_db, rtol=1e-4, atol=1e-2)
    rows.append((do_bench(run, return_mode="median"), br, bc, nw, ok))
for ms, br, bc, nw, ok in sorted(rows)[:10]:
    print(f"BLOCK_R {br:3d} BLOCK_C {bc:3d} warps {nw}: {ms:.4f} ms{'' if ok else '  WRONG'}")
