"""q-tuning-train end to end on CPU: a tiny random HF Llama (SmolLM2 tokenizer), real megatron-core.

One spawn of 1 process and one of 2 processes run every scenario in turn (start-up dominates on
2 cores); the tests then check their results:
- 1 and 2 processes (DP=2, TP=2, PP=2), with and without Q-Tuning: the Q-Tuning lines are
  logged, the samples trained each step are the kept ones, and 2 processes reproduce the 1-process
  losses (the step's loss is the global token mean whatever the split);
- resume: 4 steps straight == 2 steps, save, load, 2 steps (DP=2, distributed optimizer, refill):
  losses and final weights bitwise equal;
- the Ray launcher with 2 processes on a local CPU Ray cluster;
- bad input: clear errors, nothing left that looks like a finished checkpoint or export.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.harness.launch import run_distributed

pytest.importorskip("transformers")

REPO = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT = 420
ITERS = 3
G = 8


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tests.workers import trainer as W_trainer

    root = tmp_path_factory.mktemp("trainer_assets")
    cache = tmp_path_factory.getbasetemp() / "q_tuning_cache"  # shared with test_assets/test_data
    return W_trainer.make_assets(str(root), str(cache))


def _argv(assets: dict, out: pathlib.Path, *extra: str, model: str = "llama",
          iters: int | None = ITERS, gbs: int = G, data: str | None = None) -> list[str]:
    argv = ["--hf-checkpoint", assets[model], "--data-path", data or assets["data"],
            "--global-batch-size", str(gbs), "--micro-batch-size", "2", "--seq-length", "64",
            "--lr", "1e-3", "--lr-decay-style", "linear", "--seed", "7",
            "--output-dir", str(out), *extra]
    return argv + (["--train-iters", str(iters)] if iters is not None else [])


QT = ["--enable-q-tuning", "--q-tuning-sample-keep-ratio", "0.5",
      "--q-tuning-token-keep-ratio", "0.7"]
REFILL = [*QT, "--q-tuning-batch-policy", "refill"]
HOOK = ["--rollout-data-postprocess-path", "tests.workers.trainer.record_hook"]


@pytest.fixture(scope="module")
def single(assets, tmp_path_factory):
    """Every 1-process scenario, run in one spawned process."""
    from tests.workers import trainer as W_trainer

    out = tmp_path_factory.mktemp("single")
    runs = [
        ("plain", _argv(assets, out / "plain", "--export-hf", str(out / "plain" / "hf"), *HOOK)),
        ("qt", _argv(assets, out / "qt", *QT, *HOOK)),
        ("refill", _argv(assets, out / "refill", *REFILL, gbs=4)),
        ("epochs", _argv(assets, out / "epochs", "--num-epochs", "1", "--use-dynamic-batch-size",
                         "--max-tokens-per-gpu", "160", *QT, gbs=16, iters=None)),
        # regression: InfoBatch's final full-data phase never came with --num-epochs
        ("infobatch_epochs", _argv(assets, out / "infobatch_epochs", "--num-epochs", "1",
                                   "--enable-q-tuning", "--q-tuning-strategy", "infobatch",
                                   "--q-tuning-infobatch-prune-ratio", "0.9",
                                   "--q-tuning-infobatch-anneal", "0.5", gbs=16, iters=None)),
        # bad input
        ("missing_data", _argv(assets, out / "e1", "--export-hf", str(out / "e1" / "hf"),
                               data=str(out / "nope.jsonl"))),
        ("bad_json", _argv(assets, out / "e2", "--export-hf", str(out / "e2" / "hf"),
                           data=assets["bad"])),
        ("gpt2", _argv(assets, out / "e3", model="gpt2")),
        ("tp_world", _argv(assets, out / "e4", "--tensor-model-parallel-size", "2")),
        ("bad_hook", _argv(assets, out / "e6", *QT, "--rollout-data-postprocess-path",
                           "tests.workers.trainer.no_such_hook")),
        ("incompatible", _argv(assets, out / "e5", "--load", str(out / "plain" / "checkpoints"),
                               "--export-hf", str(out / "e5" / "hf"), model="llama3layers")),
    ]
    return out, run_distributed(W_trainer.run_many, 1, runs, timeout=TIMEOUT)[0]


@pytest.fixture(scope="module")
def double(assets, tmp_path_factory, single):
    """Every 2-process scenario, run in one spawn of 2 processes."""
    from tests.workers import trainer as W_trainer

    out = tmp_path_factory.mktemp("double")
    resume = [*REFILL, "--use-distributed-optimizer"]
    runs = [
        ("dp2_qt", _argv(assets, out / "dp2", *QT)),
        ("tp2_qt", _argv(assets, out / "tp2", *QT, "--tensor-model-parallel-size", "2")),
        ("pp2_refill", _argv(assets, out / "pp2", *REFILL, "--pipeline-model-parallel-size", "2",
                             gbs=4)),
        ("full", _argv(assets, out / "full", *resume, "--export-hf", str(out / "full" / "hf"),
                       iters=4)),
        ("first_half", _argv(assets, out / "half", *resume, "--exit-interval", "2", iters=4)),
        ("second_half", _argv(assets, out / "half", *resume, "--load",
                              str(out / "half" / "checkpoints"),
                              "--export-hf", str(out / "half" / "hf"), iters=4)),
        # bad input
        ("vpp_layers", _argv(assets, out / "e1", "--pipeline-model-parallel-size", "2",
                             "--virtual-pipeline-model-parallel-size", "2")),
        ("distopt_tp", _argv(assets, out / "e2", *resume, "--tensor-model-parallel-size", "2",
                             "--load", str(out / "full" / "checkpoints"), iters=4)),
    ]
    return out, run_distributed(W_trainer.run_many, 2, runs, timeout=TIMEOUT)[0]


def _ok(results: dict, name: str) -> list[dict]:
    assert results[name]["error"] is None, f"{name}: {results[name]['error']}"
    return results[name]["history"]


def _losses(history: list[dict]) -> np.ndarray:
    return np.array([h["loss"] for h in history])


# --- 1 process -----------------------------------------------------------------------------------

@pytest.mark.next_stack
def test_one_process_without_q_tuning(single):
    out, results = single
    history = _ok(results, "plain")
    assert [h["iteration"] for h in history] == [1, 2, 3]
    assert all(h["samples"] == G and h["q_tuning"] is None for h in history)
    assert np.isfinite(_losses(history)).all() and history[-1]["loss"] < history[0]["loss"]
    log = (out / "plain" / "train.log").read_text()
    assert "[Q-Tuning]" not in log
    assert "1 skipped (no assistant turn)" in log  # the record without an assistant turn
    assert "loading weights from" in log and "done in" in log  # the progress indicator
    # hook: every step before the gradient step; without Q-Tuning it gets the whole batch
    # one numbering everywhere (regression: hooks got 0-based ids, metrics 1-based iterations)
    assert [c["rollout_id"] for c in results["plain"]["hook"]] == [h["iteration"] for h in history]
    assert all(c["samples"] == G and c["fields"] == ["loss_masks", "sample_index", "tokens"]
               for c in results["plain"]["hook"])
    # checkpoint (atomic: tracker last, no temporary folder) and HF export
    ckpt = out / "plain" / "checkpoints"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000003",
                                                     "latest_checkpointed_iteration.txt"]
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out / "plain" / "hf")
    assert model.config.num_hidden_layers == 2


@pytest.mark.next_stack
def test_one_process_with_q_tuning(single):
    out, results = single
    history = _ok(results, "qt")
    log = (out / "qt" / "train.log").read_text()
    for step in history:
        report = step["q_tuning"]
        assert report["total_samples"] == G and report["kept_samples"] == G // 2
        assert step["samples"] == report["kept_samples"]  # trained = kept
        assert step["loss_tokens"] == report["kept_tokens"]
        assert f"[Q-Tuning] Kept {G // 2}/{G} samples" in log
    assert log.count("[Q-Tuning] Quadrant distribution:") == ITERS
    # the pruner runs the hooks after its decision: every scored sample, marked kept or not
    hook = results["qt"]["hook"]
    assert [(c["rollout_id"], c["samples"], c["kept"]) for c in hook] == \
        [(i, G, G // 2) for i in range(1, ITERS + 1)]
    assert [step["q_tuning"]["step"] for step in history] == [h["iteration"] for h in history]
    assert {"quadrants", "sample_ppls", "sample_entropies", "kept"} <= set(hook[0]["fields"])
    # TensorBoard scalars of the step metrics and of the Q-Tuning report
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "qt" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_second", "train/trained_samples",
            "train/grad_norm", "q_tuning/kept_samples", "q_tuning/fraction/Q2"} <= tags
    assert [e.value for e in events.Scalars("q_tuning/kept_samples")] == [G // 2] * ITERS


def test_refill_trains_full_batches_and_epochs_set_iterations(single):
    _, results = single
    refill = _ok(results, "refill")
    assert all(h["q_tuning"]["total_samples"] == 8 and h["samples"] == 4 for h in refill)
    assert [h["consumed_samples"] for h in refill] == [8, 16, 24]
    # --num-epochs 1 with 41 trainable samples and 16 per step: floor(41 / 16) = 2 iterations
    # (rows packed up to --max-tokens-per-gpu here)
    epochs = _ok(results, "epochs")
    assert [h["iteration"] for h in epochs] == [1, 2]
    assert all(h["samples"] == 8 and h["loss_tokens"] == h["q_tuning"]["kept_tokens"]
               for h in epochs)
    # InfoBatch anneals over the run's last half, also when --num-epochs sets the length
    infobatch = _ok(results, "infobatch_epochs")
    assert [h["iteration"] for h in infobatch] == [1, 2]
    assert infobatch[0]["samples"] < 16 and infobatch[1]["samples"] == 16


# --- 2 processes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, reference", [("dp2_qt", "qt"), ("tp2_qt", "qt"),
                                             ("pp2_refill", "refill")])
def test_two_processes_reproduce_one(single, double, name, reference):
    one, two = _ok(single[1], reference), _ok(double[1], name)
    assert [h["q_tuning"]["quadrant_counts"] for h in two] == \
        [h["q_tuning"]["quadrant_counts"] for h in one]
    assert [h["samples"] for h in two] == [h["samples"] for h in one]
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-4)


def test_resume_is_bitwise_identical(double):
    out, results = double
    full, first, second = (_ok(results, n) for n in ("full", "first_half", "second_half"))
    assert [h["iteration"] for h in first] == [1, 2]
    assert [h["iteration"] for h in second] == [3, 4]
    assert _losses(first + second).tolist() == _losses(full).tolist()
    assert [h["lr"] for h in first + second] == [h["lr"] for h in full]
    weights = [(out / d / "hf" / "model.safetensors").read_bytes() for d in ("full", "half")]
    assert weights[0] == weights[1]


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.next_stack
@pytest.mark.parametrize("name, message", [
    ("missing_data", "nope.jsonl' not found"),
    ("bad_json", "bad.jsonl:2: malformed JSON"),
    ("gpt2", "unsupported HF architecture GPT2LMHeadModel"),
    ("tp_world", "world size (1 processes) is not divisible by tensor x pipeline x context"),
    ("incompatible", "num_layers: 2 in the checkpoint, 3 here"),
    ("bad_hook", "'tests.workers.trainer' has no attribute 'no_such_hook'"),
])
def test_bad_input_one_process(single, name, message):
    out, results = single
    error = results[name]["error"]
    assert error is not None and message in error, error
    for folder in (f"e{i}" for i in range(1, 7)):  # nothing that looks finished
        assert not (out / folder / "hf").exists()
        assert not (out / folder / "checkpoints").exists()


@pytest.mark.parametrize("name, message", [
    ("vpp_layers", "num_hidden_layers (2) is not divisible by"),  # pp 2 x vpp 2 (model.py words)
    ("distopt_tp", "tensor-parallel size 1 in the checkpoint, 2 here"),
])
def test_bad_input_two_processes(double, name, message):
    error = double[1][name]["error"]
    assert error is not None and message in error, error


def _env() -> dict:
    return {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def test_cli_error_is_one_line_with_status_2(assets, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "q_tuning.sft.train",
                           *_argv(assets, tmp_path / "out", model="gpt2")],
                          capture_output=True, text=True, timeout=TIMEOUT, env=_env(), cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "q-tuning-train: error: unsupported HF architecture GPT2LMHeadModel" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- Ray -----------------------------------------------------------------------------------------

def test_ray_launcher_two_processes(assets, single, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    proc = subprocess.run(
        [sys.executable, "-m", "q_tuning.sft.train.ray_launcher", "--ray-num-cpus", "2",
         "--actor-num-nodes", "1", "--actor-num-gpus-per-node", "2", *_argv(assets, out, *QT)],
        capture_output=True, text=True, timeout=TIMEOUT, env=_env(), cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    log = (out / "train.log").read_text()
    assert "2 data-parallel rank(s)" in log
    assert log.count(f"[Q-Tuning] Kept {G // 2}/{G} samples") == ITERS
    # same global decision and loss as one process (the log prints 4 decimals)
    one = _ok(single[1], "qt")
    for h in one:
        assert f"iteration {h['iteration']:5d}/{ITERS:5d} | loss {h['loss']:.4f}" in log
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
