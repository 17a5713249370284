"""A conversation -> (tokens, loss_mask), every assistant turn located in the rendering of the
whole conversation.

Public API:
    tokenize_conversation(tokenizer, messages, *, source=..., tools=None, template_kwargs=None)
        -> (tokens, loss_mask)
    has_generation_marks(tokenizer) -> bool

Loss-mask convention (that of slime's rollout `loss_masks`, over tokens, not shifted):
`loss_mask[t] == 1` means token t is a training target, predicted from tokens[:t]. The trainer
shifts by one: logits of tokens[:-1] against tokens[1:], weighted by loss_mask[1:].

tokens == tokenizer(apply_chat_template(messages, tools, **kwargs), add_special_tokens=False):
the whole conversation is rendered and tokenized at once, so the text and the merges across turn
boundaries are those of inference, whatever the template does to earlier turns. The targets:

- a template with `{% generation %}` marks: the tokens inside them (transformers'
  `return_assistant_tokens_mask`), exactly as its author marked them.
- any other template: for each assistant turn i, the conversation is rendered again with that one
  turn replaced by a unique sentinel content (no tool calls, no reasoning). The two renderings
  agree before and after the turn; what differs in the real one is the turn as the template
  rendered it (content, tool calls, and a think block when the template renders one for that
  turn). The targets start there, or right after the generation prompt (e.g.
  "<|im_start|>assistant\\n") when that occurs between the previous turn's targets and there
  (so a think block's "<think>\\n" is a target), and end after the end-of-turn text through its
  last special token (ChatML: "<|im_end|>"; the "\\n" after it is context). No prefix of the
  conversation is ever rendered, so templates that rewrite history (Qwen3 drops the reasoning of
  earlier turns) work.
A token is a target when its characters overlap a target span (a token merged across the
header/content boundary counts). Needs a fast tokenizer (offset mappings).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from q_tuning.sft.data.conversations import DataError, render_chat

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["has_generation_marks", "tokenize_conversation"]

_GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_marks(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and bool(_GENERATION_MARK.search(template))


def tokenize_conversation(tokenizer: "PreTrainedTokenizerBase", messages: list[dict[str, Any]],
                          *, source: str = "<conversation>", tools: list | None = None,
                          template_kwargs: Mapping[str, Any] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of the chat-template rendering of `messages` and its loss mask (module docstring);
    DataError naming `source` when the template fails or a turn cannot be located."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; q_tuning needs "
                         "offset mappings (load it with use_fast=True)")
    kwargs = dict(template_kwargs or {})
    if has_generation_marks(tokenizer):
        return _generation_mask(tokenizer, messages, source, tools, kwargs)
    text = render_chat(tokenizer, messages, source, tools=tools, template_kwargs=kwargs)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [0] * len(encoding["input_ids"])
    for start, end in _target_spans(tokenizer, messages, text, source, tools, kwargs):
        for t, (s, e) in enumerate(encoding["offset_mapping"]):
            if s < end and e > start:
                mask[t] = 1
    return (torch.tensor(encoding["input_ids"], dtype=torch.long),
            torch.tensor(mask, dtype=torch.long))


def _generation_mask(tokenizer, messages, source, tools, kwargs):
    try:
        out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=True,
                                            **kwargs)
    except Exception as e:  # jinja2 TemplateError and friends: name the record
        raise DataError(f"{source}: the chat template failed on this conversation: {e}") from e
    return (torch.tensor(out["input_ids"], dtype=torch.long),
            torch.tensor(out["assistant_masks"], dtype=torch.long))


# ----------------------------------------------------------------------------- sentinel method

class _TemplateShape(NamedTuple):
    generation_prompt: str  # what add_generation_prompt=True appends ("" if not a suffix)
    end_of_turn: str  # the text after an assistant turn's content through its last special token


_SHAPES: dict[tuple, _TemplateShape] = {}


def _template_shape(tokenizer, kwargs: dict) -> _TemplateShape:
    """Learned once per (template, kwargs) from a probe conversation."""
    key = (tuple(tokenizer.all_special_tokens), tokenizer.chat_template,
           json.dumps(kwargs, sort_keys=True, default=str))
    if key not in _SHAPES:
        user = [{"role": "user", "content": "Hi"}]
        bare = render_chat(tokenizer, user, "<probe>", template_kwargs=kwargs)
        prompted = render_chat(tokenizer, user, "<probe>", generation_prompt=True,
                               template_kwargs=kwargs)
        sentinel = _sentinel(0, bare)
        turn = render_chat(tokenizer, user + [{"role": "assistant", "content": sentinel}],
                           "<probe>", template_kwargs=kwargs)
        trailer = turn[turn.index(sentinel) + len(sentinel):] if sentinel in turn else ""
        _SHAPES[key] = _TemplateShape(
            prompted[len(bare):] if prompted.startswith(bare) else "",
            trailer[:_last_special_end(tokenizer, trailer)])
    return _SHAPES[key]


def _last_special_end(tokenizer, text: str) -> int:
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    special = set(tokenizer.all_special_ids)
    ends = [e for tok, (_, e) in zip(encoding["input_ids"], encoding["offset_mapping"])
            if tok in special]
    return max(ends, default=0)


def _sentinel(i: int, avoid: str) -> str:
    """A content no template changes (no whitespace to trim) and no text contains."""
    k = 0
    while (s := f"\x02qt-turn-{i}-{k}\x03") in avoid:
        k += 1
    return s


def _target_spans(tokenizer, messages, text: str, source: str, tools, kwargs
                  ) -> list[tuple[int, int]]:
    shape = _template_shape(tokenizer, kwargs)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        sentinel = _sentinel(i, text)
        probe = [*messages[:i], {"role": "assistant", "content": sentinel}, *messages[i + 1:]]
        try:
            other = render_chat(tokenizer, probe, source, tools=tools, template_kwargs=kwargs)
        except DataError as err:
            raise DataError(f"{source}: cannot locate assistant message {i}: the chat template "
                            "fails when that turn's content is replaced by a sentinel and its "
                            f"tool calls removed ({err.__cause__}); give it {{% generation %}} "
                            "marks (--chat-template)") from err
        start, end = _differing_region(text, other)
        where, other_end = other.find(sentinel), len(other) - (len(text) - end)
        if other.count(sentinel) != 1 or not start <= where <= other_end - len(sentinel):
            raise DataError(f"{source}: cannot locate assistant message {i} in the rendering of "
                            "the whole conversation: the chat template does not render an "
                            "assistant content verbatim; give it {% generation %} marks "
                            "(--chat-template)")
        low = spans[-1][1] if spans else 0
        header = text.rfind(shape.generation_prompt, low, start) if shape.generation_prompt \
            else -1
        if header >= 0:
            start = header + len(shape.generation_prompt)
        if not text.startswith(shape.end_of_turn, end):
            raise DataError(f"{source}: cannot find the end of assistant message {i}: the chat "
                            f"template does not put {shape.end_of_turn!r} after it")
        spans.append((start, end + len(shape.end_of_turn)))
    return spans


def _differing_region(a: str, b: str) -> tuple[int, int]:
    """(start, end) of `a` such that a[:start] and a[end:] are the longest common prefix and
    suffix of `a` and `b` (the suffix not overlapping the prefix); slices compare in C."""
    n = min(len(a), len(b))
    lo, hi = 0, n  # a[:lo] == b[:lo]; the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if a[lo:mid] == b[lo:mid] else (lo, mid - 1)
    start = lo
    lo, hi = 0, n - start  # common suffix length
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if a[len(a) - mid:len(a) - lo] == b[len(b) - mid:len(b) - lo] \
            else (lo, mid - 1)
    return start, len(a) - lo
