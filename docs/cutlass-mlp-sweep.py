"""Would GELU fused into the MLP's matrix products pay? CUTLASS 3 (Hopper) GEMMs whose epilogues do the
GELU work (docs/cutlass-mlp-sweep.cu), against what tinylm runs: cuBLAS addmm + the compiled GELU
forward, and cuBLAS dy @ W2 + the Triton GELU backward kernel (with its bias-gradient sums).

    PYTHONPATH=lib python3 docs/cutlass-mlp-sweep.py [--cutlass DIR] [--variants 0 1 ...] [--json OUT]

Needs an sm_90 GPU, nvcc (CUDA_HOME/bin or PATH) and CUTLASS's headers: DIR/include and
DIR/tools/util/include, by default from the `nvidia-cutlass` package (`pip install nvidia-cutlass`,
headers under cutlass_library/source). Each variant is built once into a shared library (about a
minute each, in parallel) and called through ctypes; every result is checked against the unfused path.

H100, CUTLASS 4.2.0, nvcc 13.0 (2026-11-25), baseline's batch-512 shape (65,536 x 256 -> 1,024), two
runs: unfused forward 0.074 (addmm) + 0.105 (GELU) = 0.179 ms, backward 0.071 + 0.170 = 0.241 ms.
Best fused: forward 0.166-0.173 ms (128 x 256 tiles, cooperative; 0.161-0.168 without the aux store),
backward 0.302 ms (same tiles; 0.334 with the sums' reduction); pingpong schedules 0.25-0.26 forward
and 0.40-0.93 backward. At batch 64 (8,192 rows): forward 0.029 against 0.033, backward 0.048 against
0.049. The erf epilogue is arithmetic-heavy (erff and the rest, an estimated 30 instructions for each
of 67M elements) and runs between tiles rather than under the memory traffic; the backward's aux load (h, read from
global memory into registers) is slower still. At most 0.013 ms saved per layer forward, none
backward, for a CUDA build step: not adopted (docs/performance.md).
"""
import argparse
import concurrent.futures
import ctypes
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from tinylm.kernels import gelu as K

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = {0: "128x128 coop", 1: "64x128 pingpong", 2: "128x128 pingpong", 3: "128x256 coop",
         4: "64x256 pingpong", 5: "256x128 coop", 6: "128x256 coop, 2x1 cluster"}


def cutlass_dir(arg):
    if arg:
        return arg
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("CUTLASS headers not found: pip install nvidia-cutlass, or pass --cutlass DIR (a CUTLASS checkout)")
    return os.path.join(spec.submodule_search_locations[0], "source")


def nvcc_path():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for cand in ([os.path.join(home, "bin", "nvcc")] if home else []) + [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]:
        if cand and os.path.exists(cand):
            return cand
    sys.exit("nvcc not found: set CUDA_HOME or put nvcc on PATH")


