"""`q-tuning-eval`'s input rows and answer parsing (re-exported by `q_tuning.sft.evaluate.cli`).

Public API:
    EvalError
    normalize_number(text) -> Decimal | None
    extract_answer(generated) -> Decimal | None
    answer_complete(text) -> bool
    read_rows(path, limit=None) -> list[dict]   (GSM rows)
    read_jsonl(path, limit=None) -> list[dict]  (any JSON objects, `_source` added)
"""

from __future__ import annotations

import decimal
import json
import pathlib
import re
from typing import Optional

__all__ = ["EvalError", "answer_complete", "extract_answer", "normalize_number", "read_jsonl",
           "read_rows"]

_FINAL = re.compile(r"####\s*([^\n]*)")
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")
_COMPLETE = re.compile(r"####[^\n]*\d[^\n]*\n")


class EvalError(ValueError):
    """Bad input; the message names the flag, file or line."""


def normalize_number(text: str) -> Optional[decimal.Decimal]:
    """The first number in `text` ("$1,234.50" -> 1234.50), or None."""
    match = _NUMBER.search(text.replace("$", ""))
    if match is None:
        return None
    try:
        return decimal.Decimal(match.group(0).replace(",", "").replace("+", ""))
    except decimal.InvalidOperation:
        return None


def extract_answer(generated: str) -> Optional[decimal.Decimal]:
    """The number after the last `####` of a generated solution, or None."""
    finals = _FINAL.findall(generated)
    return normalize_number(finals[-1]) if finals else None


def answer_complete(text: str) -> bool:
    """True once `text` holds a `####` line with a digit, ended by a newline: the answer line is
    written (a number still being written, "#### 12", is not cut at "1"). Generation stops
    there, so the answer read is that first answer line (small models often repeat it)."""
    return _COMPLETE.search(text) is not None


def read_rows(path: str, limit: Optional[int] = None) -> list[dict]:
    """The first `limit` (default all) GSM rows (`prompt`, `response`, `answer`) of a JSONL
    file (`read_jsonl`); EvalError names the file and line of a bad row."""
    rows = read_jsonl(path, limit)
    for row in rows:
        where = row["_source"].replace(f"{path}:", f"{path} line ", 1)
        missing = [k for k in ("prompt", "response", "answer") if k not in row]
        if missing:
            raise EvalError(f"{where}: missing field(s) {', '.join(missing)}")
        for key in ("prompt", "response"):
            if not isinstance(row[key], str):
                raise EvalError(f"{where}: '{key}' must be a string, "
                                f"got {type(row[key]).__name__}")
        if isinstance(row["answer"], bool) or not isinstance(row["answer"], (str, int, float)):
            raise EvalError(f"{where}: 'answer' must be a string or a number")
    return rows


def read_jsonl(path: str, limit: Optional[int] = None) -> list[dict]:
    """The first `limit` (default all) JSON objects of a JSONL file, each with `_source` =
    "file:line" added; blank lines are skipped. EvalError names the file and line of a bad
    line, or the file when it is missing or empty."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise EvalError(f"--data-path {path}: no such file")
    rows = []
    with open(p, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path} line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise EvalError(f"{path} line {number}: expected a JSON object, "
                                f"got {type(row).__name__}")
            rows.append({**row, "_source": f"{path}:{number}"})
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise EvalError(f"{path}: no rows")
    return rows
