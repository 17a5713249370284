#!/usr/bin/env bash
# q_tuning.slime checks.
#
#   scripts/test_slime.sh                 tests/integrations/slime/test_slime.py (the CI tests, against the in-project
#                                         stand-in tests/harness/slime_standin.py)
#   scripts/test_slime.sh /path/to/slime [/path/to/Megatron-LM] [pytest args...]
#                                         the same, then
#                                         1. a contract check against that slime checkout: its
#                                            build_dp_schedule gives the same schedules as the
#                                            stand-in's, and its actor/data-iterator code still has
#                                            the hook points q_tuning.slime relies on;
#                                         2. tests/integrations/slime_real/check_real_slime.py: slime's real
#                                            Megatron actor training step on CPU (gloo, 1 and 2
#                                            processes, saved debug rollout data, no inference
#                                            engine), with and without Q-Tuning.
#
# slime and Megatron-LM are not on PyPI and none of their code is part of this project; clone them
# yourself, outside this repository (tested: slime 624b824, Megatron-LM tag core_v0.16.1):
#   git clone https://github.com/THUDM/slime /path/to/slime
#   git clone https://github.com/NVIDIA/Megatron-LM /path/to/Megatron-LM
#   git -C /path/to/Megatron-LM checkout core_v0.16.1
# Megatron-LM (slime imports megatron.training) is the second argument, else $MEGATRON_LM_ROOT,
# else a megatron-lm / Megatron-LM checkout next to the slime one.
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3

"$PY" -m pytest -q -x tests/integrations/slime/test_slime.py

SLIME="${1:-}"
[ -n "$SLIME" ] || exit 0
shift
[ -d "$SLIME/slime" ] || { echo "test_slime.sh: $SLIME has no slime/ package" >&2; exit 2; }
SLIME="$(cd "$SLIME" && pwd)"
MEGATRON="${MEGATRON_LM_ROOT:-}"
if [ $# -gt 0 ] && [ -d "$1/megatron/training" ]; then MEGATRON="$1"; shift; fi
if [ -z "$MEGATRON" ]; then
    for guess in "$SLIME/../megatron-lm" "$SLIME/../Megatron-LM"; do
        [ -d "$guess/megatron/training" ] && MEGATRON="$guess" && break
    done
fi
[ -n "$MEGATRON" ] && [ -d "$MEGATRON/megatron/training" ] || {
    echo "test_slime.sh: no Megatron-LM checkout (give it as the second argument or in" \
         "MEGATRON_LM_ROOT)" >&2; exit 2; }
MEGATRON="$(cd "$MEGATRON" && pwd)"
SLIME_COMMIT="$(git -C "$SLIME" rev-parse HEAD 2>/dev/null || echo '?')"
echo "== slime commit $SLIME_COMMIT ($SLIME)"
source scripts/megatron_lm_checkout.sh
echo "== $(describe_megatron_lm "$MEGATRON") (slime imports its megatron.training)"
echo "== venv: $("$PY" -c 'import sys; from importlib.metadata import version as v
print(sys.executable + ", " + ", ".join(f"{p} {v(p)}" for p in ("megatron-core", "torch")))')"
echo "== contract check against $SLIME"
SLIME_ROOT="$SLIME" PYTHONPATH="$PWD" "$PY" - <<'EOF'
import argparse, ast, os, random, sys

root = os.environ["SLIME_ROOT"]
sys.path.insert(0, root)
from slime.utils.dp_schedule import build_dp_schedule as real  # pure Python in slime >= 2f4bd0d88
from tests.harness.slime_standin import build_dp_schedule as standin

failures = []
rng = random.Random(0)
for trial in range(300):
    dp = rng.choice([1, 2, 4])
    dynamic = rng.random() < 0.6
    n_steps = rng.choice([1, 2])
    gbs = dp * rng.choice([2, 3, 4]) * (1 if dynamic else 2)
    mbs = 2
    n = gbs * n_steps
    lengths = [rng.randint(3, 40) for _ in range(n)]
    args = argparse.Namespace(use_dynamic_batch_size=dynamic, max_tokens_per_gpu=48,
                              micro_batch_size=mbs, balance_data=False, balance_by_flops=False)
    cfg = {"dp_size": dp, "cp_size": 1, "vpp_size": 1, "microbatch_group_size_per_vp_stage": 1}
    try:
        a = real(args, cfg, lengths, global_batch_size=gbs, rollout_indices=list(range(n)))
    except AssertionError:
        continue  # a configuration slime itself refuses
    b = standin(args, cfg, lengths, global_batch_size=gbs, rollout_indices=list(range(n)))
    if a != b:
        failures.append((dp, dynamic, lengths))
print(f"build_dp_schedule: stand-in == slime on {300 - len(failures)}/300 random cases")

def source(rel):
    with open(os.path.join(root, rel)) as f:
        return f.read()

actor = source("slime/backends/megatron_utils/actor.py")
data = source("slime/backends/megatron_utils/data.py")
checks = {
    "hook called as (args, rollout_id, rollout_data) (bd217a63f)":
        "self.rollout_data_postprocess(self.args, rollout_id, rollout_data)" in actor,
    "train_actor's `self.model` is the chunk list": "self.model, self.optimizer" in actor,
    "schedule read from rollout_data by the actor":
        'rollout_data["num_microbatches"]' in actor and 'rollout_data["global_batch_sizes"]' in actor,
    "DataIterator keeps the rollout dict and the index list":
        "self.rollout_data = rollout_data" in data and
        "self.micro_batch_indices = micro_batch_indices" in data and
        'rollout_data["micro_batch_indices"]' in data,
}
for k, ok in checks.items():
    print(("ok   " if ok else "FAIL ") + k)
if failures or not all(checks.values()):
    sys.exit(f"contract check failed ({len(failures)} schedule mismatches)")
EOF

echo "== slime's real Megatron actor step on CPU (slime $SLIME_COMMIT)"
SLIME_ROOT="$SLIME" MEGATRON_LM_ROOT="$MEGATRON" timeout 3000 \
    "$PY" -m pytest -q -s -p no:cacheprovider tests/integrations/slime_real/check_real_slime.py "$@"