def build(variant, cdir, nvcc, out_dir):
    so = os.path.join(out_dir, f"mlp{variant}.so")
    cmd = [nvcc, "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr",
           "-Xcompiler", "-fPIC", "-shared", "-DNDEBUG", f"-DVARIANT={variant}", f"-I{cdir}/include",
           f"-I{cdir}/tools/util/include", "-o", so, os.path.join(HERE, "cutlass-mlp-sweep.cu")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return variant, None, r.stderr[-2000:]
    return variant, so, ""


def bench(f):
    return do_bench(f, warmup=50, rep=300, return_mode="median")


def make_case(M, D=256, Fd=1024):
    """Baseline's MLP at M rows: inputs, and the unfused path's results (what the fused ones must match)."""
    dev = "cuda"
    c = dict(M=M, D=D, Fd=Fd, x=torch.randn(M, D, device=dev).bfloat16(),
             w1=(0.05 * torch.randn(Fd, D, device=dev)).bfloat16(), b1=(0.1 * torch.randn(Fd, device=dev)).bfloat16(),
             w2=(0.05 * torch.randn(D, Fd, device=dev)).bfloat16(), dy=torch.randn(M, D, device=dev).bfloat16())
    c["h"] = torch.addmm(c["b1"], c["x"], c["w1"].t())
    c["g"] = F.gelu(c["h"].float()).bfloat16()
    c["da"] = c["dy"] @ c["w2"]
    c["dh"], c["db"] = K._gelu_bwd(c["da"], c["h"])
    return c


def measure_unfused(c, gelu):
    t = dict(addmm=bench(lambda: torch.addmm(c["b1"], c["x"], c["w1"].t())), gelu=bench(lambda: gelu(c["h"])),
             mm=bench(lambda: c["dy"] @ c["w2"]), gelu_bwd=bench(lambda: K._gelu_bwd(c["da"], c["h"])))
    row = dict(rows=c["M"], variant="unfused", fwd_ms=t["addmm"] + t["gelu"], bwd_ms=t["mm"] + t["gelu_bwd"], **t)
    print(f"rows {c['M']:6d} unfused: forward {t['addmm']:.4f} + {t['gelu']:.4f} = {row['fwd_ms']:.4f} ms | "
          f"backward {t['mm']:.4f} + {t['gelu_bwd']:.4f} = {row['bwd_ms']:.4f} ms")
    return row


def measure_variant(c, v, lib):
    M, D, Fd, dev = c["M"], c["D"], c["Fd"], "cuda"
    lib.tinylm_fc_gelu_fwd_workspace.restype = ctypes.c_size_t
    lib.tinylm_fc_dgelu_bwd_workspace.restype = ctypes.c_size_t
    tm, tn = lib.tinylm_tile_m(), lib.tinylm_tile_n()
    ws_f = torch.empty(max(1, lib.tinylm_fc_gelu_fwd_workspace(M, Fd, D)), dtype=torch.uint8, device=dev)
    ws_b = torch.empty(max(1, lib.tinylm_fc_dgelu_bwd_workspace(M, Fd, D)), dtype=torch.uint8, device=dev)
    h, g, dh = (torch.empty(M, Fd, device=dev, dtype=torch.bfloat16) for _ in range(3))
    part = torch.zeros(triton.cdiv(M, tm), triton.cdiv(Fd, tn) * tn, device=dev)

    def ptr(a):
        return ctypes.c_void_p(a.data_ptr() if a is not None else 0)

    def stream():
        return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)

    def fwd(aux=h):
        rc = lib.tinylm_fc_gelu_fwd(ptr(c["x"]), ptr(c["w1"]), ptr(c["b1"]), ptr(aux), ptr(g), M, Fd, D, ptr(ws_f),
                                    ctypes.c_size_t(ws_f.numel()), stream())
        assert rc == 0, f"forward: status {rc}"

    def bwd():
        rc = lib.tinylm_fc_dgelu_bwd(ptr(c["dy"]), ptr(c["w2"]), ptr(c["h"]), ptr(dh), ptr(part), M, Fd, D, ptr(ws_b),
                                     ctypes.c_size_t(ws_b.numel()), stream())
        assert rc == 0, f"backward: status {rc}"

    fwd()
    bwd()
    torch.cuda.synchronize()
    err = dict(h=(h.float() - c["h"].float()).abs().max().item(),
               g_differ=(g != c["g"]).float().mean().item(),
               dh_differ=(dh != c["dh"]).float().mean().item(),
               dh_rel=((dh.float() - c["dh"].float()).abs().max() / c["dh"].float().abs().max()).item(),
               db_rel=((part.sum(0)[:Fd] - c["db"]).abs().max() / c["db"].abs().max()).item())
    assert err["h"] == 0 and err["g_differ"] < 1e-4 and err["dh_differ"] < 1e-4 and err["db_rel"] < 1e-4, err
    row = dict(rows=M, variant=v, name=NAMES.get(v, str(v)), fwd_ms=bench(fwd), fwd_no_aux_ms=bench(lambda: fwd(None)),
               bwd_ms=bench(bwd), bwd_with_sum_ms=bench(lambda: (bwd(), part.sum(0))), **err)
    print(f"rows {M:6d} variant {v} ({row['name']}): forward {row['fwd_ms']:.4f} ms (no aux {row['fwd_no_aux_ms']:.4f}) | "
          f"backward {row['bwd_ms']:.4f} ms (with the sums' reduction {row['bwd_with_sum_ms']:.4f}) | "
          f"elements that differ: g {err['g_differ']:.1e}, dh {err['dh_differ']:.1e}")
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cutlass", default=None, help="CUTLASS source dir (with include/ and tools/util/include/)")
    ap.add_argument("--variants", type=int, nargs="*", default=sorted(NAMES))
    ap.add_argument("--rows", type=int, nargs="*", default=[65536, 8192])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        sys.exit("needs an sm_90 (Hopper) GPU")
    cdir, nvcc = cutlass_dir(args.cutlass), nvcc_path()
    tmp = tempfile.mkdtemp(prefix="tinylm-cutlass-")
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(args.variants)) as pool:
        built = {v: (so, err) for v, so, err in pool.map(lambda v: build(v, cdir, nvcc, tmp), args.variants)}
    for v, (so, err) in built.items():
        if so is None:
            print(f"variant {v} did not build:\n{err}")

    results = []
    torch.manual_seed(0)
    gelu = torch.compile(lambda t: F.gelu(t))
    for rows in args.rows:
        case = make_case(rows)
        results.append(measure_unfused(case, gelu))
        for v, (so, _) in sorted(built.items()):
            if so is not None:
                results.append(measure_variant(case, v, ctypes.CDLL(so)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), results=results), f, indent=1)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
