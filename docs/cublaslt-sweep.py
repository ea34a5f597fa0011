"""Every matrix product of baseline's batch-512 training step (65,536 rows), timed as torch issues it
(mm / addmm, same operand layouts) and with each algorithm cuBLASLt's heuristic offers for it, called
through ctypes (CUDA only; no build step).

    PYTHONPATH=lib python3 docs/cublaslt-sweep.py [--json OUT.json]

Answers "would picking cuBLAS algorithms ourselves pay?": per product, torch's time, the time of
the heuristic's first algorithm and of the fastest one (each checked against torch's result), and
per step, weighted by how often the step calls it, the sum of torch's times, what the bias
epilogues cost, and the sum when every product takes the faster of torch and the best algorithm.
H100 (2026-11-25, 8 algorithms offered per product): torch 5.82 ms per step in isolation (the bias
epilogues 0.064 ms of it), the heuristic's first picks 5.82, the faster of each 5.60 ms: 0.064 from
dropping the bias epilogues, 0.083 from the (256 x 1024) weight gradient (0.088 ms as dy^T @ x, 0.075
with algorithm #1 or as (x^T @ dy)^T, which kernels.residual_norm._LinearTallGrad now computes) and 0.08 spread
over the other products.
"""
import argparse
import ctypes
import glob
import json
import os
import re
import sys

import torch
from triton.testing import do_bench

ap = argparse.ArgumentParser()
ap.add_argument("--json", default=None)
args = ap.parse_args()
torch.manual_seed(0)
dev = "cuda"
torch.mm(torch.randn(64, 64, device=dev, dtype=torch.bfloat16), torch.randn(64, 64, device=dev, dtype=torch.bfloat16))
libpath = None
for line in open("/proc/self/maps"):
    if "libcublasLt" in line:
        libpath = line.split()[-1]
        break
print("cublasLt:", libpath)
lt = ctypes.CDLL(libpath)

# enum values, checked against the headers where found
VALS = dict(CUBLAS_COMPUTE_32F=68, CUDA_R_32F=0, CUDA_R_16BF=14, CUBLASLT_MATMUL_DESC_TRANSA=3,
            CUBLASLT_MATMUL_DESC_TRANSB=4, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES=1)
hdrs = [h for pat in ("/usr/local/cuda*/include/*.h", os.path.dirname(libpath) + "/../include/*.h",
                      sys.prefix + "/lib/python3*/site-packages/nvidia/*/include/*.h",
                      sys.prefix + "/lib/python3*/site-packages/nvidia/*/*/include/*.h") for h in glob.glob(pat)]
txt = "".join(open(h, errors="ignore").read() for h in hdrs if os.path.basename(h) in
              ("cublasLt.h", "cublas_api.h", "library_types.h"))
for k, v in VALS.items():
    m = re.search(rf"\b{k}\s*=\s*(\d+)", txt)
    print(f"{k}: assumed {v}, header {m.group(1) if m else '?'}")
    if m and int(m.group(1)) != v:
        VALS[k] = int(m.group(1))

vp = ctypes.c_void_p
handle = vp()
assert lt.cublasLtCreate(ctypes.byref(handle)) == 0
WS = 32 * 1024 * 1024
workspace = torch.empty(WS, dtype=torch.uint8, device=dev)


class Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class Heur(ctypes.Structure):
    _fields_ = [("algo", Algo), ("workspaceSize", ctypes.c_size_t), ("state", ctypes.c_int),
                ("wavesCount", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


assert ctypes.sizeof(Heur) == 96


def setattr_(fn, obj, attr, val):
    v = ctypes.c_int32(val)
    assert fn(obj, attr, ctypes.byref(v), ctypes.sizeof(v)) == 0


def lt_plan(a, b, c):
    """c (M,N row-major contiguous) = a (M,K) @ b (K,N); a, b row-major views (contiguous or transposed).
    Column-major: c^T (N x M) = op(b) @ op(a)."""
    M, K = a.shape
    N = b.shape[1]

    def layout(t, rows_cm, cols_cm):  # returns (op, Layout)
        lay = vp()
        if t.stride(1) == 1:   # row-major (r, c) contiguous = col-major (c, r), ld = stride(0)
            op, r, cc, ld = 0, rows_cm, cols_cm, t.stride(0)
        else:                  # transposed view: storage is col-major (r, c) with ld = stride(1)
            assert t.stride(0) == 1
            op, r, cc, ld = 1, cols_cm, rows_cm, t.stride(1)
        assert lt.cublasLtMatrixLayoutCreate(ctypes.byref(lay), VALS["CUDA_R_16BF"], ctypes.c_uint64(r),
                                             ctypes.c_uint64(cc), ctypes.c_int64(ld)) == 0
        return op, lay

    opA, layA = layout(b, N, K)   # op(A) is N x K
    opB, layB = layout(a, K, M)   # op(B) is K x M
    layC = vp()
    assert lt.cublasLtMatrixLayoutCreate(ctypes.byref(layC), VALS["CUDA_R_16BF"], ctypes.c_uint64(N),
                                         ctypes.c_uint64(M), ctypes.c_int64(N)) == 0
    desc = vp()
    assert lt.cublasLtMatmulDescCreate(ctypes.byref(desc), VALS["CUBLAS_COMPUTE_32F"], VALS["CUDA_R_32F"]) == 0
    setattr_(lt.cublasLtMatmulDescSetAttribute, desc, VALS["CUBLASLT_MATMUL_DESC_TRANSA"], opA)
    setattr_(lt.cublasLtMatmulDescSetAttribute, desc, VALS["CUBLASLT_MATMUL_DESC_TRANSB"], opB)
    pref = vp()
    assert lt.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)) == 0
    ws = ctypes.c_uint64(WS)
    assert lt.cublasLtMatmulPreferenceSetAttribute(pref, VALS["CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES"],
                                                   ctypes.byref(ws), 8) == 0
    n_req = 48
    res = (Heur * n_req)()
    got = ctypes.c_int(0)
    st = lt.cublasLtMatmulAlgoGetHeuristic(handle, desc, layA, layB, layC, layC, pref, n_req, res, ctypes.byref(got))
    assert st == 0, st
    alpha, beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
    runs = []
    for i in range(got.value):
        if res[i].state != 0:
            continue
        algo = res[i].algo

        def run(algo=algo):
            s = lt.cublasLtMatmul(handle, desc, ctypes.byref(alpha), vp(b.data_ptr()), layA, vp(a.data_ptr()), layB,
                                  ctypes.byref(beta), vp(c.data_ptr()), layC, vp(c.data_ptr()), layC,
                                  ctypes.byref(algo), vp(workspace.data_ptr()), ctypes.c_size_t(WS),
                                  vp(torch.cuda.current_stream().cuda_stream))
            if s != 0:
                raise RuntimeError(f"cublasLtMatmul status {s}")
        runs.append((i, run))
    return runs


Nt = 65536
D, F, V = 256, 1024, 8192
def R(*s):
    return torch.randn(*s, device=dev, dtype=torch.bfloat16)


def W(o, i):
    return R(o, i) * (1 / i ** 0.5)


