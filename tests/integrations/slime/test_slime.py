"""q_tuning.slime against tests/harness/slime_standin.py (slime's data-iterator contract, DP
schedule builder, parser and hook call; slime itself is not installable in CI). Real megatron-core
models on gloo processes with timeouts."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from q_tuning.slime import QTuningSlimeError, check_args, postprocess
from tests.workers import slime as D
from tests.harness.launch import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TIMEOUT = 240
SETTINGS = {"sample_keep_ratio": 0.5, "token_keep_ratio": 0.6}
BUDGET = 48  # --max-tokens-per-gpu
DATA = D.slime_data(16)
TOTAL_TOKENS = sum(len(t) for t in DATA["slime"]["tokens"])
# name: (world, tp, pp, cp)
SPLITS = {"dp1": (1, 1, 1, 1), "dp2": (2, 1, 1, 1), "dp4": (4, 1, 1, 1), "tp2": (2, 2, 1, 1),
          "pp2": (2, 1, 2, 1), "cp2": (2, 1, 1, 2), "dp2cp2": (4, 1, 1, 2)}


def _yaml(tmp_dir, extra: dict | None = None) -> str:
    path = os.path.join(tmp_dir, "q_tuning.yaml")
    with open(path, "w") as f:
        f.write("enable_q_tuning: true\n")
        for k, v in {**{"q_tuning_" + k: v for k, v in SETTINGS.items()}, **(extra or {})}.items():
            f.write(f"{k}: {v}\n")
    return path


def _argv(tmp_dir, *, per_token=True, dynamic=True, hook=True, extra_yaml=None) -> list:
    argv = ["--loss-type", "sft_loss", "--global-batch-size", "16", "--rollout-batch-size", "16",
            "--unknown-flag-slime-ignores", "1"]
    argv += ["--calculate-per-token-loss"] if per_token else []
    argv += (["--use-dynamic-batch-size", "--max-tokens-per-gpu", str(BUDGET)] if dynamic
             else ["--micro-batch-size", "2"])
    if hook:
        argv += ["--rollout-data-postprocess-path", "q_tuning.slime.postprocess",
                 "--custom-config-path", _yaml(tmp_dir, extra_yaml)]
    return argv


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("slime"))


@pytest.fixture(scope="module")
def reference():
    """QTuningPruner itself, one process, same model, samples and packed-row budget."""
    (out,) = run_distributed(D.pruner_worker, 1, SETTINGS, {"max_tokens_per_row": BUDGET},
                             DATA["ours"], timeout=TIMEOUT)
    return out


_RUNS: dict = {}


def _run(name, tmp_dir, **kw):
    key = (name, repr(sorted(kw.items())))
    if key not in _RUNS:
        world, tp, pp, cp = SPLITS[name]
        _RUNS[key] = run_distributed(D.actor_worker, world, tp, pp, cp, _argv(tmp_dir, **kw),
                                     DATA["slime"], timeout=TIMEOUT)
    return _RUNS[key]


def _trained(outs) -> dict:
    """sample id -> its trained mask in our convention, padded to the original length (fillers,
    which train on nothing, left out); checks DP replicas agree."""
    out: dict = {}
    for o in outs:
        for s in o["samples"]:
            if not any(s["mask"]):
                continue
            full = [0] * (s["total"] - s["resp"]) + s["mask"]
            full += [0] * (len(DATA["slime"]["tokens"][s["id"]]) - len(full))
            assert out.setdefault(s["id"], full) == full, "replicas disagree"
    return out


def _global_order(outs) -> list:
    """Sample ids in the pruner's global order (DP-rank-major, each rank's partition order)."""
    firsts = {o["dp_rank"]: o["before"]["sample_indices"] for o in outs}
    return [i for r in sorted(firsts) for i in firsts[r]]


@pytest.mark.parametrize("split", list(SPLITS))
def test_decision_equals_the_pruner(split, tmp_dir, reference):
    outs = _run(split, tmp_dir)
    order = _global_order(outs)
    for o in outs:  # identical on every rank, equal to QTuningPruner's on the same samples
        assert o["decision"]["keep"] == outs[0]["decision"]["keep"]
        assert [o["decision"]["keep"][order.index(i)] for i in range(16)] == reference["keep"]
        assert [o["decision"]["quadrant"][order.index(i)] for i in range(16)] == \
            reference["quadrant"]
        for i in range(16):
            assert o["decision"]["ppl"][order.index(i)] == pytest.approx(reference["ppl"][i],
                                                                           rel=1e-5)
    assert _trained(outs) == reference["masks"]  # Q2 token pruning included


@pytest.mark.parametrize("split", list(SPLITS))
def test_schedule_rewritten_in_place_equal_counts_balanced(split, tmp_dir):
    outs = _run(split, tmp_dir)
    budget = BUDGET * SPLITS[split][3]  # slime packs --max-tokens-per-gpu x cp
    counts = {o["dp_rank"]: o["num_microbatches"] for o in outs}
    assert len({tuple(c) for c in counts.values()}) == 1 and counts[0][0] >= 1
    for o in outs:
        assert o["same_lists"]  # slime's iterator/train() hold these objects: edited in place
        assert o["global_batch_sizes"] == [16]  # the LR scheduler's increment is untouched
        flat = [i for b in o["micro_batch_indices"] for i in b]
        assert flat == list(range(len(o["samples"])))
        assert len(o["micro_batch_indices"]) == o["num_microbatches"][0]
        for b, seen in zip(o["micro_batch_indices"], o["seen"]):
            tokens = sum(o["samples"][i]["total"] for i in b)
            assert tokens <= budget or len(b) == 1
            assert seen["tokens"] == tokens
    real = {o["dp_rank"]: sum(1 for s in o["samples"] if any(s["mask"])) for o in outs}
    assert max(real.values()) - min(real.values()) <= 1
    assert sum(real.values()) == 8  # every kept sample trained exactly once per replica set


@pytest.mark.parametrize("split", ["dp1", "dp2", "tp2", "pp2", "cp2", "dp2cp2"])
def test_gradients_are_the_kept_token_mean(split, tmp_dir):
    outs = _run(split, tmp_dir)
    (ref,) = run_distributed(D.reference_grads_worker, 1, DATA["ours"], _trained(outs), True,
                             timeout=TIMEOUT)
    for o in outs:
        for name, g in ref.items():
            torch.testing.assert_close(o["grads"][name], g, atol=1e-5, rtol=1e-4, msg=name)


def _forwarded(outs) -> int:
    """Tokens forwarded by the step: each DP rank's micro-batches once (its CP ranks share them,
    each forwarding its zigzag part)."""
    return sum(s["tokens"] for o in outs if o["cp_rank"] == 0 for s in o["seen"])


@pytest.mark.parametrize("split", ["dp2", "cp2"])
def test_forwarded_tokens_drop_and_dropped_samples_never_enter(split, tmp_dir):
    baseline = _run(split, tmp_dir, hook=False)
    pruned = _run(split, tmp_dir)
    assert _forwarded(baseline) == TOTAL_TOKENS
    forwarded = _forwarded(pruned)
    kept = _trained(pruned)
    # kept samples only, each cut after its last trained target
    assert forwarded == sum(max(j for j, v in enumerate(m) if v) + 1 for m in kept.values())
    assert forwarded < TOTAL_TOKENS / 2
    seen_ids = {i for o in pruned for s in o["seen"] for i in s["sample_indices"]}
    assert seen_ids == set(kept)
    summary = pruned[0]["summary"]
    assert summary["kept_samples"] == 8 and summary["forwarded_tokens"] == sum(
        s["tokens"] for s in pruned[0]["seen"])
    # the step's totals over every DP rank (the `[Q-Tuning] slime rollout ...` log line)
    assert (summary["step_forwarded_tokens_before"], summary["step_forwarded_tokens"]) == \
        (TOTAL_TOKENS, forwarded)


@pytest.mark.parametrize("split", ["dp2", "cp2"])
def test_per_sample_mean_loss_with_static_micro_batches(split, tmp_dir):
    outs = _run(split, tmp_dir, per_token=False, dynamic=False)
    assert len({tuple(o["num_microbatches"]) for o in outs}) == 1
    for o in outs:
        assert all(len(b) <= 2 for b in o["micro_batch_indices"])
    kept = _trained(outs)
    for o in outs:  # denominators: the pruned masks' totals x kept / step rollouts
        for s in o["samples"]:
            if any(s["mask"]):
                assert s["denom"] == pytest.approx(sum(s["mask"]) * len(kept) / 16)
    (ref,) = run_distributed(D.reference_grads_worker, 1, DATA["ours"], kept, False,
                             timeout=TIMEOUT)
    for o in outs:
        for name, g in ref.items():
            torch.testing.assert_close(o["grads"][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_user_hook_is_chained_after_ours(tmp_dir):
    outs = _run("dp1", tmp_dir, extra_yaml={"q_tuning_postprocess_chain":
                                            "tests.workers.slime.user_hook"})
    (o,) = outs
    # the user's hook ran after ours, on the pruned data and the rewritten schedule
    assert o["user_hook_saw"] == {"samples": len(o["samples"]),
                                  "num_microbatches": o["num_microbatches"],
                                  "kept_ids": sorted({s["id"] for s in o["samples"]})}
    assert len(o["user_hook_saw"]["kept_ids"]) == 8


@pytest.mark.parametrize("split", ["dp2", "pp2", "tp2"])
def test_scalars_reach_slime_tracking_from_its_metrics_rank(split, tmp_dir):
    """One `log(args, metrics, step_key="train/step")` per rollout, from the rank where slime logs
    its train metrics (DP 0, TP 0, last PP stage), at slime's step (the rollout id, 0 here)."""
    outs = _run(split, tmp_dir)
    world, _, pp, _ = SPLITS[split]
    logged = [o for o in outs if o["tracked"]]
    assert len(logged) == 1
    (o,) = logged
    assert (o["dp_rank"], o["tp_rank"], o["pp_rank"]) == (0, 0, pp - 1)
    ((metrics, step_key),) = o["tracked"]
    assert step_key == "train/step" and metrics["train/step"] == 0
    report, summary = o["report"], o["summary"]
    assert metrics["train/q_tuning/kept_samples"] == summary["kept_samples"] == 8
    assert metrics["train/q_tuning/total_samples"] == summary["total_samples"] == 16
    assert metrics["train/q_tuning/kept_tokens"] == summary["kept_tokens"]
    assert metrics["train/q_tuning/level"] == report.level
    assert metrics["train/q_tuning/scoring_seconds"] == report.scoring_seconds
    placed = 16 - report.unplaceable_samples
    assert sum(metrics[f"train/q_tuning/count/Q{q}"] for q in range(1, 5)) == placed
    assert sum(metrics[f"train/q_tuning/kept_count/Q{q}"] for q in range(1, 5)) == 8
    assert all(k.startswith("train/") for k in metrics)


