#!/usr/bin/env bash
# Run tests/integrations/megatron_lm/test_megatron_lm.py against a Megatron-LM checkout given by path. Tested: tags
# core_v0.16.1 and core_v0.19.0, and slime's pin 1dcf0dafa884 (docs/compatibility.md).
# Megatron-LM is not on PyPI and none of it is part of this project; clone it yourself, outside
# this repository:
#   git clone https://github.com/NVIDIA/Megatron-LM /path/to/Megatron-LM
#   git -C /path/to/Megatron-LM checkout core_v0.19.0
#   bash scripts/test_megatron_lm.sh /path/to/Megatron-LM [pytest args...]
# The venv follows the megatron-core version of the checkout (megatron/core/package_info.py):
# up to 0.16.x .venv (scripts/setup.sh: megatron-core 0.16.1); 0.17 and later .venv-next
# (scripts/setup_next.sh: megatron-core 0.19.2 and transformers 5, a test-only install on 3.11).
# CPU only: Megatron-LM's pretrain_gpt.py runs on gloo with the test shims of
# tests/harness/megatron_lm.py (it builds Megatron's C++ dataset helper inside the checkout); on
# Python < 3.12 the shims also lend core_v0.19's `typing.override` from typing_extensions.
set -euo pipefail
checkout="${1:?usage: bash scripts/test_megatron_lm.sh /path/to/Megatron-LM [pytest args...]}"
shift
checkout="$(cd "$checkout" && pwd)"
if [ ! -f "$checkout/pretrain_gpt.py" ] || [ ! -d "$checkout/megatron/training" ]; then
    echo "$checkout is not a Megatron-LM checkout (no pretrain_gpt.py / megatron/training)" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
source scripts/megatron_lm_checkout.sh
if [ "$(megatron_core_field "$checkout" MINOR)" -ge 17 ]; then
    venv=.venv-next; bash scripts/setup_next.sh
else
    venv=.venv; bash scripts/setup.sh dev
fi
PY="$venv/bin/python"
echo "== $(describe_megatron_lm "$checkout")"
echo "== venv $venv: $("$PY" -c 'import sys; from importlib.metadata import version as v
print(f"Python {sys.version.split()[0]}, " + ", ".join(
    f"{p} {v(p)}" for p in ("megatron-core", "transformers", "torch")))')"
# What Megatron-LM imports beyond megatron-core (triton at module load even on CPU; pybind11 to
# build the dataset helper). None of these pulls a torch.
"$PY" -m pip install -q six regex einops pyyaml triton pybind11 pydantic
"$PY" -c "import sys; sys.path.insert(0, '.'); from pathlib import Path
from tests.harness.megatron_lm import build_dataset_helper
print('dataset helper:', build_dataset_helper(Path(sys.argv[1])))" "$checkout"
# Only Megatron-LM's `megatron` package goes on the path (through a link): its checkout root also
# holds a `tests` package that would shadow ours.
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
ln -s "$checkout/megatron" "$site/megatron"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
"$PY" -m pytest -q -ra tests/integrations/megatron_lm/test_megatron_lm.py "$@"
