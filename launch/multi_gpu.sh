#!/usr/bin/env bash
# GPU training: one process per host, each seeing all of its GPUs.
#
# One host, N GPUs (single process, no coordinator):
#   launch/multi_gpu.sh --config=configs/cpt/sft.py --workdir=/data/runs/sft
#
# Several hosts: run the same command on every host (ssh, SLURM srun, ...) with
#   COORDINATOR_ADDRESS=<host 0 address>:<port>  NUM_NODES=<hosts>  NODE_RANK=<0..hosts-1>
#   e.g. on host 1 of 2:
#   COORDINATOR_ADDRESS=10.0.0.1:12355 NUM_NODES=2 NODE_RANK=1 launch/multi_gpu.sh --config=...
#
# Env: PYTHON (.venv/bin/python if present), MODULE (cpt_jax.main), CUDA_VISIBLE_DEVICES to
# restrict the GPUs used on a host.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
MODULE=${MODULE:-cpt_jax.main}
NUM_NODES=${NUM_NODES:-1}

if ((NUM_NODES > 1)); then
  : "${COORDINATOR_ADDRESS:?set COORDINATOR_ADDRESS=host0:port for a multi-node run}"
  : "${NODE_RANK:?set NODE_RANK (0..NUM_NODES-1) for a multi-node run}"
  export COORDINATOR_ADDRESS NUM_PROCESSES="$NUM_NODES" PROCESS_ID="$NODE_RANK"
fi
exec "$PYTHON" -m "$MODULE" "$@"