# --- settings and refusals (no processes: they depend on args only, identical on every rank) -----

def _args(**over) -> argparse.Namespace:
    base = dict(enable_q_tuning=True, loss_type="sft_loss", global_batch_size=16,
                rollout_batch_size=16, n_samples_per_prompt=1, use_routing_replay=False,
                use_rollout_routing_replay=False, q_tuning_sample_keep_ratio=0.5)
    base.update(over)
    return argparse.Namespace(**base)


def test_hook_refuses_without_its_settings():
    args = argparse.Namespace(loss_type="sft_loss")
    with pytest.raises(QTuningSlimeError, match="enable_q_tuning.*--custom-config-path"):
        postprocess(args, 0, {"tokens": []})


@pytest.mark.parametrize("over, match", [
    ({"loss_type": "policy_loss"}, "--loss-type policy_loss"),
    ({"use_routing_replay": True}, "--use-routing-replay"),
    ({"use_rollout_routing_replay": True}, "--use-rollout-routing-replay"),
    ({"q_tuning_batch_policy": "refill"}, "--q-tuning-batch-policy refill"),
    ({"global_batch_size": 8}, "spans 2 optimizer steps"),
    ({"virtual_pipeline_model_parallel_size": 2}, "--virtual-pipeline-model-parallel-size"),
    ({"q_tuning_sample_keep_ratio": 1.5}, "--q-tuning-sample-keep-ratio must be in"),
    ({"q_tuning_sampel_keep_ratio": 0.3}, "unknown Q-Tuning setting.*q_tuning_sampel_keep_ratio"),
])
def test_refusals_name_the_setting(over, match):
    with pytest.raises((QTuningSlimeError, ValueError), match=match):
        check_args(_args(**over))


