"""Tile sweep of tinylm.kernels._gelu_bwd_kernel at the baseline's batch-512 shape (CUDA only).

    PYTHONPATH=lib python3 dev/gelu-bwd-sweep.py

Prints, fastest first, the kernel's time per (rows per program, rows per step, columns, warps,
pipeline stages), each checked against the op as configured, next to a same-sized copy and the plain
GELU backward + bias sum that torch.compile generates, which the kernel replaces.
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
for per, br, bc, nw, st in itertools.product((64, 128, 256), (32, 64), (64, 128), (4, 8), (1, 2, 3)):
    if br > per:
        continue
    part = torch.empty(triton.cdiv(N, per), F, device="cuda")

    def run(per=per, br=br, bc=bc, nw=nw, st=st, part=part):
        K._gelu_bwd_kernel[(triton.cdiv(F, bc), triton.cdiv(N, per))](
            da, h, dh, part, N, F=F, ROWS=per, BLOCK_R=br, BLOCK_C=bc, STAGES=st, num_warps=nw)

    dh.fill_(float("nan"))
    run()
    ok = torch.equal(dh, want_dh) and torch.allclose(part.sum(0), want_db, rtol=1e-4, atol=1e-2)
    rows.append((do_bench(run, return_mode="median"), per, br, bc, nw, st, ok))
for ms, per, br, bc, nw, st, ok in sorted(rows)[:10]:
    print(f"rows {per:3d} step {br:3d} columns {bc:3d} warps {nw} stages {st}: {ms:.4f} ms{'' if ok else '  WRONG'}")
