"""`q-tuning-eval --task mmlu`: zero-shot multiple choice scored by log-likelihood (OpenCompass's
PPL mode), no generation.

Prompt (the user turn, rendered with the model's chat template and its assistant header, exactly
as `evaluate.prompt_ids` renders every generation prompt):

    The following is a multiple choice question about {subject}.

    {question}
    A. {choice 0}
    B. {choice 1}
    ...
    Answer with the letter of the correct choice.

What is scored, per choice, is the log-probability of a continuation of the assistant turn:
- `letter` (the default; OpenCompass's MMLU PPL template "...\\nAnswer: A"): the choice's letter,
  one token, so log p(letter | prompt) at the assistant turn's first position; one forward per
  question (`decoding.prefill`, the last position's logits), all letters read from it.
- `text` (OpenCompass's ARC PPL template "Question: ...\\nAnswer: {text}"): the prompt without
  the lettered list and without the answer-with-a-letter line, the continuation the choice's own
  text; its score is the SUM of the log-probabilities of its tokens (each predicted from the
  prompt and the text before it), one teacher-forced forward per choice
  (`evaluate.samples_nll`). The mean per token is recorded too.
No end-of-turn token is scored after the continuation. The prediction is the choice with the
highest score (ties: the first); accuracy is the share of questions predicted right.
"""

from __future__ import annotations

import string
from typing import Any, NamedTuple, Sequence

import torch

from q_tuning.sft.evaluate.rows import EvalError
from q_tuning.sft.evaluate.tasks.rows import MmluRow

__all__ = ["CONTINUATIONS", "MmluItem", "mmlu_prompt", "mmlu_sequences", "score_mmlu",
           "summarize_mmlu"]

CONTINUATIONS = ("letter", "text")
LETTERS = string.ascii_uppercase


class MmluItem(NamedTuple):
    """One question's outcome: the log-likelihood and token count of each choice's continuation,
    the predicted and right choice."""

    logprobs: list[float]
    tokens: list[int]
    predicted: int
    answer: int

    @property
    def correct(self) -> bool:
        return self.predicted == self.answer


def mmlu_prompt(row: MmluRow, continuation: str) -> str:
    subject = f" about {row.subject}" if row.subject else ""
    head = f"The following is a multiple choice question{subject}.\n\n{row.question}"
    if continuation == "text":
        return head
    options = "\n".join(f"{LETTERS[k]}. {c}" for k, c in enumerate(row.choices))
    return f"{head}\n{options}\nAnswer with the letter of the correct choice."


def mmlu_sequences(tokenizer, row: MmluRow, continuation: str
                   ) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, continuation ids per choice) as scored: the prompt through the chat template
    with the assistant header, each continuation tokenized on its own and appended."""
    from q_tuning.sft.evaluate.cli import prompt_ids

    texts = LETTERS[:len(row.choices)] if continuation == "letter" else row.choices
    conts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if any(not c for c in conts):
        raise EvalError(f"{row.source}: a choice tokenizes to nothing")
    return prompt_ids(tokenizer, mmlu_prompt(row, continuation)), conts


@torch.inference_mode()
def score_mmlu(model, tokenizer, rows: Sequence[MmluRow], *, continuation: str,
               batch_size: int) -> list[MmluItem]:
    if continuation not in CONTINUATIONS:
        raise EvalError(f"--mmlu-continuation: expected one of {CONTINUATIONS}")
    sequences = [mmlu_sequences(tokenizer, row, continuation) for row in rows]
    if continuation == "letter":
        scores = _letter_logprobs(model, sequences, batch_size)
    else:
        scores = _text_logprobs(model, tokenizer, sequences, batch_size)
    items = []
    for row, (_, conts), logprobs in zip(rows, sequences, scores):
        best = max(range(len(logprobs)), key=lambda k: (logprobs[k], -k))
        items.append(MmluItem(logprobs, [len(c) for c in conts], best, row.answer))
    return items


def _letter_logprobs(model, sequences, batch_size: int) -> list[list[float]]:
    """log p(letter | prompt) per choice from one prompt forward per question."""
    from q_tuning.sft.evaluate.decoding import prefill

    prompts = [p for p, _ in sequences]
    for _, conts in sequences:
        if any(len(c) != 1 for c in conts):
            raise EvalError("--mmlu-continuation letter: a letter is not a single token for "
                            "this tokenizer; use --mmlu-continuation text")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[float]] = [[] for _ in prompts]
    for first in range(0, len(order), batch_size):
        group = order[first:first + batch_size]
        logp = torch.log_softmax(prefill(model, prompts, group).logits.double(), dim=-1)
        for row, i in enumerate(group):
            out[i] = [float(logp[row, c[0]]) for c in sequences[i][1]]
    return out


def _text_logprobs(model, tokenizer, sequences, batch_size: int) -> list[list[float]]:
    """Sum of log p(token | before) over each choice's continuation tokens."""
    from q_tuning.sft.evaluate.cli import digit_tokens, samples_nll

    samples, owner = [], []
    for i, (prompt, conts) in enumerate(sequences):
        for cont in conts:
            mask = torch.tensor([0] * len(prompt) + [1] * len(cont))
            samples.append((torch.tensor(prompt + cont), mask))
            owner.append(i)
    nll = samples_nll(model, samples, digit_tokens(tokenizer), batch_size=batch_size)
    out: list[list[float]] = [[] for _ in sequences]
    for i, row_nll in zip(owner, nll):
        out[i].append(-row_nll.sum)
    return out


def summarize_mmlu(rows: Sequence[MmluRow], items: Sequence[MmluItem], continuation: str
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, per-question records): accuracy overall and per subject."""
    records = [{"id": row.id, "subject": row.subject, "answer": item.answer,
                "predicted": item.predicted, "correct": item.correct,
                "logprobs": item.logprobs, "continuation_tokens": item.tokens,
                "mean_logprobs": [lp / n for lp, n in zip(item.logprobs, item.tokens)]}
               for row, item in zip(rows, items)]
    subjects: dict[str, list[int]] = {}
    for row, item in zip(rows, items):
        subjects.setdefault(row.subject, []).append(int(item.correct))
    correct = sum(item.correct for item in items)
    summary = {"task": "mmlu", "continuation": continuation, "num_samples": len(items),
               "correct": correct, "accuracy": correct / len(items),
               "subject_accuracy": {s: sum(v) / len(v) for s, v in sorted(subjects.items())},
               "per_item": {"correct": [int(item.correct) for item in items]}}
    return summary, records
