"""experiments/leg_counting/leg_grid.py end to end in --tiny mode (every setting trains, evaluates and is recorded;
the tables follow from the records; a rerun resumes), and the leg-counting data with its noise."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("reasoning_gym")

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "leg_counting" / "leg_grid.py"


def _grid(out: pathlib.Path, *extra: str) -> str:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--results",
                           str(out / "results"), "--tiny", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("leg")
    return out, _grid(out)


def test_every_setting_is_recorded_and_tabled(grid):
    out, stdout = grid
    sys.path.insert(0, str(REPO / "experiments" / "leg_counting"))
    import leg_grid

    tables = (out / "results" / "tables.md").read_text()
    assert tables in stdout
    for setting in leg_grid.SETTINGS:
        record = json.loads((out / "results" / f"{setting}_seed1.json").read_text())
        assert len(record["problems"]["correct"]) == record["eval"]["num_samples"] == 4
        assert f"| {setting} | 1 |" in tables
        trained = leg_grid.SETTINGS[setting] is not None
        assert (record["compute"] is not None) == trained
        # the weights go once the record is written
        assert not (out / "runs" / setting / "seed1" / "train" / "hf").exists()
    q = json.loads((out / "results" / "qtuning_25x70_seed1.json").read_text())
    kept = sum(sum(c["kept"]) for kind in q["mechanism"]["quadrants"].values()
               for c in kind.values())
    assert kept == q["compute"]["trained_samples"]  # the hook saw every trained sample
    assert sum(q["mechanism"]["trained_loss_tokens"].values()) == q["compute"]["loss_tokens"]
    assert "qtuning_25x70 - random_25x70 | 1 |" in tables


def test_a_rerun_resumes_from_the_records(grid):
    out, _ = grid
    stdout = _grid(out)
    assert ": training" not in stdout and stdout.count("finished earlier, skipped") == 10


def test_leg_data_noise_is_recorded_and_consistent():
    from experiments.leg_counting.leg_counting import build_leg_splits, line_accuracy, render_response

    train, held_out = build_leg_splits(40, 20, seed=0)
    assert [r["noise"] for r in train].count("misaligned") == 4
    assert [r["noise"] for r in train].count("arithmetic") == 4
    assert all(r["noise"] == "clean" for r in held_out)
    assert not {r["question"] for r in train} & {r["question"] for r in held_out}
    for r in train:
        total = int(r["response"].rsplit("#### ", 1)[1])
        if r["noise"] == "clean":
            assert r["response"] == render_response(r["animals"]) and str(total) == r["answer"]
            assert line_accuracy(r["response"], r["lines"]) == (len(r["lines"]),) * 2
        if r["noise"] == "arithmetic":  # consistently wrong: the total adds the wrong products
            products = [int(line.rsplit("= ", 1)[1]) for line in r["response"].splitlines()[:-2]]
            assert sum(products) == total and line_accuracy(r["response"], r["lines"])[0] < len(
                r["lines"])
        if r["noise"] == "misaligned":
            assert r["response"] != render_response(r["animals"])
