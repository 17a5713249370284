"""Q-Tuning in slime's REAL Megatron actor training step, on CPU with gloo (opt-in).

    SLIME_ROOT=/path/to/slime MEGATRON_LM_ROOT=/path/to/Megatron-LM \\
        pytest tests/integrations/slime_real/check_real_slime.py
    (or: bash scripts/test_slime.sh /path/to/slime)

Not collected by the default suite: the file name matches no `test_*.py` pattern, so pytest runs
it only when named. Without SLIME_ROOT it skips; with it, anything that breaks fails.

Each run is `torchrun tests/integrations/slime_real/cpu_train.py <slime flags>` (slime's actor, rollout-side
split and training step, unmodified, without Ray; see cpu_train.py and harness.py) for 3 saved
debug rollouts of 16 SFT samples, one optimizer step each, on a 2-layer megatron-core GPT
(random init from --seed, bf16 as slime forces it), at 1 and 2 processes (DP 1 and DP 2):
- plain slime;
- the launcher without --enable-q-tuning (`python -m q_tuning.slime cpu_train.py ...`);
- the launcher with --enable-q-tuning;
- the hooks-only way (`--rollout-data-postprocess-path q_tuning.slime.postprocess
  --custom-config-path q_tuning.yaml`), through plain slime.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from tests.integrations.slime_real import harness as H

SLIME_ROOT = os.environ.get("SLIME_ROOT")
MEGATRON_LM_ROOT = os.environ.get("MEGATRON_LM_ROOT")
pytestmark = pytest.mark.skipif(not SLIME_ROOT, reason="opt-in: set SLIME_ROOT to a slime "
                                "checkout (bash scripts/test_slime.sh /path/to/slime)")

SETTINGS = {"q_tuning_sample_keep_ratio": 0.5, "q_tuning_token_keep_ratio": 0.7}
Q_FLAGS = ["--enable-q-tuning", "--q-tuning-sample-keep-ratio", "0.5",
           "--q-tuning-token-keep-ratio", "0.7"]
NPROCS = [1, 2]
ROLLOUTS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    slime_root = Path(SLIME_ROOT).resolve()
    assert (slime_root / "slime" / "backends" / "megatron_utils" / "actor.py").is_file(), \
        f"SLIME_ROOT={slime_root} is not a slime checkout"
    assert MEGATRON_LM_ROOT, "set MEGATRON_LM_ROOT to a Megatron-LM checkout (megatron.training)"
    megatron_root = Path(MEGATRON_LM_ROOT).resolve()
    assert (megatron_root / "megatron" / "training").is_dir(), \
        f"MEGATRON_LM_ROOT={megatron_root} has no megatron/training"
    env = H.launch_env(slime_root, megatron_root)
    out = tmp_path_factory.mktemp("slime_real")
    inputs = H.make_inputs(out, env, num_rollouts=ROLLOUTS)
    yaml = out / "q_tuning.yaml"
    yaml.write_text("enable_q_tuning: true\n" + "".join(f"{k}: {v}\n"
                                                        for k, v in SETTINGS.items()))
    print(f"\nslime {H.slime_commit(slime_root)} ({slime_root})", flush=True)
    return {"env": env, "inputs": inputs, "yaml": str(yaml)}


_RUNS: dict = {}


def _run(setup, kind: str, nproc: int) -> str:
    key = (kind, nproc)
    if key not in _RUNS:
        flags = H.slime_flags(setup["inputs"], nproc, num_rollouts=ROLLOUTS)
        if kind == "plain":
            out = H.run(setup["env"], nproc, flags, launcher=False)
        elif kind == "launcher_off":
            out = H.run(setup["env"], nproc, flags, launcher=True)
        elif kind == "launcher_on":
            out = H.run(setup["env"], nproc, flags + Q_FLAGS, launcher=True,
                        reference=nproc == 1)
        elif kind == "yaml_on":
            out = H.run(setup["env"], nproc, flags + [
                "--rollout-data-postprocess-path", "q_tuning.slime.postprocess",
                "--custom-config-path", setup["yaml"]], launcher=False)
        else:
            raise ValueError(kind)
        _RUNS[key] = out
    return _RUNS[key]


def _trained(output: str, rollout_id: int) -> dict[int, list[int]]:
    """sample index -> trained loss mask (response convention), over every DP rank; fillers (no
    loss token) left out."""
    out: dict[int, list[int]] = {}
    for rec in H.harness_records(output, "trained"):
        if rec["rollout_id"] != rollout_id:
            continue
        for i, mask, total, resp in zip(rec["sample_indices"], rec["loss_masks"],
                                        rec["total_lengths"], rec["response_lengths"]):
            if any(mask):
                assert i not in out, f"sample {i} trained twice"
                out[i] = [0] * (total - resp) + mask  # our convention (full length, trimmed)
    return out


@pytest.mark.parametrize("nproc", NPROCS)
def test_without_q_tuning_the_launcher_leaves_slime_exact(setup, nproc):
    plain, off = _run(setup, "plain", nproc), _run(setup, "launcher_off", nproc)
    steps = H.step_logs(plain)
    assert sorted(steps) == list(range(ROLLOUTS)), plain[-3000:]
    assert H.step_logs(off) == steps  # losses, grad norms, lr: bit-identical
    assert H.forwarded_tokens(off) == H.forwarded_tokens(plain)
    assert not H.q_tuning_lines(off)


@pytest.mark.parametrize("route", ["launcher_on", "yaml_on"])
@pytest.mark.parametrize("nproc", NPROCS)
def test_q_tuning_trains_on_fewer_forwarded_tokens(setup, nproc, route):
    out, plain = _run(setup, route, nproc), _run(setup, "plain", nproc)
    steps = H.step_logs(out)
    assert sorted(steps) == list(range(ROLLOUTS)), out[-3000:]
    assert all(math.isfinite(s["train/loss"]) and s["train/grad_norm"] > 0
               for s in steps.values())
    lines = H.q_tuning_lines(out)
    assert sum("[Q-Tuning] Kept 8/16 samples" in line for line in lines) == ROLLOUTS, lines
    assert sum("[Q-Tuning] slime rollout" in line for line in lines) == ROLLOUTS, lines
    assert H.forwarded_tokens(out) < 0.7 * H.forwarded_tokens(plain)
    for rollout_id in range(ROLLOUTS):
        assert len(_trained(out, rollout_id)) == 8
    if route == "launcher_on" and nproc == 2:
        print("\n".join(["", "Q-Tuning log lines of the real slime run (launcher, DP 2):"]
                        + [line for line in lines if "settings" not in line]
                        + [f"step {k}: train/loss {v['train/loss']:.6f}"
                           for k, v in sorted(steps.items())]), flush=True)


@pytest.mark.parametrize("route", ["launcher_on", "yaml_on"])
@pytest.mark.parametrize("nproc", NPROCS)
def test_decision_equals_the_pruner_on_the_same_model_and_batch(setup, nproc, route):
    """Rollout 0 (the initial weights, the same at DP 1 and DP 2): the samples and tokens slime
    trains equal a plain QTuningPruner's decision on the actor's model before the step."""
    (reference,) = H.harness_records(_run(setup, "launcher_on", 1), "reference")
    masks = {int(k): v for k, v in reference["loss_masks"].items()}
    trained = _trained(_run(setup, route, nproc), 0)
    assert sorted(trained) == reference["kept"]
    for i, mask in trained.items():  # Q2 token pruning included; cut after the last target
        full = masks[i]
        assert mask == full[:len(mask)] and not any(full[len(mask):]), i


def test_both_ways_in_are_the_same_run(setup):
    for nproc in NPROCS:
        a, b = _run(setup, "launcher_on", nproc), _run(setup, "yaml_on", nproc)
        assert H.step_logs(a) == H.step_logs(b)
        assert [_trained(a, r) for r in range(ROLLOUTS)] == \
            [_trained(b, r) for r in range(ROLLOUTS)]


def test_refusals_through_slimes_own_parser(setup):
    flags = H.slime_flags(setup["inputs"], 1, num_rollouts=ROLLOUTS)
    with pytest.raises(AssertionError, match="--q-tuning-sample-keep-ratio"):
        H.run(setup["env"], 1, flags + ["--enable-q-tuning", "--q-tuning-sample-keep-ratio",
                                        "1.5"], launcher=True, timeout=300)
    with pytest.raises(AssertionError, match="enable_q_tuning.*is not set on args"):
        H.run(setup["env"], 1, flags + ["--rollout-data-postprocess-path",
                                        "q_tuning.slime.postprocess", "--enable-q-tuning"],
              launcher=False, timeout=300)
