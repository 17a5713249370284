"""`q-tuning-eval --task qa-exact`: closed-book short answers, greedy, exact match.

Each row's `prompt` is the whole user turn (the data carries its own instruction); the model's
chat template and assistant header are applied as for every generation prompt
(`evaluate.prompt_ids`). Decoding is greedy through the same pool as GSM (`decoding.decode_pool`)
and stops at end of turn, at the first newline after some text, or after `--max-new-tokens`
(default 16). The answer is the first non-empty line of the generated text.

Exact match: `normalize_answer(answer) == normalize_answer(reference)` for any of the row's
references (SQuAD's normalisation: lowercase; punctuation deleted; the articles a, an, the
removed; whitespace collapsed). A row may give the `stem`, the sentence its answer completes:
an answer that repeats it ("The capital of France is Paris." for the stem "The capital of France
is") is compared without it, as small chat models answer in whole sentences. Also recorded, not
the headline: `contains`, the normalised reference appears as whole words inside the normalised
answer.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Sequence

import torch

from q_tuning.sft.evaluate.tasks.rows import QaRow

__all__ = ["QA_MAX_NEW_TOKENS", "answer_line", "generate_answers", "normalize_answer",
           "score_answer", "summarize_qa"]

QA_MAX_NEW_TOKENS = 16
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, delete punctuation (any Unicode punctuation: "U.S.A."
    -> "usa"), drop the words a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_line(generated: str) -> str:
    """The first non-empty line of the generated text, stripped."""
    return next((line.strip() for line in generated.splitlines() if line.strip()), "")


def score_answer(answer: str, references: Sequence[str], stem: str = "") -> tuple[bool, bool]:
    """(exact, contains) against any reference, after `normalize_answer` and, when the answer
    starts with the normalised `stem` (whole words), without it."""
    got, start = normalize_answer(answer), normalize_answer(stem)
    if start and (got == start or got.startswith(start + " ")):
        got = got[len(start):].strip()
    refs = [normalize_answer(r) for r in references]
    exact = any(got == r for r in refs)
    contains = any(r and f" {r} " in f" {got} " for r in refs)
    return exact, contains


@torch.inference_mode()
def generate_answers(model, tokenizer, rows: Sequence[QaRow], *, max_new_tokens: int,
                     batch_size: int) -> list[list[int]]:
    """Greedy new token ids per row, in row order."""
    from q_tuning.sft.evaluate.decoding import decode_pool, prefill
    from q_tuning.sft.evaluate.cli import JOIN_ROWS, end_of_turn_ids, prompt_ids

    prompts = [prompt_ids(tokenizer, row.prompt) for row in rows]
    eos = end_of_turn_ids(tokenizer)

    def finished(new: list[int]) -> bool:
        # a newline after some text ends the answer line
        return (new[-1] in eos or len(new) >= max_new_tokens
                or "\n" in tokenizer.decode(new).lstrip())

    out: list[list[int]] = [[] for _ in rows]
    decode_pool(model, sorted(range(len(prompts)), key=lambda i: len(prompts[i])), out,
                admit=lambda group: prefill(model, prompts, group), batch_size=batch_size,
                join_rows=JOIN_ROWS, finished=finished)
    return out


def summarize_qa(tokenizer, rows: Sequence[QaRow], generated: Sequence[list[int]],
                 max_new_tokens: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    records = []
    for row, new in zip(rows, generated):
        text = tokenizer.decode(new, skip_special_tokens=True)
        exact, contains = score_answer(answer_line(text), row.references, row.stem)
        records.append({"id": row.id, "references": list(row.references),
                        "answer": answer_line(text), "exact": exact, "contains": contains,
                        "generated": text, "generated_tokens": len(new)})
    exact = sum(r["exact"] for r in records)
    summary = {"task": "qa-exact", "num_samples": len(records), "correct": exact,
               "accuracy": exact / len(records),
               "contains": sum(r["contains"] for r in records) / len(records),
               "max_new_tokens": max_new_tokens,
               "generated_tokens": sum(r["generated_tokens"] for r in records),
               "per_item": {"exact": [int(r["exact"]) for r in records],
                            "contains": [int(r["contains"]) for r in records]}}
    return summary, records
