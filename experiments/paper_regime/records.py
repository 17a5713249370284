"""Records of the paper-regime grid: one JSON per finished run (setting, seed), the resumable
state of the grid and all its tables need.

    run_record(setting, seed, run_dir, ...) -> dict   from a run folder's q-tuning-eval outputs
    read_records(results) -> {setting: {seed: record}}
    check_commit(results, commit), check_data(data, names)
    write_tiny_data(folder) -> folder                 made-up data for --tiny

A record: setting, seed, commit, lora, argv (the setting's trainer flags), eval (each task's
summary without its per-item lists), items (per item, in data order: mmlu_correct, qa_exact,
qa_contains, nll_sum, loss_tokens), train_seconds, eval_seconds (per task), compute
(`gsm_grid.compute_spent` of the trainer's metrics; None for zero-shot), loadavg (at the end).
"""

from __future__ import annotations

import json
import os
import pathlib

from experiments.gsm import gsm_grid

__all__ = ["check_commit", "check_data", "count_rows", "read_records", "run_record",
           "summary_line", "write_tiny_data"]


def count_rows(path: pathlib.Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def run_record(setting: str, seed: int, run_dir: pathlib.Path, *, trained: bool,
               train_seconds: float, eval_seconds: dict, commit: str, lora: bool,
               argv: list[str] | None) -> dict:
    summaries = {task: json.loads((run_dir / f"{task}.json").read_text())
                 for task in ("mmlu", "qa-exact", "nll")}
    items = {"mmlu_correct": summaries["mmlu"]["per_item"]["correct"],
             "qa_exact": summaries["qa-exact"]["per_item"]["exact"],
             "qa_contains": summaries["qa-exact"]["per_item"]["contains"],
             "nll_sum": summaries["nll"]["per_item"]["nll_sum"],
             "loss_tokens": summaries["nll"]["per_item"]["loss_tokens"]}
    for summary in summaries.values():
        summary.pop("per_item")
    return {"setting": setting, "seed": seed, "commit": commit, "lora": lora, "argv": argv,
            "eval": summaries, "items": items, "train_seconds": train_seconds,
            "eval_seconds": eval_seconds,
            "compute": gsm_grid.compute_spent(run_dir / "train" / "metrics.jsonl")
            if trained else None,
            "loadavg": os.getloadavg()}


def summary_line(record: dict) -> str:
    e = record["eval"]
    return (f"MMLU {100 * e['mmlu']['accuracy']:.1f}%, qa_wikidata exact "
            f"{100 * e['qa-exact']['accuracy']:.1f}%, NI held-out NLL "
            f"{e['nll']['nll_per_token']:.4f}")


def read_records(results: pathlib.Path) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for path in sorted(results.glob("*_seed*.json")):
        record = json.loads(path.read_text())
        out.setdefault(record["setting"], {})[record["seed"]] = record
    return out


def check_commit(results: pathlib.Path, commit: str) -> None:
    """Every record in `results` comes from `commit`, or the grid stops (a grid runs from one
    fixed commit; a new commit starts a new results folder)."""
    others = sorted({r["commit"] for runs in read_records(results).values()
                     for r in runs.values() if r.get("commit") != commit})
    if others:
        raise SystemExit(f"paper grid: {results} holds records of commit(s) {', '.join(others)}, "
                         f"this is {commit}: run from that commit's worktree, or use another "
                         "--results folder")


def check_data(data: pathlib.Path, names: list[str]) -> None:
    missing = [n for n in names if not (data / n).is_file()]
    if missing:
        raise SystemExit(f"paper grid: --data {data}: missing {', '.join(missing)} (make them "
                         "with experiments/paper_regime/prepare.py)")


def write_tiny_data(folder: pathlib.Path) -> pathlib.Path:
    """A few made-up rows of each file prepare.py writes: for --tiny (no archive needed)."""
    from experiments.gsm.gsm_symbolic import write_jsonl_atomic

    words = ["cat", "tree", "river", "stone", "cloud", "apple", "train", "music", "light",
             "chair", "bread", "ocean", "green", "paper", "glass", "night", "sugar", "field"]
    pairs = [{"prompt": f"Write the word backwards.\n\n{w}", "response": w[::-1], "id": f"tiny/{k}",
              "task": "reverse"} for k, w in enumerate(words)]
    write_jsonl_atomic(folder / "train.jsonl", pairs[:16])
    write_jsonl_atomic(folder / "ni_heldout.jsonl", pairs[16:])
    write_jsonl_atomic(folder / "mmlu.jsonl", [
        {"id": f"mmlu/{k}", "subject": "arithmetic", "question": f"What is {k} + {k}?",
         "choices": [str(2 * k), str(2 * k + 1), str(k), str(3 * k + 2)], "answer": 0}
        for k in range(4)])
    write_jsonl_atomic(folder / "qa_wikidata.jsonl", [
        {"id": f"qa/{k}", "prompt": f"Complete: the colour of {w} is", "references": ["green"]}
        for k, w in enumerate(words[:4])])
    return folder
