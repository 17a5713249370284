"""Chat templates for the loss-mask tests, each with a hand-written Python renderer that says, piece
by piece, which characters are training targets: the slow, obviously-correct reference that
`q_tuning.sft.data.masks.tokenize_conversation` is checked against.

CHATML             plain ChatML (no default system prompt)
CHATML_GENERATION  the same with {% generation %} marks (the transformers path)
TOOLS              ChatML with a tools block in the system turn, tool calls and tool results
QWEN3_STYLE        rewrites history like Qwen3: a think block only on assistant turns after the
                   last user turn; the reasoning of earlier turns is dropped; tool calls too

Convention (docs/data.md): an assistant turn's targets are what the model generates after the
generation prompt "<|im_start|>assistant\\n": a think block where the template renders one, the
content, the tool calls, and "<|im_end|>"; the "\\n" after it is context.
"""

from __future__ import annotations

import json

CHATML = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")

CHATML_GENERATION = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- m.content + '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")

_TOOL_CALLS = (
    "{%- if m.tool_calls -%}{%- for call in m.tool_calls -%}"
    "{{- '\\n<tool_call>\\n' + (call.function | tojson) + '\\n</tool_call>' -}}"
    "{%- endfor -%}{%- endif -%}")

_OTHER_ROLES = (
    "{%- elif m.role == 'tool' -%}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' -}}"
    "{%- elif m.role == 'system' and tools -%}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}{%- endfor -%}")

_TOOLS_BLOCK = (
    "{%- if tools -%}{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0].role == 'system' -%}{{- messages[0].content + '\\n\\n' -}}{%- endif -%}"
    "{{- '# Tools\\n<tools>' -}}{%- for t in tools -%}{{- '\\n' + (t | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools><|im_end|>\\n' -}}{%- endif -%}")

TOOLS = (
    _TOOLS_BLOCK + "{%- for m in messages -%}{%- if m.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' + m.content -}}" + _TOOL_CALLS + "{{- '<|im_end|>\\n' -}}"
    + _OTHER_ROLES
    + "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")

QWEN3_STYLE = (
    _TOOLS_BLOCK
    + "{%- set ns = namespace(last_user=-1) -%}{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}{%- if m.role == 'assistant' -%}"
    "{%- set content = m.content -%}"
    "{%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if loop.index0 > ns.last_user -%}"
    "{{- '<think>\\n' + reasoning + '\\n</think>\\n\\n' -}}{%- endif -%}"
    "{{- content -}}" + _TOOL_CALLS + "{{- '<|im_end|>\\n' -}}"
    + _OTHER_ROLES
    + "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}{%- endif -%}")

Segments = list[tuple[str, bool]]  # (text, is_target), concatenated = the rendering


def _calls(message: dict) -> str:
    return "".join("\n<tool_call>\n" + json.dumps(call["function"], ensure_ascii=False)
                   + "\n</tool_call>" for call in message.get("tool_calls") or [])


def _tools_block(messages, tools) -> Segments:
    if not tools:
        return []
    system = messages[0]["content"] + "\n\n" if messages[0]["role"] == "system" else ""
    listed = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
    return [(f"<|im_start|>system\n{system}# Tools\n<tools>{listed}\n</tools><|im_end|>\n",
             False)]


def _context(message: dict, tools) -> Segments:
    if message["role"] == "tool":
        return [(f"<|im_start|>user\n<tool_response>\n{message['content']}\n</tool_response>"
                 "<|im_end|>\n", False)]
    if message["role"] == "system" and tools:
        return []
    return [(f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n", False)]


def chatml_segments(messages, tools=None, **kwargs) -> Segments:
    out: Segments = _tools_block(messages, tools)
    for m in messages:
        if m["role"] == "assistant":
            out += [("<|im_start|>assistant\n", False), (m["content"] + _calls(m), True),
                    ("<|im_end|>", True), ("\n", False)]
        else:
            out += _context(m, tools)
    return out


def qwen3_style_segments(messages, tools=None, **kwargs) -> Segments:
    out: Segments = _tools_block(messages, tools)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            out += _context(m, tools)
            continue
        content, reasoning = m["content"], m.get("reasoning_content") or ""
        if "</think>" in content:
            reasoning = content.split("</think>")[0].split("<think>")[-1].strip("\n")
            content = content.split("</think>")[-1].lstrip("\n")
        out.append(("<|im_start|>assistant\n", False))
        if i > last_user:
            think = f"<think>\n{reasoning}\n</think>\n\n"
            # with thinking off and nothing to think, the empty block is the generation prompt's
            out.append((think, not (kwargs.get("enable_thinking") is False and not reasoning)))
        out += [(content + _calls(m), True), ("<|im_end|>", True), ("\n", False)]
    return out


def reference_tokens(tokenizer, segments: Segments) -> tuple[list[int], list[int]]:
    """Tokens of the joined text, and 1 for every token one of whose characters is a target."""
    text = "".join(t for t, _ in segments)
    target = [flag for t, flag in segments for _ in t]
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(target[c] for c in range(s, e))) for s, e in encoding["offset_mapping"]]
    return encoding["input_ids"], mask
