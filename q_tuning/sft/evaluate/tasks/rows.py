"""Typed input rows of the `q-tuning-eval` tasks other than GSM, checked at read time.

    read_mmlu(path, limit) -> list[MmluRow]   {"question", "choices": [4 str], "answer": 0-3,
                                                "subject"?, "id"?}
    read_qa(path, limit) -> list[QaRow]       {"prompt", "references": [str, ...], "stem"?,
                                                "id"?}
    read_pairs(path, limit) -> list[dict]     {"prompt", "response", "id"?}

A bad row is an EvalError naming the file and line.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

from q_tuning.sft.evaluate.rows import EvalError, read_jsonl

__all__ = ["MmluRow", "QaRow", "read_mmlu", "read_pairs", "read_qa"]


class MmluRow(NamedTuple):
    id: Any
    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    source: str  # "file:line"


class QaRow(NamedTuple):
    id: Any
    prompt: str
    references: tuple[str, ...]
    source: str
    stem: str = ""  # the sentence the answer completes, "" if none


def _where(row: dict) -> str:
    path, _, line = row["_source"].rpartition(":")
    return f"{path} line {line}"


def _string(row: dict, key: str) -> str:
    if key not in row:
        raise EvalError(f"{_where(row)}: missing field '{key}'")
    if not isinstance(row[key], str):
        raise EvalError(f"{_where(row)}: '{key}' must be a string, got {type(row[key]).__name__}")
    return row[key]


def _strings(row: dict, key: str) -> tuple[str, ...]:
    value = row.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise EvalError(f"{_where(row)}: '{key}' must be a non-empty list of strings")
    return tuple(value)


def read_mmlu(path: str, limit: Optional[int] = None) -> list[MmluRow]:
    rows = []
    for row in read_jsonl(path, limit):
        choices = _strings(row, "choices")
        answer = row.get("answer")
        if isinstance(answer, bool) or not isinstance(answer, int) or not (
                0 <= answer < len(choices)):
            raise EvalError(f"{_where(row)}: 'answer' must be the index of the right choice "
                            f"(0 to {len(choices) - 1}), got {answer!r}")
        if len(choices) > 26:
            raise EvalError(f"{_where(row)}: at most 26 choices (letters A-Z)")
        rows.append(MmluRow(row.get("id"), str(row.get("subject", "")), _string(row, "question"),
                            choices, answer, row["_source"]))
    return rows


def read_qa(path: str, limit: Optional[int] = None) -> list[QaRow]:
    return [QaRow(row.get("id"), _string(row, "prompt"), _strings(row, "references"),
                  row["_source"], _string(row, "stem") if "stem" in row else "")
            for row in read_jsonl(path, limit)]


def read_pairs(path: str, limit: Optional[int] = None) -> list[dict]:
    rows = read_jsonl(path, limit)
    for row in rows:
        for key in ("prompt", "response"):
            _string(row, key)
    return rows
