"""JSONL records -> conversations, and a conversation -> (tokens, loss_mask) through the chat
template.

Public API:
    ROLES
    DataError
    Conversation(source, messages)
    data_files(paths) -> list[pathlib.Path]
    read_conversations(paths) -> (list[Conversation], skipped_no_assistant)
    read_conversation_files(paths) -> (list[Conversation], ["file:line" without an assistant turn])
    tokenize_conversation(tokenizer, messages, source=...) -> (tokens, loss_mask)
    render_chat(tokenizer, messages, source, *, generation_prompt=False) -> str

Input: JSONL files, one object per line, either
    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}  or
    {"prompt": str, "response": str}   (-> one user turn and one assistant turn).
Other keys are ignored; blank lines are skipped.
Malformed records are rejected (a DataError `file:line: ...`); what `q_tuning.sft.data.dataset` skips,
truncates or rejects is listed there.

Loss-mask convention (that of slime's rollout `loss_masks`, over tokens, not shifted):
`loss_mask[t] == 1` means token t is a training target, predicted from tokens[:t]. The trainer
shifts by one: logits of tokens[:-1] against tokens[1:], weighted by loss_mask[1:].
Targets are every assistant turn's content plus the end-of-turn tokens the chat template puts
after it, through the last special token (ChatML: "<|im_end|>"; the "\\n" after it and the
"<|im_start|>assistant\\n" header are context). `--seq-length` bounds len(tokens).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["ROLES", "Conversation", "DataError", "data_files", "read_conversation_files",
           "read_conversations", "render_chat", "tokenize_conversation"]

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """Bad training data; the message starts with `file:line`."""


@dataclasses.dataclass(frozen=True, slots=True)
class Conversation:
    source: str  # "file:line"
    messages: list[dict[str, Any]]



# ----------------------------------------------------------------------------- reading

def read_conversations(paths: str | os.PathLike | Sequence[str | os.PathLike]
                       ) -> tuple[list[Conversation], int]:
    """Parse JSONL files into conversations; returns (conversations, skipped_no_assistant).

    Raises FileNotFoundError for a missing file (before reading any), DataError (`file:line:`)
    for malformed JSON, a missing or invalid field, or an unknown role.
    """
    conversations, skipped = read_conversation_files(paths)
    return conversations, len(skipped)


def read_conversation_files(paths) -> tuple[list[Conversation], list[str]]:
    """(conversations with an assistant turn, "file:line" of those without one)."""
    files = data_files(paths)
    conversations, skipped = [], []
    for path in files:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                source = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{source}: not UTF-8 ({e.reason} at byte {e.start})") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{source}: malformed JSON ({e.msg} at column {e.colno})"
                                    ) from None
                except RecursionError:
                    raise DataError(f"{source}: malformed JSON (nested too deeply)") from None
                messages = _parse_record(record, source)
                if any(m["role"] == "assistant" for m in messages):
                    conversations.append(Conversation(source, messages))
                else:
                    skipped.append(source)
    return conversations, skipped


def data_files(paths) -> list[pathlib.Path]:
    """`--data-path` as paths; FileNotFoundError naming the first missing file."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = [pathlib.Path(p) for p in paths]
    if not files:
        raise ValueError("--data-path: no data file given")
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"--data-path: data file {str(path)!r} not found")
    return files


def _parse_record(record: Any, source: str) -> list[dict[str, Any]]:
    if not isinstance(record, dict):
        raise DataError(f"{source}: expected a JSON object, got {type(record).__name__}")
    has_pair = "prompt" in record or "response" in record
    if "messages" in record:
        if has_pair:
            raise DataError(f"{source}: has both 'messages' and 'prompt'/'response'; use one")
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{source}: 'messages' must be a non-empty list")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise DataError(f"{source}: messages[{i}] must be an object")
            for key in ("role", "content"):
                if key not in message:
                    raise DataError(f"{source}: messages[{i}] has no '{key}'")
            if message["role"] not in ROLES:
                raise DataError(f"{source}: messages[{i}] has unknown role {message['role']!r} "
                                f"(expected one of {', '.join(ROLES)})")
            if not isinstance(message["content"], str):
                raise DataError(f"{source}: messages[{i}].content must be a string")
        return [dict(m) for m in messages]
    if has_pair:
        for key in ("prompt", "response"):
            if key not in record:
                raise DataError(f"{source}: has 'prompt'/'response' but no '{key}'")
            if not isinstance(record[key], str):
                raise DataError(f"{source}: '{key}' must be a string")
        return [{"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["response"]}]
    raise DataError(f"{source}: expected a 'messages' list or 'prompt' and 'response' strings "
                    f"(keys found: {sorted(record)})")


# ----------------------------------------------------------------------------- tokenizing

def tokenize_conversation(tokenizer: "PreTrainedTokenizerBase", messages: list[dict[str, Any]],
                          *, source: str = "<conversation>") -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of the chat-template rendering of `messages`, and its loss mask (module docstring).

    tokens == tokenizer(apply_chat_template(messages, tokenize=False), add_special_tokens=False):
    the whole conversation is tokenized at once, so merges across turn boundaries are those of
    inference. Assistant turns are located by rendering prefixes: turn i spans the characters
    between render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]), which
    must both be prefixes of the full rendering (DataError otherwise). A token is a target when
    its character span overlaps the turn's content or end-of-turn part (a token merged across the
    header/content boundary counts as content). Needs a fast tokenizer (offset mappings).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; q_tuning needs "
                         "offset mappings (load it with use_fast=True)")
    text = render_chat(tokenizer, messages, source)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    special_ids = set(tokenizer.all_special_ids)
    mask = [0] * len(ids)
    for start, content_end, end in _assistant_char_spans(tokenizer, messages, text, source):
        # The turn's targets end at the last special token after the content (end of turn).
        target_end = end
        for tok, (s, e) in zip(ids, offsets):
            if content_end <= s < end and tok in special_ids:
                target_end = e
        for t, (s, e) in enumerate(offsets):
            if s < target_end and e > start:
                mask[t] = 1
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def render_chat(tokenizer, messages, source: str, *, generation_prompt: bool = False) -> str:
    """The chat template applied to `messages` as text; a template error names the record."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja2 TemplateError and friends: name the record
        raise DataError(f"{source}: the chat template failed on this conversation: {e}") from e


def _assistant_char_spans(tokenizer, messages, text: str, source: str
                          ) -> list[tuple[int, int, int]]:
    """(start, content_end, end) character offsets in `text` of each assistant turn."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise DataError(f"{source}: the conversation starts with an assistant turn; "
                            "put at least a system or user turn before it")
        before = render_chat(tokenizer, messages[:i], source, generation_prompt=True)
        through = render_chat(tokenizer, messages[: i + 1], source)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(
                f"{source}: cannot locate assistant message {i}: the chat template's rendering "
                f"of messages[:{i}] (with generation prompt) and of messages[:{i + 1}] are not "
                "prefixes of the whole conversation's rendering")
        start, end = len(before), len(through)
        found = through.find(message["content"], start)
        content_end = found + len(message["content"]) if found >= 0 else start
        spans.append((start, content_end, end))
    return spans
