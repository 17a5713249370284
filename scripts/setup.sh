#!/usr/bin/env bash
# Create .venv (if missing) and install q_tuning with the given extras.
# torch==2.13.0 is installed first: it is the CPU wheel on the machines' disk; anything that lets
# pip pick a torch itself downloads a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[${extras}]"
