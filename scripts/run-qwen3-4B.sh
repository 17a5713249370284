#!/bin/bash
# Q-Tuning SFT of Qwen3-4B: each step keeps 25% of the samples and 70% of the Q2 response tokens.
#
#   HF_CHECKPOINT=/root/Qwen3-4B DATA_PATH=/root/sft.jsonl bash scripts/run-qwen3-4B.sh [flags]
#
# One node by default (GPUS_PER_NODE GPUs, torchrun); NNODES / NODE_RANK / MASTER_ADDR as in
# scripts/launch_torchrun.sh, or LAUNCHER=ray to place one Ray actor per GPU on a running Ray
# cluster (ray start --head ...). Flags given here are appended, so they override the ones below.

set -ex

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" &>/dev/null && pwd)"
: "${HF_CHECKPOINT:?set HF_CHECKPOINT to a Qwen3-4B HF folder (safetensors, config, tokenizer)}"
: "${DATA_PATH:?set DATA_PATH to one or more JSONL files (messages or prompt/response)}"
SAVE_DIR="${SAVE_DIR:-/root/Qwen3-4B_q_tuning}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
NNODES="${NNODES:-1}"

MODEL_ARGS=(
   --hf-checkpoint "${HF_CHECKPOINT}"
   --bf16
)

CKPT_ARGS=(
   --save "${SAVE_DIR}/checkpoints"
   --load "${SAVE_DIR}/checkpoints"
   --save-interval 100
   --export-hf "${SAVE_DIR}/hf"
)

SFT_ARGS=(
   --data-path ${DATA_PATH}
   --seq-length 8192
   --global-batch-size 128
   --micro-batch-size 1
   --num-epochs 3
   --seed 1234
)

OPTIMIZER_ARGS=(
   --lr 1e-5
   --min-lr 1e-6
   --lr-decay-style cosine
   --lr-warmup-iters 10
   --weight-decay 0.1
   --adam-beta1 0.9
   --adam-beta2 0.98
   --clip-grad 1.0
)

PERF_ARGS=(
   --tensor-model-parallel-size 2
   --sequence-parallel
   --pipeline-model-parallel-size 1
   --context-parallel-size 1
   --use-distributed-optimizer
   --use-dynamic-batch-size
   --max-tokens-per-gpu 9216
)

Q_TUNING_ARGS=(
   --enable-q-tuning
   --q-tuning-sample-keep-ratio 0.25
   --q-tuning-token-keep-ratio 0.7
   --q-tuning-neighbor-lambda 0.5
   --q-tuning-batch-policy shrink
)

LOG_ARGS=(
   --log-interval 1
   --tensorboard-dir "${SAVE_DIR}/tensorboard"
)

ARGS=(
   "${MODEL_ARGS[@]}"
   "${CKPT_ARGS[@]}"
   "${SFT_ARGS[@]}"
   "${OPTIMIZER_ARGS[@]}"
   "${PERF_ARGS[@]}"
   "${Q_TUNING_ARGS[@]}"
   "${LOG_ARGS[@]}"
   "$@"
)

if [[ "${LAUNCHER:-torchrun}" == "ray" ]]; then
   PYTHONPATH="${SCRIPT_DIR}/..${PYTHONPATH:+:${PYTHONPATH}}" \
   python3 -m q_tuning.sft.train.ray_launcher \
      --actor-num-nodes "${NNODES}" \
      --actor-num-gpus-per-node "${GPUS_PER_NODE}" \
      "${ARGS[@]}"
else
   GPUS_PER_NODE="${GPUS_PER_NODE}" NNODES="${NNODES}" \
   bash "${SCRIPT_DIR}/launch_torchrun.sh" "${ARGS[@]}"
fi
