"""Loss masks from the rendering of the whole conversation: every assistant turn against the slow
reference of tests/harness/chat_reference.py, for a plain ChatML template, the same with
{% generation %} marks, a tool-calling template and a Qwen3-style history-rewriting template
(which the earlier prefix method could not handle: "cannot locate assistant message 1")."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from q_tuning.sft.data.masks import has_generation_marks, tokenize_conversation
from q_tuning.sft.hf.assets import load_tokenizer
from q_tuning.sft.data.conversations import DataError, render_chat
from tests.harness import chat_reference as ref

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}

TWO_TURNS = [{"role": "system", "content": "You are a calculator."},
             {"role": "user", "content": "What is 12 + 30?"},
             {"role": "assistant", "content": "12 + 30 = 42"},
             {"role": "user", "content": "And doubled?"},
             {"role": "assistant", "content": "84"}]
REASONING = [{"role": "user", "content": "What is 2 + 2?"},
             {"role": "assistant", "content": "<think>\nsmall sum\n</think>\n\n4"},
             {"role": "user", "content": "And 3 + 3?"},
             {"role": "assistant", "content": "<think>\nagain\n</think>\n\n6"}]
REASONING_FIELD = [{"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello!", "reasoning_content": "greet"}]
TOOL_CALL = [{"role": "system", "content": "Use tools."},
             {"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "get_weather",
                                                   "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "content": "18 C"},
             {"role": "assistant", "content": "It is 18 C in Paris."}]
EMPTY = [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""},
         {"role": "user", "content": "y"}, {"role": "assistant", "content": "ok"}]
CONVERSATIONS = {"two_turns": (TWO_TURNS, None), "reasoning": (REASONING, None),
                 "reasoning_field": (REASONING_FIELD, None), "tool_call": (TOOL_CALL, [WEATHER]),
                 "empty": (EMPTY, None)}
TEMPLATES = {"chatml": (ref.CHATML, ref.chatml_segments),
             "chatml_generation": (ref.CHATML_GENERATION, ref.chatml_segments),
             "tools": (ref.TOOLS, ref.chatml_segments),
             "qwen3_style": (ref.QWEN3_STYLE, ref.qwen3_style_segments)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "q_tuning_cache"


def tokenizer_with(template: str, cache):
    tok = load_tokenizer(cache_dir=cache)
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_every_assistant_turn_matches_the_reference(template, conversation, cache):
    text, segments = TEMPLATES[template]
    messages, tools = CONVERSATIONS[conversation]
    if tools and template in ("chatml", "chatml_generation"):
        pytest.skip("these templates render no tool calls")  # the reference would differ
    tok = tokenizer_with(text, cache)
    assert has_generation_marks(tok) == (template == "chatml_generation")
    tokens, mask = tokenize_conversation(tok, messages, tools=tools)
    want_tokens, want_mask = ref.reference_tokens(tok, segments(messages, tools))
    assert "".join(t for t, _ in segments(messages, tools)) == render_chat(
        tok, messages, "x", tools=tools)  # the reference renders what the template renders
    assert tokens.tolist() == want_tokens
    assert mask.tolist() == want_mask, tok.decode([t for t, m in zip(want_tokens, want_mask) if m])


def test_the_qwen3_style_template_rewrites_history(cache):
    """Why the prefix method failed: the rendering of the first two messages is not a prefix of
    the whole conversation's (the first answer loses its think block once a user turn follows)."""
    tok = tokenizer_with(ref.QWEN3_STYLE, cache)
    whole = render_chat(tok, REASONING, "x")
    assert not whole.startswith(render_chat(tok, REASONING[:2], "x"))
    tokens, mask = tokenize_conversation(tok, REASONING)
    assert tok.decode(tokens[mask.bool()]) == \
        "4<|im_end|><think>\nagain\n</think>\n\n6<|im_end|>"


def test_template_kwargs_reach_the_template(cache):
    """enable_thinking=false: the empty think block belongs to the generation prompt (context)."""
    tok = tokenizer_with(ref.QWEN3_STYLE, cache)
    kwargs = {"enable_thinking": False}
    tokens, mask = tokenize_conversation(tok, TWO_TURNS, template_kwargs=kwargs)
    want = ref.reference_tokens(tok, ref.qwen3_style_segments(TWO_TURNS, **kwargs))
    assert (tokens.tolist(), mask.tolist()) == want
    assert tok.decode(tokens[mask.bool()]) == "12 + 30 = 42<|im_end|>84<|im_end|>"
    thinking = tokenize_conversation(tok, TWO_TURNS)
    assert tok.decode(thinking[0][thinking[1].bool()]) == \
        "12 + 30 = 42<|im_end|><think>\n\n</think>\n\n84<|im_end|>"


def test_a_template_that_hides_the_content_is_an_error(cache):
    tok = tokenizer_with(ref.CHATML.replace("m.content", "(m.content | upper)"), cache)
    with pytest.raises(DataError, match="r:1: cannot locate assistant message 2"):
        tokenize_conversation(tok, TWO_TURNS, source="r:1")
