"""Tile sweep of tinylm.kernels' residual add + LayerNorm kernels at the baseline's batch-512 shape
(65,536 x 256; CUDA only).

    PYTHONPATH=lib python3 dev/norm-sweep.py

Prints, fastest first, the forward kernel's time per (rows per program, warps) and the backward's
per (rows per program, rows per step, warps, pipeline stages), next to the partial-sum reduction that
follows it (called eagerly here; inside the compiled step the compiler generates its own);
each checked against the op as configured, whose time, called eagerly, also prints (allocations and
launch overhead included: H100 0.088 and 0.212 ms, against 0.073 and 0.142 ms for the kernels, when the
backward's three sums had three reductions; with the one reduction of now, another session printed
0.184 and 0.123 ms: the eager forward's figure is host-bound and moves between runs). A
same-sized fp32 copy is printed for scale: the forward moves 192 MB, the backward 256 MB.
"""

import itertools

import torch
import triton
from triton.testing import do_bench

from tinylm import kernels as K

N, D = 65536, 256
torch.manual_seed(0)
x = torch.randn(N, D, device="cuda")
r = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
w, b = 1 + 0.1 * torch.randn(D, device="cuda"), 0.1 * torch.randn(D, device="cuda")
gx, gy = torch.randn(N, D, device="cuda"), torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
want_xs, want_y, mean, rstd = K._add_norm_fwd(x, r, b, w, b, 1e-5, torch.bfloat16, True)
want = K._add_norm_bwd(gx, gy, want_xs, w, mean, rstd, torch.bfloat16)
xs, y, g, g_low = torch.empty_like(x), torch.empty_like(r), torch.empty_like(x), torch.empty_like(r)
m2, s2 = torch.empty_like(mean), torch.empty_like(rstd)

print(f"copy {N} x {D} fp32 (read + write 128 MB): {do_bench(lambda: g.copy_(gx), return_mode='median'):.4f} ms")
print(f"as configured: forward {K._NORM_FWD_TILES} "
      f"{do_bench(lambda: K._add_norm_fwd(x, r, b, w, b, 1e-5, torch.bfloat16, True), return_mode='median'):.4f} ms, "
      f"backward {K._NORM_BWD_TILES} "
      f"{do_bench(lambda: K._add_norm_bwd(gx, gy, want_xs, w, mean, rstd, torch.bfloat16), return_mode='median'):.4f} ms")
rows = []
for bn, nw in itertools.product((4, 8, 16, 32, 64), (2, 4, 8)):
    def fwd(bn=bn, nw=nw):
        K._add_norm_fwd_kernel[(triton.cdiv(N, bn),)](x, r, b, w, b, xs, y, m2, s2, N, D=D, EPS=1e-5, BLOCK_N=bn,
                                                       BLOCK_D=D, num_warps=nw)
    fwd()
    ok = torch.equal(xs, want_xs) and torch.equal(y, want_y)
    rows.append((do_bench(fwd, return_mode="median"), f"forward  rows {bn:3d}          warps {nw}", ok))
for ms, what, ok in sorted(rows)[:6]:
    print(f"{what}: {ms:.4f} ms{'' if ok else '  WRONG'}")
rows = []
for per_prog, bn, nw, st in itertools.product((32, 64, 128, 256), (8, 16), (2, 4), (1, 2, 3)):
    n = triton.cdiv(N, per_prog)
    part = torch.empty(n, 3 * D, device="cuda")

    def bwd(per_prog=per_prog, bn=bn, nw=nw, st=st, n=n, part=part):
        K._add_norm_bwd_kernel[(n,)](gx, gy, want_xs, w, mean, rstd, g, g_low, part, N, D=D, HAS_GX=True,
                                     WRITE_LOW=True, ROWS=per_prog, BLOCK_N=bn, BLOCK_D=D, STAGES=st, num_warps=nw)

    g.fill_(float("nan"))
    bwd()
    ok = torch.equal(g, want[0]) and torch.equal(g_low, want[1]) and torch.allclose(part.sum(0), want[2], rtol=1e-4,
                                                                                  atol=1e-2)
    rows.append((do_bench(bwd, return_mode="median"), do_bench(lambda part=part: part.sum(0), return_mode="median"),
                 f"backward rows {per_prog:3d} step {bn:2d} warps {nw} stages {st}", ok))
for ms, ms_sum, what, ok in sorted(rows)[:8]:
    print(f"{what}: {ms:.4f} ms (+ {ms_sum:.4f} for the partial sums){'' if ok else '  WRONG'}")
