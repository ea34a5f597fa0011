#!/usr/bin/env bash
# The GPU measurements quoted in docs/performance.md, in one go (about 10 minutes on an H100):
#   bash dev/gpu-measure.sh OUT_DIR [TRAIN_BIN VAL_BIN]
# With packed TinyStories splits (data/processed/<dataset>/<tokenizer>/{train,validation}.bin) it also runs the
# compiled-MoE inference check (dev/moe-compile-check.py), which needs trained weights on real text.
# Needs torch with CUDA, tokenizers, numpy, pyyaml, pytest; runs from the repository root.
set -uo pipefail
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONPATH="$PWD/lib${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
# 1. the fast path computes what the eager path does
python3 -m pytest -q lib/tests/test_cuda.py 2>&1 | tail -5 | tee "$out/test_cuda.txt"
# 2. step and evaluation throughput, eager (straightforward) and compiled (the training default)
python3 -m tinylm.bench --json "$out/bench.json" 2>&1 | grep -v Warning | tee "$out/bench.txt"
#    and compiled without the Triton kernels (plain attention and loss), for the before/after columns
python3 -m tinylm.bench --no-kernels --modes compiled --json "$out/bench_no_kernels.json" 2>&1 | grep -v Warning \
    | tee "$out/bench_no_kernels.txt"
#    and falcon with the MoE combine kernel off (its evaluation before kernels.moe_combine)
python3 dev/bench-plain-combine.py --models falcon --modes compiled --json "$out/bench_plain_combine.json" 2>&1 \
    | grep -v Warning | tee "$out/bench_plain_combine.txt"
#    and the training loop's periodic evaluation: plain, replayed from a CUDA graph, compiled
python3 dev/eval-in-loop.py --models baseline falcon 2>&1 | grep -v Warning | tee "$out/eval_in_loop.txt"
# 3. the default 20,000-step baseline run through train(), evaluation cadence included: on empty compile
#    caches, then again on the caches the first run filled (what a rerun or another seed starts with)
caches=$(mktemp -d)
for run in cold warm; do
    TORCHINDUCTOR_CACHE_DIR="$caches/inductor" TRITON_CACHE_DIR="$caches/triton" \
        python3 -m tinylm.bench --full-run baseline --full-run-dir "/tmp/tinylm-full-$run" \
        --json "$out/full_run_$run.json" 2>&1 | grep -E "full run|steps:|captured|error" | tee "$out/full_run_$run.txt"
done
# 4. the GELU backward kernel's tile sweep against the compiled plain backward + bias sum
python3 dev/gelu-bwd-sweep.py 2>&1 | grep -v Warning | tee "$out/gelu_bwd_sweep.txt"
#    and the residual add + LayerNorm kernels' tile sweep
python3 dev/norm-sweep.py 2>&1 | grep -v Warning | tee "$out/norm_sweep.txt"
#    and the warp counts of the attention backward and loss kernels
python3 dev/warps-sweep.py 2>&1 | grep -v Warning | tee "$out/warps_sweep.txt"
# 5. compiled MoE evaluation agrees with the plain model on weights trained on real text
if [ $# -ge 3 ]; then
    python3 dev/moe-compile-check.py --train-bin "$2" --val-bin "$3" 2>&1 | grep -v Warning | tee "$out/moe_check.txt"
fi
