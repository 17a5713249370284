"""experiments/gsm/gsm_grid.py end to end in --tiny mode: every setting trains and evaluates, the table
and the compute figures follow from the runs, and a rerun resumes instead of starting over."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("reasoning_gym")

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "gsm" / "gsm_grid.py"


def _grid(out: pathlib.Path, *extra: str) -> str:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--tiny", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    return out, _grid(out)


def _result(out, setting, seed):
    return json.loads((out / "runs" / setting / f"seed{seed}" / "result.json").read_text())


def test_every_setting_ran_and_the_table_says_so(grid):
    out, stdout = grid
    table = (out / "table.md").read_text()
    assert table in stdout
    for setting in ("zero_shot", "full", "random_25x70", "qtuning_25x70", "qtuning_12.5x50",
                    "infobatch"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {setting} |"))
        assert "not evaluated" not in row
        cells = [c.strip() for c in row.split("|")]
        assert cells[2] == ("1 (seed 1)" if setting == "zero_shot" else "2 (seed 1, 2)")
        assert cells[5] == ("–" if setting == "zero_shot" else "2")
    assert not (out / "runs" / "full" / "seed1" / "train" / "checkpoints").exists()


def test_compute_figures_follow_the_keep_ratios(grid):
    out, _ = grid
    # tiny: 16 training samples, 2 steps of 8
    full = _result(out, "full", 1)["compute"]
    assert full["trained_samples"] == 16 and full["scored_samples"] == 0
    for setting, per_step in (("qtuning_25x70", 2), ("random_25x70", 2), ("qtuning_12.5x50", 1)):
        c = _result(out, setting, 1)["compute"]
        assert c["trained_samples"] == 2 * per_step, setting
        assert c["trained_tokens"] < full["trained_tokens"]
        assert c["loss_tokens"] < full["loss_tokens"]
    assert _result(out, "random_25x70", 1)["compute"]["scored_samples"] == 0
    assert _result(out, "qtuning_25x70", 1)["compute"]["scored_samples"] == 16
    info = _result(out, "infobatch", 1)["compute"]
    assert info["scored_samples"] == 16 and 0 < info["trained_samples"] <= 16
    ev = _result(out, "full", 2)["eval"]
    assert ev["num_samples"] == 4 and 0.0 <= ev["accuracy"] <= 1.0
    assert ev["nll_per_token"] > 0


def test_a_rerun_resumes(grid):
    out, _ = grid
    before = (out / "table.md").read_text()
    (out / "runs" / "infobatch" / "seed2" / "result.json").unlink()  # evaluation lost
    stdout = _grid(out)
    assert stdout.count("done earlier, skipped") == 10
    assert "infobatch seed 2: evaluating" in stdout and "infobatch seed 2: training" not in stdout
    assert (out / "table.md").read_text() == before
