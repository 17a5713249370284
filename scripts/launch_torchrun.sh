#!/usr/bin/env bash
# q-tuning-train on one or several nodes with torchrun; every argument goes to the trainer.
#
#   one node, 8 GPUs:
#     GPUS_PER_NODE=8 bash scripts/launch_torchrun.sh --hf-checkpoint ... --tensor-model-parallel-size 2 ...
#   two nodes (run on each, NODE_RANK 0 on the node whose address is MASTER_ADDR):
#     MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NNODES=2 NODE_RANK=0 GPUS_PER_NODE=8 \
#         bash scripts/launch_torchrun.sh <flags>
#   CPU only (gloo), 2 processes:
#     GPUS_PER_NODE=2 bash scripts/launch_torchrun.sh --device cpu <flags>
#
# Environment: MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), NNODES (1), NODE_RANK (0),
# GPUS_PER_NODE (the GPUs nvidia-smi lists, else 1), PYTHON (the repository's .venv if present).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"

MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    GPUS_PER_NODE="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    [[ "${GPUS_PER_NODE}" -ge 1 ]] || GPUS_PER_NODE=1
fi
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "${repo}/.venv/bin/python" ]]; then PYTHON="${repo}/.venv/bin/python"; else PYTHON=python3; fi
fi
if ! command -v nvidia-smi >/dev/null 2>&1 || [[ " $* " == *" --device cpu "* ]]; then
    # megatron-core on CPU: its JIT warm-ups would query CUDA; one thread per process.
    export TORCHDYNAMO_DISABLE=1
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
export PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}"

exec "${PYTHON}" -m torch.distributed.run \
    --nnodes "${NNODES}" --node-rank "${NODE_RANK}" --nproc-per-node "${GPUS_PER_NODE}" \
    --master-addr "${MASTER_ADDR}" --master-port "${MASTER_PORT}" \
    -m q_tuning.sft.train "$@"
