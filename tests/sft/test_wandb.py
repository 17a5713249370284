"""W&B and the shared dashboard writers (q_tuning.observe.writers).

- the trainer's --wandb-* flags (Megatron-LM's names): errors at parse time naming the flag;
- a tiny `q-tuning-train` run with --wandb-project under WANDB_MODE=offline (no network): the
  offline run file, read back record by record (tests/harness/wandb_offline.py), holds the step
  metrics and Q-Tuning's scalars with the values of each step's StepReport, the EU-plane image
  where --wandb-eu-plane-every asks, and TensorBoard got the very same scalars;
- the Megatron-LM adapter: the scalars reach the writers Megatron-LM set up (fake writers in a
  stand-in `megatron.training.global_vars`), on its last rank only, at Megatron's iteration.
"""

from __future__ import annotations

import importlib.util
import math

import pytest

from q_tuning.sft.train.arguments import parse_args
from tests.harness import megatron_lm as H
from tests.harness.launch import run_distributed

pytest.importorskip("transformers")
wandb = pytest.importorskip("wandb")

TIMEOUT = 420
ITERS = 3
G = 8
BASE = ["--hf-checkpoint", "m", "--data-path", "d.jsonl", "--global-batch-size", "8",
        "--train-iters", "1"]


# --- flags ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--wandb-exp-name", "x"], "--wandb-exp-name: only with --wandb-project"),
    (["--wandb-entity", "e", "--wandb-save-dir", "s"],
     "--wandb-save-dir, --wandb-entity: only with --wandb-project"),
    (["--wandb-project", "p"], "--wandb-project needs --wandb-save-dir"),
    (["--wandb-project", "p", "--output-dir", "o", "--wandb-eu-plane-every", "-1"],
     "--wandb-eu-plane-every must be >= 0"),
])
def test_flag_errors_name_the_flag(extra, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(BASE + extra)
    assert message in capsys.readouterr().err


def test_save_dir_defaults_under_output_dir_then_save():
    assert parse_args(BASE + ["--wandb-project", "p", "--output-dir", "o"]).wandb_save_dir \
        == "o/wandb"
    assert parse_args(BASE + ["--wandb-project", "p", "--save", "ck"]).wandb_save_dir \
        == "ck/wandb"
    assert parse_args(BASE + ["--wandb-project", "p", "--output-dir", "o",
                              "--wandb-save-dir", "w"]).wandb_save_dir == "w"


def test_without_wandb_installed_the_flag_is_a_start_up_error(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--wandb-project", "p", "--output-dir", "o"])
    err = capsys.readouterr().err
    assert "--wandb-project needs the wandb package" in err and "q-tuning[wandb]" in err


# --- the trainer, offline ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tests.workers import trainer as W_trainer

    return W_trainer.make_assets(str(tmp_path_factory.mktemp("wandb_assets")),
                                 str(tmp_path_factory.getbasetemp() / "q_tuning_cache"))


def _train(assets, out, world: int, iters: int) -> list:
    """`q-tuning-train` with W&B offline on `world` processes; each rank's history."""
    from tests.workers import trainer as W_trainer

    argv = ["--hf-checkpoint", assets["llama"], "--data-path", assets["data"],
            "--global-batch-size", str(G), "--micro-batch-size", "2", "--seq-length", "64",
            "--lr", "1e-3", "--seed", "7", "--train-iters", str(iters), "--no-save",
            "--output-dir", str(out), "--enable-q-tuning", "--q-tuning-sample-keep-ratio", "0.5",
            "--q-tuning-token-keep-ratio", "0.7", "--wandb-project", "q-tuning-test",
            "--wandb-exp-name", "tiny", "--wandb-eu-plane-every", "2"]
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")  # the spawned ranks inherit it: no network
    mp.setenv("WANDB_SILENT", "true")
    try:
        results = run_distributed(W_trainer.run_many, world, [("wandb", argv)], timeout=TIMEOUT)
    finally:
        mp.undo()
    for r in results:
        assert r["wandb"]["error"] is None, r["wandb"]["error"]
    return [r["wandb"]["history"] for r in results]


@pytest.fixture(scope="module")
def offline_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("wandb") / "run"
    (history,) = _train(assets, out, 1, ITERS)
    return out, history


def test_two_processes_write_one_run_from_rank_zero(assets, tmp_path):
    from tests.harness.wandb_offline import history, offline_run_file

    _train(assets, tmp_path / "run", 2, 1)
    rows = history(offline_run_file(tmp_path / "run" / "wandb"))  # asserts there is one run
    assert [row["_step"] for row in rows if "q_tuning/kept_samples" in row] == [1]


def _by_step(rows: list[dict]) -> dict[int, dict]:
    """W&B history rows merged per step (one `log` call per writer call)."""
    merged: dict[int, dict] = {}
    for row in rows:
        merged.setdefault(row["_step"], {}).update(row)
    return merged


def test_offline_run_holds_the_q_tuning_scalars_of_every_step(offline_run):
    from tests.harness.wandb_offline import history, offline_run_file, run_info

    out, metrics = offline_run
    path = offline_run_file(out / "wandb")
    info = run_info(path)
    assert (info.project, info.display_name) == ("q-tuning-test", "tiny")
    steps = _by_step(history(path))
    assert sorted(steps) == list(range(1, ITERS + 1))
    for m in metrics:
        row, report = steps[m["iteration"]], m["q_tuning"]  # report: StepReport.to_json()
        total = report["total_samples"]
        expected = {"kept_samples": report["kept_samples"], "kept_tokens": report["kept_tokens"],
                    "total_samples": total, "total_tokens": report["total_tokens"],
                    "level": report["level"], "scoring_seconds": report["scoring_seconds"],
                    "kept_sample_fraction": report["kept_samples"] / total,
                    "threshold/q2_ppl_floor": report["thresholds"]["q2_ppl_floor"]}
        for q, count in report["quadrant_counts"].items():
            expected[f"count/{q}"] = count
            expected[f"fraction/{q}"] = count / total
            expected[f"kept_count/{q}"] = report["kept_quadrant_counts"][q]
        for tag, value in expected.items():
            assert row[f"q_tuning/{tag}"] == pytest.approx(value, rel=1e-12), tag
        assert report["kept_samples"] == G // 2
        assert row["train/loss"] == pytest.approx(m["loss"], rel=1e-12)
        assert row["train/lr"] == pytest.approx(m["lr"], rel=1e-12)
        assert row["train/samples"] == m["samples"] == report["kept_samples"]
        # --wandb-eu-plane-every 2: the EU-plane image at step 1 and 2, not 3
        assert ("q_tuning/eu_plane/_type" in row) == (m["iteration"] in (1, 2))
    images = list((path.parent / "files" / "media").rglob("eu_plane_*.png"))
    assert len(images) == 2


def test_tensorboard_gets_the_same_scalars(offline_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.harness.wandb_offline import history, offline_run_file

    out, _ = offline_run
    steps = _by_step(history(offline_run_file(out / "wandb")))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    wandb_tags = {k for row in steps.values() for k in row
                  if k.startswith(("train/", "q_tuning/")) and "/eu_plane" not in k
                  and "/log_ppl" not in k and "/entropy/" not in k}
    assert tags == wandb_tags
    for tag in tags:
        for event in events.Scalars(tag):  # TensorBoard keeps float32
            assert math.isclose(event.value, steps[event.step][tag], rel_tol=1e-6,
                                abs_tol=1e-30), tag


# --- Megatron-LM's own writers -------------------------------------------------------------------

def test_megatron_lm_writers_get_the_scalars_on_the_last_rank_at_megatrons_iteration():
    """PP=2: Megatron-LM sets its writers up on the last rank; the adapter's steps at Megatron's
    0-based iterations 4 and 5 log at iterations 5 and 6 (Megatron's `training_log` numbering)."""
    results = run_distributed(H.writers_worker, 2, 2, [4, 5], timeout=300)
    first, last = sorted(results, key=lambda r: r["rank"])
    assert first["tensorboard"] is None and first["wandb"] is None
    assert first["decisions"] == last["decisions"]
    by_step: dict[int, dict] = {}
    for tag, value, step in last["tensorboard"]:
        by_step.setdefault(step, {})[tag] = value
    assert sorted(by_step) == [5, 6]
    assert [step for _, step in last["wandb"]] == [5, 6]
    for (logged, step), decision in zip(last["wandb"], last["decisions"]):
        assert logged == by_step[step]  # the same scalars in both
        total = len(decision["quadrant"])
        assert logged["q_tuning/kept_samples"] == decision["kept"] == total // 2
        assert logged["q_tuning/total_samples"] == total
        assert logged["q_tuning/level"] == pytest.approx(decision["level"], rel=1e-12)
        for q in range(1, 5):
            assert logged[f"q_tuning/count/Q{q}"] == decision["quadrant"].count(q)
