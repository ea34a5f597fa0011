#!/usr/bin/env bash
# Training across nodes: run by srun as one task per node, inside a SLURM allocation of several nodes.
# Each task starts torchrun, which meets the other nodes' at a c10d rendezvous on the allocation's
# first node and starts NPROC_PER_NODE training processes (one per GPU); torchrun sets RANK,
# WORLD_SIZE and LOCAL_RANK, which the training script reads. See docs/cluster.md, "Several GPUs".
#
#   #SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=4
#   srun profiles/slurm/torchrun-nodes.sh 4 workflow_scripts/train_model.py ARGS...
#
# The number of nodes is the number of tasks (SLURM_NTASKS): one task per node. The rendezvous port is
# TINYLM_RDZV_PORT (default 29500) on the first node; `python` is the one on PATH.
set -euo pipefail

if (($# < 2)) || [[ ! $1 =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: srun $0 NPROC_PER_NODE SCRIPT [ARGS...]" >&2
    exit 2
fi
for var in SLURM_JOB_ID SLURM_JOB_NODELIST SLURM_NTASKS; do
    if [[ -z ${!var:-} ]]; then
        echo "$0: $var is not set: run this under srun inside a SLURM allocation (docs/cluster.md)" >&2
        exit 2
    fi
done
nproc_per_node=$1
shift
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
exec python -m torch.distributed.run --nnodes "$SLURM_NTASKS" --nproc_per_node "$nproc_per_node" \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$head:${TINYLM_RDZV_PORT:-29500}" "$@"
