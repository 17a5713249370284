"""JSONL files -> conversations, each record in its format (detected from its keys, or forced).

Public API:
    ReadResult(conversations, no_assistant, bad, formats)
    read_conversation_files(paths, data_format="auto") -> ReadResult
    read_conversations(paths, data_format="auto") -> (list[Conversation], skipped)

With --data-format auto a record is read in the one format whose keys it has (so a file may mix
`messages` and `prompt`/`response` records, as before); the formats found are counted per file
and shown in the start-up summary. A forced format reads every record in it.
A line that is not UTF-8 or not JSON is a DataError (`file:line`): the file is damaged, not in
another format. A record that fits no format, or breaks its file's format (a missing or mistyped
field, an unknown role, an assistant turn first), is listed in `ReadResult.bad` with the reason;
`q_tuning.sft.data.dataset` counts it as a skip, or stops under --strict-data. A content part that is not
text is always an error (formats.UnsupportedContent).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

from q_tuning.sft.data.formats import (DATA_FORMATS, FORMATS, UnsupportedContent, convert_record,
                                       fitting_formats)
from q_tuning.sft.data.conversations import Conversation, DataError, data_files

__all__ = ["ReadResult", "read_conversation_files", "read_conversations"]

Paths = str | os.PathLike | Sequence[str | os.PathLike]


@dataclasses.dataclass
class ReadResult:
    conversations: list[Conversation]  # with an assistant turn
    no_assistant: list[str]  # "file:line" of records without one
    bad: list[tuple[str, str]]  # ("file:line", why) of records that fit no format or break it
    formats: list[tuple[str, dict[str, int]]]  # (file, {format: records read in it})

    @property
    def records(self) -> int:
        return len(self.conversations) + len(self.no_assistant) + len(self.bad)


def read_conversations(paths: Paths, data_format: str = "auto"
                       ) -> tuple[list[Conversation], int]:
    """(conversations, records skipped for any reason)."""
    result = read_conversation_files(paths, data_format)
    return result.conversations, len(result.no_assistant) + len(result.bad)


def read_conversation_files(paths: Paths, data_format: str = "auto") -> ReadResult:
    """Every file of `paths` (FileNotFoundError for a missing one, before reading any)."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"--data-format {data_format!r}: expected one of "
                         f"{', '.join(DATA_FORMATS)}")
    result = ReadResult([], [], [], [])
    for path in data_files(paths):
        _read_file(str(path), data_format, result)
    return result


def _read_file(path: str, data_format: str, result: ReadResult) -> None:
    counts: dict[str, int] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            source = f"{path}:{lineno}"
            record = _decode(raw, source)
            if record is _BLANK:
                continue
            fmt = data_format
            if fmt == "auto":
                fits = fitting_formats(record)
                if len(fits) != 1:
                    result.bad.append((source, _no_single_format(record, fits)))
                    continue
                fmt = fits[0]
            try:
                conversation = convert_record(record, fmt, source)
                _check_turns(conversation)
            except UnsupportedContent:
                raise
            except DataError as err:
                reason = str(err).removeprefix(f"{source}: ")
                result.bad.append((source, f"{reason} (read as {fmt})"))
                continue
            counts[fmt] = counts.get(fmt, 0) + 1
            if any(m["role"] == "assistant" for m in conversation.messages):
                result.conversations.append(conversation)
            else:
                result.no_assistant.append(source)
    result.formats.append((path, counts))


_BLANK = object()


def _decode(raw: bytes, source: str):
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if not line.strip():
        return _BLANK
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{source}: malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{source}: malformed JSON (nested too deeply)") from None


def _no_single_format(record, fits: list[str]) -> str:
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if fits:
        return (f"fits several formats ({', '.join(fits)}); keep the keys of one, or force it "
                "with --data-format")
    expected = "; ".join(f"{name}: {', '.join(spec.keys)}" for name, spec in FORMATS.items())
    return f"fits no format (keys found: {sorted(record)}; expected {expected})"


def _check_turns(conversation: Conversation) -> None:
    if conversation.messages[0]["role"] == "assistant":
        raise DataError(f"{conversation.source}: the conversation starts with an assistant "
                        "turn; put at least a system or user turn before it")