# (name, calls per step (0: an alternative layout, not in the sums), a, b, bias size or None)
cases = [
    ("lm fwd x@W^T", 1, lambda: R(Nt, D), lambda: W(V, D).t(), None),
    ("lm dX g@W", 1, lambda: R(Nt, V) * 1e-3, lambda: W(V, D), None),
    ("lm dW g^T@x", 1, lambda: (R(Nt, V) * 1e-3).t(), lambda: R(Nt, D), None),
    ("fc2 dW dY^T@G", 6, lambda: R(Nt, D).t(), lambda: R(Nt, F), None),
    ("fc2 dW^T G^T@dY", 0, lambda: R(Nt, F).t(), lambda: R(Nt, D), None),
    ("fc2 fwd G@W^T", 6, lambda: R(Nt, F), lambda: W(D, F).t(), D),
    ("fc1 fwd y@W^T", 6, lambda: R(Nt, D), lambda: W(F, D).t(), F),
    ("fc2 dX dY@W", 6, lambda: R(Nt, D), lambda: W(D, F), None),
    ("fc1 dW dH^T@y", 6, lambda: R(Nt, F).t(), lambda: R(Nt, D), None),
    ("fc1 dX dH@W", 6, lambda: R(Nt, F), lambda: W(F, D), None),
    ("qkv dW dQKV^T@y", 6, lambda: R(Nt, 3 * D).t(), lambda: R(Nt, D), None),
    ("qkv fwd y@W^T", 6, lambda: R(Nt, D), lambda: W(3 * D, D).t(), 3 * D),
    ("qkv dX dQKV@W", 6, lambda: R(Nt, 3 * D), lambda: W(3 * D, D), None),
    ("proj dW dY^T@o", 6, lambda: R(Nt, D).t(), lambda: R(Nt, D), None),
    ("proj fwd o@W^T", 6, lambda: R(Nt, D), lambda: W(D, D).t(), D),
    ("proj dX dY@W", 6, lambda: R(Nt, D), lambda: W(D, D), None),
]
out = []
tot_torch = tot_best = tot_first = tot_addmm = 0.0
for name, calls, ma, mb, bias in cases:
    a, b = ma(), mb()
    c = torch.empty(a.shape[0], b.shape[1], device=dev, dtype=torch.bfloat16)
    ref = torch.mm(a, b)
    t_mm = do_bench(lambda a=a, b=b, c=c: torch.mm(a, b, out=c), return_mode="median")
    t_addmm = None
    if bias:
        bb = R(bias)
        t_addmm = do_bench(lambda a=a, b=b, c=c, bb=bb: torch.addmm(bb, a, b, out=c), return_mode="median")
    runs = lt_plan(a, b, c)
    times = []
    for i, run in runs:
        try:
            c.fill_(float("nan"))
            run()
            torch.cuda.synchronize()
            err = ((c.float() - ref.float()).norm() / ref.float().norm()).item()
            if not err < 1e-2:
                times.append((float("inf"), i, f"err {err:.2e}"))
                continue
            times.append((do_bench(run, return_mode="median"), i, ""))
        except RuntimeError as e:
            times.append((float("inf"), i, str(e)))
    ok = [t for t in times if t[0] < float("inf")]
    first = next((t for t in times if t[1] == 0), (float("nan"),))[0]
    best = min(ok) if ok else (float("nan"), -1, "")
    row = dict(name=name, calls=calls, torch_mm=t_mm, torch_addmm=t_addmm, lt_first=first, lt_best=best[0],
               lt_best_idx=best[1], n_algos=len(runs), n_ok=len(ok), all=sorted(times)[:8])
    out.append(row)
    tot_torch += calls * (t_addmm or t_mm)
    tot_addmm += calls * ((t_addmm - t_mm) if t_addmm else 0.0)
    tot_best += calls * min(best[0], t_mm)
    tot_first += calls * first
    print(f"{name:18s} x{calls}  torch mm {t_mm*1e3:7.1f} us" + (f"  addmm {t_addmm*1e3:7.1f}" if t_addmm else " " * 15)
          + f"  Lt first {first*1e3:7.1f}  Lt best {best[0]*1e3:7.1f} (#{best[1]} of {len(ok)}/{len(runs)})", flush=True)
print(f"per step: torch {tot_torch:.3f} ms (bias epilogues {tot_addmm:.3f} of it), Lt first {tot_first:.3f}, "
      f"the faster of torch mm (no bias) and Lt's best {tot_best:.3f}")
if args.json:
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1, default=str)
