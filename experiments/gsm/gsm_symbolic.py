"""GSM-Symbolic SFT data from reasoning-gym: a training set (optionally with corrupted answers)
and a disjoint held-out set, as prompt/response JSONL.

Public API:
    INSTRUCTION
    make_prompt(question) -> str
    build_gsm_splits(train_size, eval_size, *, seed=0, corrupt_fraction=0.0) -> (train, eval)
    unique_problems(rg_seed, n, seen, task="gsm_symbolic", **options) -> [(index, item)]
    write_jsonl_atomic(path, rows)
    main(argv=None)

    python -m experiments.gsm.gsm_symbolic --train-size 512 --eval-size 300 \\
        --corrupt-fraction 0.1 --seed 0 --out-dir data/gsm

Rows: {"prompt", "response", "answer", "question", "corrupted", "id"}. `response` is
reasoning-gym's worked solution with its last line normalised to "#### <answer>"; `answer` is
always the true answer. In a corrupted row (exactly round(corrupt_fraction * train_size) rows
of the training set, chosen from the seed) only that last line is wrong: label noise that
Q-Tuning should learn to prune. Held-out rows are never corrupted.

Disjointness: problem i of a reasoning-gym set with seed s is drawn from Random(s + i), so the
two splits use seeds 2 * 10**7 apart (train: 2*seed*10**7, held-out: that + 10**7) and,
as templates with small number ranges repeat, questions are also de-duplicated by text within
and across splits. The held-out set depends only on (seed, eval_size) and is a prefix-stable
sequence: --eval-size 300 gives the first 300 problems of --eval-size 500.
"""

from __future__ import annotations

import argparse
import decimal
import json
import math
import os
import pathlib
import random
import re
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from q_tuning._files import write_text_atomic

INSTRUCTION = ('Solve the problem step by step. End with a last line of the form '
               '"#### <answer>", where <answer> is the final number only.')
SEED_STRIDE = 10**7  # reasoning-gym problem i uses Random(seed + i): keep the splits' ranges apart
_FINAL_LINE = re.compile(r"\n####[^\n]*\Z")


def make_prompt(question: str) -> str:
    """The user turn for a question: the question, then INSTRUCTION on its own line."""
    return f"{question.strip()}\n{INSTRUCTION}"


def build_gsm_splits(train_size: int, eval_size: int, *, seed: int = 0,
                     corrupt_fraction: float = 0.0) -> tuple[list[dict], list[dict]]:
    """Generate (train_rows, eval_rows); deterministic in (arguments); see the module docstring."""
    for name, value in (("--train-size", train_size), ("--eval-size", eval_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {seed!r}")
    if not 0.0 <= corrupt_fraction <= 1.0:
        raise ValueError(f"--corrupt-fraction must be in [0, 1], got {corrupt_fraction!r}")

    train_seed = 2 * seed * SEED_STRIDE
    eval_seed = train_seed + SEED_STRIDE
    seen: set[str] = set()
    eval_rows = [_row(item, eval_seed, idx)
                 for idx, item in unique_problems(eval_seed, eval_size, seen)]
    train_rows = [_row(item, train_seed, idx)
                  for idx, item in unique_problems(train_seed, train_size, seen)]

    rng = random.Random(f"q_tuning.gsm_symbolic.corrupt:{seed}")
    n_corrupt = math.floor(corrupt_fraction * train_size + 0.5)
    for i in rng.sample(range(train_size), n_corrupt):
        row = train_rows[i]
        wrong = _wrong_answer(row["answer"], rng)
        row["response"] = _FINAL_LINE.sub(f"\n#### {wrong}", row["response"])
        row["corrupted"] = True
    return train_rows, eval_rows


def _question_key(question: str) -> str:
    return " ".join(question.split()).lower()


def unique_problems(rg_seed: int, n: int, seen: set[str], task: str = "gsm_symbolic",
                    **options: Any) -> list[tuple[int, dict]]:
    """The first n problems of the reasoning-gym set `task` (seed `rg_seed`, `options`) whose
    question is not in `seen` (which is updated). Items depend only on (rg_seed, index), so
    growing the set is safe."""
    import reasoning_gym

    if n == 0:
        return []
    size = n + n // 4 + 16
    while True:
        dataset = reasoning_gym.create_dataset(task, size=size, seed=rg_seed, **options)
        taken, keys = [], set()
        for idx in range(size):
            item = dataset[idx]
            key = _question_key(item["question"])
            if key in seen or key in keys:
                continue
            keys.add(key)
            taken.append((idx, item))
            if len(taken) == n:
                seen.update(keys)
                return taken
        if size > 20 * n + 1000:
            raise RuntimeError(f"reasoning-gym {task} (seed {rg_seed}) gave only "
                               f"{len(taken)} distinct new questions out of {size}")
        size *= 2


def _row(item: dict[str, Any], rg_seed: int, idx: int) -> dict[str, Any]:
    answer = str(item["answer"]).strip()
    cot = item["metadata"]["answer_cot"].strip()
    if not _FINAL_LINE.search(cot):
        raise RuntimeError(f"gsm_symbolic problem {rg_seed}/{idx}: answer_cot does not end in a "
                           f"'#### <answer>' line: {cot[-80:]!r}")
    # reasoning-gym writes some final lines as "#### 14.0" where `answer` is "14".
    response = _FINAL_LINE.sub(f"\n#### {answer}", cot)
    return {"prompt": make_prompt(item["question"]), "response": response, "answer": answer,
            "question": item["question"], "corrupted": False, "id": f"gsm_symbolic/{rg_seed}/{idx}"}


def _wrong_answer(answer: str, rng: random.Random) -> str:
    """answer +- 1..10, never negative, never equal to the answer."""
    value = decimal.Decimal(answer)
    delta = rng.randint(1, 10)
    wrong = value - delta if rng.random() < 0.5 and value - delta >= 0 else value + delta
    return str(wrong)


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows as JSONL to a temporary file beside `path`, then rename it into place."""
    write_text_atomic(path, (json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.gsm.gsm_symbolic",
        description="Build GSM-Symbolic SFT JSONL (training + disjoint held-out) "
                    "with reasoning-gym.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--eval-size", type=int, default=300)
    parser.add_argument("--corrupt-fraction", type=float, default=0.1,
                        help="share of training rows whose final answer is made wrong")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="data/gsm",
                        help="writes train.jsonl, eval.jsonl and meta.json here")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        train_rows, eval_rows = build_gsm_splits(args.train_size, args.eval_size, seed=args.seed,
                                                 corrupt_fraction=args.corrupt_fraction)
    except ValueError as e:
        parser.error(str(e))
    seconds = time.perf_counter() - start
    out = pathlib.Path(args.out_dir)
    write_jsonl_atomic(out / "train.jsonl", train_rows)
    write_jsonl_atomic(out / "eval.jsonl", eval_rows)
    meta = {**vars(args), "corrupted": sum(r["corrupted"] for r in train_rows),
            "generation_seconds": round(seconds, 3)}
    write_jsonl_atomic(out / "meta.json", [meta])
    print(f"wrote {len(train_rows)} training rows ({meta['corrupted']} corrupted) to "
          f"{out / 'train.jsonl'} and {len(eval_rows)} held-out rows to {out / 'eval.jsonl'} "
          f"in {seconds:.2f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
