"""`q-tuning-eval --task`: the evaluation tasks besides GSM (`q_tuning.sft.evaluate.cli`).

    --task gsm        GSM exact match and reference NLL (the default; `evaluate.evaluate`)
    --task mmlu       zero-shot multiple choice by log-likelihood (`tasks.mmlu`)
    --task qa-exact   closed-book short answers, greedy, normalised exact match (`tasks.qa`)
    --task nll        mean per-token NLL of each row's response given its prompt (`tasks.nll`)

Every task writes a summary (`--output`) whose `per_item` lists each item's outcome in row
order (for paired comparisons), and one record per item (`--predictions`).

Public API:
    TASKS, add_task_args(parser), check_task_args(parser, args), run_task(args, checkpoint),
    task_line(summary), write_task_outputs(args, summary, records)
"""

from __future__ import annotations

import argparse
from typing import Any

from q_tuning.config import positive_int

__all__ = ["TASKS", "add_task_args", "check_task_args", "run_task", "task_line",
           "write_task_outputs"]

TASKS = ("gsm", "mmlu", "qa-exact", "nll")
GSM_MAX_NEW_TOKENS = 256


def add_task_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=TASKS, default="gsm",
                        help="what to evaluate (default gsm; the rows each task reads are in "
                             "q_tuning.sft.evaluate.tasks.rows)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help=f"gsm and qa-exact: generation limit (default {GSM_MAX_NEW_TOKENS} "
                             "for gsm, 16 for qa-exact)")
    parser.add_argument("--mmlu-continuation", choices=("letter", "text"), default=None,
                        help="mmlu: score each choice's letter (default) or its text")


def check_task_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flags that do not apply to the chosen task are errors (at parse time); then the task's
    defaults are filled in."""
    from q_tuning.sft.evaluate.tasks.qa import QA_MAX_NEW_TOKENS

    if args.max_new_tokens is not None and args.task not in ("gsm", "qa-exact"):
        parser.error(f"--max-new-tokens: --task {args.task} generates nothing")
    if args.mmlu_continuation is not None and args.task != "mmlu":
        parser.error(f"--mmlu-continuation: only for --task mmlu, not --task {args.task}")
    if args.max_new_tokens is None:
        args.max_new_tokens = QA_MAX_NEW_TOKENS if args.task == "qa-exact" else GSM_MAX_NEW_TOKENS
    if args.task == "mmlu" and args.mmlu_continuation is None:
        args.mmlu_continuation = "letter"


def run_task(args: argparse.Namespace, checkpoint: str) -> tuple[dict[str, Any], list[dict]]:
    """(summary, per-item records) of `args.task` (not gsm) on `args.data_path`."""
    import time

    from q_tuning.sft.evaluate.tasks import mmlu, nll, qa, rows
    from q_tuning.sft.evaluate.cli import load_model

    read = {"mmlu": rows.read_mmlu, "qa-exact": rows.read_qa, "nll": rows.read_pairs}
    data = read[args.task](args.data_path, args.num_samples)  # bad rows fail before the model
    model, tokenizer = load_model(checkpoint)
    start = time.perf_counter()
    if args.task == "mmlu":
        items = mmlu.score_mmlu(model, tokenizer, data, continuation=args.mmlu_continuation,
                                batch_size=args.batch_size)
        summary, records = mmlu.summarize_mmlu(data, items, args.mmlu_continuation)
    elif args.task == "qa-exact":
        generated = qa.generate_answers(model, tokenizer, data,
                                        max_new_tokens=args.max_new_tokens,
                                        batch_size=args.batch_size)
        summary, records = qa.summarize_qa(tokenizer, data, generated, args.max_new_tokens)
    else:
        summary, records = nll.evaluate_nll(model, tokenizer, data, batch_size=args.batch_size)
    summary.update(checkpoint=str(checkpoint), data_path=str(args.data_path),
                   batch_size=args.batch_size, seconds=time.perf_counter() - start)
    return summary, records


def write_task_outputs(args: argparse.Namespace, summary: dict[str, Any],
                       records: list[dict]) -> None:
    """`--output` (the summary), `--predictions` (one record per item), and the result line."""
    import json

    from q_tuning._files import write_text_atomic

    if args.output:
        write_text_atomic(args.output, json.dumps(summary, indent=1))
    if args.predictions:
        write_text_atomic(args.predictions, "".join(json.dumps(r) + "\n" for r in records))
    print(f"q-tuning-eval: --task {args.task}: {task_line(summary)}", flush=True)


def task_line(summary: dict[str, Any]) -> str:
    """The one-line result a run prints."""
    n = summary["num_samples"]
    if summary["task"] == "nll":
        return (f"held-out NLL {summary['nll_per_token']:.4f}/token over {n} rows "
                f"({summary['loss_tokens']} tokens), {summary['seconds']:.0f} s")
    extra = f", contains {100 * summary['contains']:.1f}%" if summary["task"] == "qa-exact" else ""
    return (f"{summary['correct']}/{n} right ({100 * summary['accuracy']:.1f}%){extra}, "
            f"{summary['seconds']:.0f} s")
