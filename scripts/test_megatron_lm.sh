#!/usr/bin/env bash
# Run tests/integrations/megatron_lm/test_megatron_lm.py against a Megatron-LM checkout given by path (tested: tag
# core_v0.16.1, which matches megatron-core 0.16.1). Megatron-LM is not on PyPI and none of it is
# part of this project; clone it yourself, outside this repository:
#   git clone https://github.com/NVIDIA/Megatron-LM /path/to/Megatron-LM
#   git -C /path/to/Megatron-LM checkout core_v0.16.1
#   bash scripts/test_megatron_lm.sh /path/to/Megatron-LM [pytest args...]
# CPU only: Megatron-LM's pretrain_gpt.py runs on gloo with the test shims of
# tests/harness/megatron_lm.py (it builds Megatron's C++ dataset helper inside the checkout).
set -euo pipefail
checkout="${1:?usage: bash scripts/test_megatron_lm.sh /path/to/Megatron-LM [pytest args...]}"
shift
checkout="$(cd "$checkout" && pwd)"
if [ ! -f "$checkout/pretrain_gpt.py" ] || [ ! -d "$checkout/megatron/training" ]; then
    echo "$checkout is not a Megatron-LM checkout (no pretrain_gpt.py / megatron/training)" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
# What Megatron-LM imports beyond megatron-core (triton at module load even on CPU; pybind11 to
# build the dataset helper). None of these pulls a torch.
.venv/bin/python -m pip install -q six regex einops pyyaml triton pybind11 pydantic
.venv/bin/python -c "import sys; sys.path.insert(0, '.'); from pathlib import Path
from tests.harness.megatron_lm import build_dataset_helper
print('dataset helper:', build_dataset_helper(Path(sys.argv[1])))" "$checkout"
# Only Megatron-LM's `megatron` package goes on the path (through a link): its checkout root also
# holds a `tests` package that would shadow ours.
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
ln -s "$checkout/megatron" "$site/megatron"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/python -m pytest -q -ra tests/integrations/megatron_lm/test_megatron_lm.py "$@"
