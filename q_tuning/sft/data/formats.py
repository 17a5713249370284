"""SFT record formats -> chat messages: the one table of what each format's keys become.

Public API:
    FORMATS, DATA_FORMATS
    FormatSpec(name, keys, summary, convert)
    UnsupportedContent
    fitting_formats(record) -> list[str]
    convert_record(record, data_format, source) -> Conversation

A record's format is the one whose keys it has (`--data-format auto`; a record with the keys of
several is not read) or forced; `q_tuning.sft.data.reader` reads the files. `convert_record` raises
DataError (`file:line: ...`) for a record that breaks its format; the reader turns that into a
counted skip (an error under --strict-data). UnsupportedContent (a content part that is not text:
an image, audio) is always an error: such data needs a model this trainer does not build.

Every format also reads, at the top level of the record:
    "tools": [...] (or a JSON string of that list)  -> the chat template's `tools` argument
    "chat_template_kwargs": {...}                  -> extra chat template arguments (over
                                                      --chat-template-kwargs)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

from q_tuning.sft.data.conversations import ROLES, Conversation, DataError

__all__ = ["DATA_FORMATS", "FORMATS", "FormatSpec", "UnsupportedContent", "convert_record",
           "fitting_formats"]


class UnsupportedContent(DataError):
    """A record this trainer cannot represent (a non-text content part): never skipped."""


Messages = list[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    name: str
    keys: tuple[str, ...]  # a record fits the format when it has all of these
    summary: str  # the mapping, as docs/data.md shows it
    convert: Callable[[dict, str], Messages]


# ----------------------------------------------------------------------------- messages

def _text(content: Any, where: str, source: str, *, allow_null: bool = False) -> str:
    """A message content as one string: a string, or a list of text parts joined."""
    if isinstance(content, str):
        return content
    if content is None and allow_null:
        return ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise UnsupportedContent(
                    f"{source}: {where}[{j}] is a {kind or type(part).__name__!r} part; only text "
                    "parts ({'type': 'text', 'text': ...}) are supported")
            if not isinstance(part.get("text"), str):
                raise DataError(f"{source}: {where}[{j}].text must be a string")
            texts.append(part["text"])
        return "".join(texts)
    raise DataError(f"{source}: {where} must be a string or a list of text parts")


def _tool_calls(calls: Any, where: str, source: str) -> list[dict]:
    """OpenAI tool calls with their arguments as objects (HF chat templates expect objects)."""
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{source}: {where} must be a non-empty list")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(f"{source}: {where}[{j}] needs a 'function' with a 'name'")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise DataError(f"{source}: {where}[{j}].function.arguments is not JSON"
                                ) from None
        if not isinstance(arguments, dict):
            raise DataError(f"{source}: {where}[{j}].function.arguments must be an object")
        out.append({**call, "type": call.get("type", "function"),
                    "function": {**function, "arguments": arguments}})
    return out


def _message(message: Any, where: str, source: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise DataError(f"{source}: {where} must be an object")
    role = message.get("role")
    if role not in ROLES:
        raise DataError(f"{source}: {where} has unknown role {role!r} "
                        f"(expected one of {', '.join(ROLES)})")
    if "content" not in message and "tool_calls" not in message:
        raise DataError(f"{source}: {where} has no 'content'")
    out = dict(message)
    if "tool_calls" in message and message["tool_calls"] is not None:
        if role != "assistant":
            raise DataError(f"{source}: {where}: only assistant turns have 'tool_calls'")
        out["tool_calls"] = _tool_calls(message["tool_calls"], f"{where}.tool_calls", source)
    out["content"] = _text(message.get("content"), f"{where}.content", source,
                           allow_null=bool(out.get("tool_calls")))
    if "reasoning_content" in message and not isinstance(message["reasoning_content"],
                                                          (str, type(None))):
        raise DataError(f"{source}: {where}.reasoning_content must be a string")
    return out


def _message_list(value: Any, key: str, source: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise DataError(f"{source}: '{key}' must be a non-empty list")
    return [_message(m, f"{key}[{i}]", source) for i, m in enumerate(value)]


def _strings(record: dict, keys: tuple[str, ...], source: str, optional=()) -> None:
    for key in keys:
        if key not in record and key not in optional:
            raise DataError(f"{source}: no '{key}'")
        if key in record and not isinstance(record[key], str):
            raise DataError(f"{source}: '{key}' must be a string")


# ----------------------------------------------------------------------------- the formats

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "model": "assistant",
                  "tool": "tool", "observation": "tool", "function_response": "tool",
                  "function_call": "assistant"}


def _from_messages(record: dict, source: str) -> Messages:
    return _message_list(record["messages"], "messages", source)


def _from_sharegpt(record: dict, source: str) -> Messages:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{source}: 'conversations' must be a non-empty list")
    _strings(record, ("system",), source, optional=("system",))
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
            got = turn.get("from") if isinstance(turn, dict) else turn
            raise DataError(f"{source}: {where}.from is {got!r} (expected one of "
                            f"{', '.join(SHAREGPT_ROLES)})")
        value = _text(turn.get("value"), f"{where}.value", source)
        if turn["from"] == "function_call":
            call = {"function": _json_value(value, f"{where}.value", source)}
            messages.append({"role": "assistant", "content": "",
                             "tool_calls": _tool_calls([call], where, source)})
        else:
            messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": value})
    return messages


def _from_alpaca(record: dict, source: str) -> Messages:
    _strings(record, ("instruction", "input", "output", "system"), source,
             optional=("input", "system"))
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    history = record.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(h, list) and len(h) == 2 and all(isinstance(t, str) for t in h)
            for h in history):
        raise DataError(f"{source}: 'history' must be a list of [instruction, output] strings")
    for user, assistant in history:
        messages += [{"role": "user", "content": user},
                     {"role": "assistant", "content": assistant}]
    prompt = "\n".join(t for t in (record["instruction"], record.get("input")) if t)
    return messages + [{"role": "user", "content": prompt},
                       {"role": "assistant", "content": record["output"]}]


def _from_prompt_completion(record: dict, source: str) -> Messages:
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt},
                {"role": "assistant", "content": completion}]
    if isinstance(prompt, list) and isinstance(completion, list):
        head = _message_list(prompt, "prompt", source)
        if any(m["role"] == "assistant" for m in head):
            raise DataError(f"{source}: 'prompt' has an assistant turn; TRL trains the "
                            "completion only, so put such conversations in 'messages'")
        return head + _message_list(completion, "completion", source)
    raise DataError(f"{source}: 'prompt' and 'completion' must both be strings or both be "
                    "lists of messages")


def _from_prompt_response(record: dict, source: str) -> Messages:
    _strings(record, ("prompt", "response"), source)
    return [{"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]}]


FORMATS: dict[str, FormatSpec] = {spec.name: spec for spec in (
    FormatSpec("messages", ("messages",),
               "`messages` as is (OpenAI/HF chat): roles system, user, assistant, tool; content "
               "a string or a list of text parts (joined); assistant `tool_calls` with "
               "`content: null`; `reasoning_content`, `tool_call_id`, `name` kept",
               _from_messages),
    FormatSpec("sharegpt", ("conversations",),
               "`system` -> system; each `conversations` turn: `from` human/user -> user, "
               "gpt/assistant/chatgpt/model -> assistant, system -> system, "
               "tool/observation/function_response -> tool, function_call (JSON `value`) -> "
               "assistant `tool_calls`; `value` -> content",
               _from_sharegpt),
    FormatSpec("alpaca", ("instruction", "output"),
               "`system` -> system; `history` [[q, a], ...] -> user/assistant pairs; "
               "`instruction` + \"\\n\" + `input` (when not empty) -> user; `output` -> "
               "assistant", _from_alpaca),
    FormatSpec("prompt-completion", ("prompt", "completion"),
               "TRL: strings -> user, assistant; or lists of messages -> prompt messages then "
               "completion messages (no assistant turn in `prompt`)", _from_prompt_completion),
    FormatSpec("prompt-response", ("prompt", "response"),
               "`prompt` -> user, `response` -> assistant", _from_prompt_response),
)}
DATA_FORMATS = ("auto", *FORMATS)


def fitting_formats(record: Any) -> list[str]:
    """The formats whose keys `record` has (a JSON object fits 0, 1 or several)."""
    if not isinstance(record, dict):
        return []
    return [name for name, spec in FORMATS.items() if all(k in record for k in spec.keys)]


def convert_record(record: Any, data_format: str, source: str) -> Conversation:
    """`record` read as `data_format` (not "auto"); DataError `source: ...` if it breaks it."""
    if not isinstance(record, dict):
        raise DataError(f"{source}: expected a JSON object, got {type(record).__name__}")
    spec = FORMATS[data_format]
    missing = [k for k in spec.keys if k not in record]
    if missing:
        raise DataError(f"{source}: not a {data_format!r} record: no {', '.join(map(repr, missing))}"
                        f" (keys found: {sorted(record)})")
    messages = spec.convert(record, source)
    kwargs = record.get("chat_template_kwargs", {})
    if not isinstance(kwargs, dict):
        raise DataError(f"{source}: 'chat_template_kwargs' must be an object")
    return Conversation(source, messages, tools=_tools(record.get("tools"), source),
                        template_kwargs=kwargs)


def _tools(tools: Any, source: str) -> list[dict] | None:
    if tools is None:
        return None
    if isinstance(tools, str):  # LLaMA-Factory's sharegpt stores them as a JSON string
        tools = _json_value(tools, "'tools'", source)
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{source}: 'tools' must be a list of objects (JSON schemas)")
    return tools or None


def _json_value(text: str, where: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{source}: {where} is not JSON ({e.msg})") from None
