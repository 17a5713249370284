"""The shared vocabulary of the SFT data modules: roles, the record error, a conversation, the
data files, and the chat template applied to a conversation.

Public API:
    ROLES
    DataError
    Conversation(source, messages, tools=None, template_kwargs={})
    data_files(paths) -> list[pathlib.Path]
    render_chat(tokenizer, messages, source, *, generation_prompt=False, tools=None,
                template_kwargs=None) -> str

Reading records of every format is `q_tuning.sft.data.formats` / `q_tuning.sft.data.reader`;
the tokens and loss mask of a conversation are `q_tuning.sft.data.masks` (the loss-mask
convention is described there); `q_tuning.sft.data.dataset` re-exports the public names.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping
from typing import Any

__all__ = ["ROLES", "Conversation", "DataError", "data_files", "render_chat"]

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """Bad training data; the message starts with `file:line`."""


@dataclasses.dataclass(frozen=True, slots=True)
class Conversation:
    source: str  # "file:line"
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None  # the chat template's `tools` argument
    # the record's own chat template arguments (over --chat-template-kwargs)
    template_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


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


def render_chat(tokenizer, messages, source: str, *, generation_prompt: bool = False,
                tools: list | None = None, template_kwargs: Mapping[str, Any] | None = None
                ) -> str:
    """The chat template applied to `messages` as text; a template error names the record."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, tools=tools,
                                             add_generation_prompt=generation_prompt,
                                             **(template_kwargs or {}))
    except Exception as e:  # jinja2 TemplateError and friends: name the record
        raise DataError(f"{source}: the chat template failed on this conversation: {e}") from e
