#!/bin/bash
# GPU claims (tinylm.gpu_claim) on this machine's real GPUs: how long nvidia-smi and a claim take, and
# that jobs started side by side each see only the GPU they claimed, spread over the GPUs.
#
#   bash dev/gpu-claim-check.sh [JOBS]
#
# Starts JOBS (default: twice the GPUs) Python processes one second apart; each claims a GPU as rule
# train_model's script does, prints what it claimed and what CUDA then shows it, runs a matrix product
# there, and holds its claim until all have started. With one GPU a stand-in second GPU (a UUID no
# device has) is listed after it, so that the second job gets a GPU CUDA cannot find (no CUDA device
# visible, as it should). Exits 1 unless the jobs split evenly over the GPUs (counts differ by at most
# one) and every job on a real GPU saw exactly that one. Needs torch and the library (PYTHONPATH=lib).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/lib${PYTHONPATH:+:$PYTHONPATH}
unset CUDA_VISIBLE_DEVICES
nvidia-smi --query-gpu=index,name,uuid --format=csv,noheader
n=$(nvidia-smi --query-gpu=uuid --format=csv,noheader | wc -l)
t0=$(date +%s.%N); nvidia-smi --query-gpu=uuid --format=csv,noheader >/dev/null; t1=$(date +%s.%N)
echo "nvidia-smi --query-gpu=uuid: $(python3 -c "print(f'{$t1 - $t0:.3f}')") s"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export TMPDIR=$work  # the claims of this check only
if [ "$n" -lt 2 ]; then
  mkdir "$work/bin"
  real=$(command -v nvidia-smi)
  printf '#!/bin/sh\n"%s" "$@" && echo GPU-00000000-0000-0000-0000-000000000000\n' "$real" > "$work/bin/nvidia-smi"
  chmod +x "$work/bin/nvidia-smi"
  export PATH=$work/bin:$PATH
  n=2
  echo "one GPU: a stand-in second GPU is listed after it"
fi
jobs=${1:-$((2 * n))}
cat > "$work/job.py" <<'PY'
import logging, os, sys, time
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
from tinylm.gpu_claim import claim_gpu_for_job
t = time.perf_counter()
got = claim_gpu_for_job("auto")
took = time.perf_counter() - t
import torch
ok = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if ok else "no CUDA device visible"
if ok:
    x = torch.randn(2048, 2048, device="cuda")
    torch.cuda.synchronize()
print(f"job {sys.argv[1]}: claimed {got} in {took:.3f} s; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}; "
      f"CUDA shows {torch.cuda.device_count()}: {name}", flush=True)
time.sleep(float(sys.argv[2]))
PY
for j in $(seq 1 "$jobs"); do
  timeout 120 python3 "$work/job.py" "$j" $((jobs - j + 2)) | tee -a "$work/out" &
  sleep 1
done
wait
python3 - "$work/out" <<'PY'
import collections, re, sys
rows = re.findall(r"claimed (\S+) in .*; CUDA shows (\d+)", open(sys.argv[1]).read())
per_gpu = collections.Counter(gpu for gpu, _ in rows)
real_ok = all(shows == "1" for gpu, shows in rows if not gpu.startswith("GPU-00000000-"))
even = max(per_gpu.values()) - min(per_gpu.values()) <= 1
print("jobs per GPU:", dict(per_gpu), "| even:", even, "| each job on a real GPU saw it alone:", real_ok)
sys.exit(0 if rows and even and real_ok else 1)
PY
