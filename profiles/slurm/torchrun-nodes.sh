#!/usr/bin/env bash
# Training across nodes: run by srun as one task per node, inside a SLURM allocation of several nodes.
# Each task starts torchrun, which meets the other nodes' at a c10d rendezvous on the first node of
# the job step and starts NPROC_PER_NODE training processes (one per GPU); torchrun sets RANK,
# WORLD_SIZE and LOCAL_RANK, which the training script reads. See docs/cluster.md, "Several GPUs".
#
#   #SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=4 --cpus-per-task=16
#   srun --cpus-per-task=16 profiles/slurm/torchrun-nodes.sh 4 workflow_scripts/train_model.py ARGS...
#
# The number of nodes is the number of the step's tasks (SLURM_STEP_NUM_TASKS): one task per node.
# The rendezvous port is TINYLM_RDZV_PORT (default 29500); `python` is the one on PATH.
set -euo pipefail

if (($# < 2)) || [[ ! $1 =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: srun $0 NPROC_PER_NODE SCRIPT [ARGS...]" >&2
    exit 2
fi
# srun sets these for each task of a job step; a batch script alone has none of them, and one
# torchrun started there would wait for nodes that never join.
for var in SLURM_JOB_ID SLURM_STEP_NODELIST SLURM_STEP_NUM_TASKS SLURM_PROCID; do
    if [[ -z ${!var:-} ]]; then
        echo "$0: $var is not set: run this with srun, one task per node, inside a SLURM allocation" \
            "(docs/cluster.md)" >&2
        exit 2
    fi
done
nproc_per_node=$1
shift
hosts=$(scontrol show hostnames "$SLURM_STEP_NODELIST")
head=${hosts%%$'\n'*}
if [[ -z $head ]]; then
    echo "$0: scontrol found no host in SLURM_STEP_NODELIST=$SLURM_STEP_NODELIST" >&2
    exit 2
fi
exec python -m torch.distributed.run --nnodes "$SLURM_STEP_NUM_TASKS" --nproc_per_node "$nproc_per_node" \
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$head:${TINYLM_RDZV_PORT:-29500}" "$@"