def test_a_rollout_with_several_steps_is_refused_by_the_hook():
    data = {"tokens": [torch.ones(3, dtype=torch.long)], "micro_batch_indices": [[0], [0]],
            "num_microbatches": [1, 1], "global_batch_sizes": [8, 8]}
    with pytest.raises(QTuningSlimeError, match="spans 2 optimizer steps"):
        postprocess(_args(global_batch_size=None), 0, data)


# --- the launcher and the import ------------------------------------------------------------------

def _python(*argv, cwd=ROOT, env_extra=None):
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT] + ([env_extra] if env_extra else []))}
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_import_needs_no_slime():
    r = _python("-c", "import sys, q_tuning.slime; assert 'slime' not in sys.modules; "
                      "print(q_tuning.slime.HOOK_PATH)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "q_tuning.slime.postprocess"


def test_launcher_help_shows_our_flags():
    r = _python("-m", "q_tuning.slime", "--help")
    assert r.returncode == 0, r.stderr
    assert "--enable-q-tuning" in r.stdout and "--q-tuning-sample-keep-ratio" in r.stdout


@pytest.fixture(scope="module")
def fake_slime(tmp_path_factory):
    """A `slime.utils.arguments.parse_args` backed by the stand-in, and a train.py that prints
    what slime's actors would receive."""
    root = tmp_path_factory.mktemp("fake_slime")
    pkg = root / "slime" / "utils"
    pkg.mkdir(parents=True)
    (root / "slime" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "arguments.py").write_text("from tests.harness.slime_standin import parse_args\n")
    (root / "train.py").write_text(textwrap.dedent("""
        import json
        from slime.utils.arguments import parse_args
        args = parse_args()
        print("ARGS " + json.dumps({k: v for k, v in vars(args).items()
                                    if k.startswith(("q_tuning", "enable_q", "rollout_data"))}))
    """))
    return str(root)


def test_launcher_installs_chains_and_validates(fake_slime):
    train = os.path.join(fake_slime, "train.py")
    common = ["--loss-type", "sft_loss", "--global-batch-size", "8", "--rollout-batch-size", "8",
              "--rollout-data-postprocess-path", "my.hook", "--ignored-by-slime", "x"]
    r = _python("-m", "q_tuning.slime", train, *common, "--enable-q-tuning",
                "--q-tuning-sample-keep-ratio", "0.25", env_extra=fake_slime)
    assert r.returncode == 0, r.stderr
    args = json.loads(r.stdout.split("ARGS ", 1)[1])
    assert args["rollout_data_postprocess_path"] == "q_tuning.slime.postprocess"
    assert args["q_tuning_postprocess_chain"] == "my.hook"
    assert args["q_tuning_sample_keep_ratio"] == 0.25
    assert "--q-tuning-sample-keep-ratio=0.25" in r.stdout  # the settings, printed once
    # without --enable-q-tuning nothing changes
    r = _python("-m", "q_tuning.slime", train, *common, env_extra=fake_slime)
    assert r.returncode == 0, r.stderr
    args = json.loads(r.stdout.split("ARGS ", 1)[1])
    assert args["rollout_data_postprocess_path"] == "my.hook" and not args["enable_q_tuning"]
    assert "q_tuning_postprocess_chain" not in args
    # refusals at start-up, naming the setting
    r = _python("-m", "q_tuning.slime", train, *common, "--enable-q-tuning", "--loss-type",
                "policy_loss", env_extra=fake_slime)
    assert r.returncode != 0 and "--loss-type policy_loss" in r.stderr
    r = _python("-m", "q_tuning.slime", train, *common, "--enable-q-tuning",
                "--q-tuning-sample-keep-ratio", "2", env_extra=fake_slime)
    assert r.returncode == 2 and "--q-tuning-sample-keep-ratio" in r.stderr
    # the script's own --help lists our flags (registered with slime's parser)
    r = _python("-m", "q_tuning.slime", train, "--help", env_extra=fake_slime)
    assert r.returncode == 0 and "--q-tuning-token-keep-ratio" in r.stdout


def test_schedule_pieces_translation_split_and_fillers():
    from q_tuning.slime import schedule as S

    rollout = {"tokens": [torch.arange(6)], "response_lengths": [4],
               "loss_masks": [torch.tensor([1, 0, 1, 0], dtype=torch.int)], "total_lengths": [6]}
    batch, _ = S.to_batch(rollout, S.per_sample_keys(rollout))
    assert batch["loss_masks"][0].tolist() == [0, 0, 1, 0, 1, 0]  # exact, no shift
    cut = S.to_slime_sample({k: v[0] for k, v in batch.items()}, trim=True)
    assert cut["tokens"].tolist() == [0, 1, 2, 3, 4] and cut["loss_masks"].tolist() == [1, 0, 1]
    assert cut["response_lengths"] == 3 and cut["total_lengths"] == 5
    lengths = [30, 30, 5]
    bins = S.first_fit(lengths, 48)
    assert bins == [[0, 2], [1]]
    assert S.equalize(bins, 3, lengths) == ([[0], [2], [1]], 0)
    assert S.equalize(bins, 4, lengths)[1] == 1  # one 2-token filler micro-batch
    filler = S.filler_sample(cut)
    assert filler["tokens"].numel() == 2 and not filler["loss_masks"].any()
