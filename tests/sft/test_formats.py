"""SFT record formats: each format against hand-written messages, per-record detection, forced
formats, tools and template arguments, and bad records (named skips, --strict-data errors)."""

import json

import pytest

from q_tuning.sft.data.formats import UnsupportedContent, convert_record
from q_tuning.sft.data.reader import read_conversation_files
from q_tuning.sft.data.conversations import DataError

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}

# (record, expected messages) per format
CASES = {
    "messages": (
        {"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather "},
                                         {"type": "text", "text": "in Paris?"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
            {"role": "assistant", "content": "18 C in Paris.", "reasoning_content": "easy"}]},
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": "", "tool_calls": [
             {"id": "c1", "type": "function",
              "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
         {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
         {"role": "assistant", "content": "18 C in Paris.", "reasoning_content": "easy"}]),
    "sharegpt": (
        {"system": "Be brief.", "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": '
                                               '{"city": "Paris"}}'},
            {"from": "observation", "value": "18 C"},
            {"from": "gpt", "value": "18 C in Paris."}]},
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": "", "tool_calls": [
             {"type": "function",
              "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
         {"role": "tool", "content": "18 C"},
         {"role": "assistant", "content": "18 C in Paris."}]),
    "alpaca": (
        {"instruction": "Translate to French.", "input": "cat", "output": "chat",
         "system": "You translate.", "history": [["Translate: dog", "chien"]]},
        [{"role": "system", "content": "You translate."},
         {"role": "user", "content": "Translate: dog"},
         {"role": "assistant", "content": "chien"},
         {"role": "user", "content": "Translate to French.\ncat"},
         {"role": "assistant", "content": "chat"}]),
    "prompt-completion": (
        {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
         "completion": [{"role": "assistant", "content": "A"}]},
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
         {"role": "assistant", "content": "A"}]),
    "prompt-response": (
        {"prompt": "Q", "response": "A"},
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]),
}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_format_gives_the_hand_written_messages(name):
    record, expected = CASES[name]
    assert convert_record(record, name, "f:1").messages == expected


def test_detected_per_record_and_counted_per_file(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [CASES["sharegpt"][0], CASES["alpaca"][0],
                                           CASES["sharegpt"][0]])
    b = write_jsonl(tmp_path / "b.jsonl", [CASES["prompt-completion"][0],
                                           {"prompt": "Q", "completion": "A"}])
    result = read_conversation_files([a, b])
    assert result.formats == [(str(a), {"sharegpt": 2, "alpaca": 1}),
                              (str(b), {"prompt-completion": 2})]
    assert [c.messages for c in result.conversations] == [
        CASES["sharegpt"][1], CASES["alpaca"][1], CASES["sharegpt"][1],
        CASES["prompt-completion"][1], CASES["prompt-response"][1]]
    assert [c.source for c in result.conversations][3:] == [f"{b}:1", f"{b}:2"]


def test_forced_format_reads_every_record_in_it(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [CASES["alpaca"][0], CASES["prompt-response"][0]])
    result = read_conversation_files(path, "alpaca")
    assert [c.messages for c in result.conversations] == [CASES["alpaca"][1]]
    assert result.bad == [(f"{path}:2", "not a 'alpaca' record: no 'instruction', 'output' "
                                        "(keys found: ['prompt', 'response']) (read as alpaca)")]
    with pytest.raises(ValueError, match="--data-format 'csv'"):
        read_conversation_files(path, "csv")


def test_tools_and_template_arguments_are_kept():
    record = {"messages": CASES["messages"][0]["messages"], "tools": [WEATHER_TOOL],
              "chat_template_kwargs": {"enable_thinking": False}}
    conversation = convert_record(record, "messages", "f:1")
    assert conversation.tools == [WEATHER_TOOL]
    assert conversation.template_kwargs == {"enable_thinking": False}
    as_string = convert_record({**CASES["sharegpt"][0], "tools": json.dumps([WEATHER_TOOL])},
                               "sharegpt", "f:1")
    assert as_string.tools == [WEATHER_TOOL]


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": None}]}, r"messages\[1\]\.content must be"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
                                                      "tool_calls": [{"function": {}}]}]},
     r"tool_calls\[0\] needs a 'function' with a 'name'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{oops"}}]}]}, r"arguments is not JSON"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, r"conversations\[0\]\.from is 'robot'"),
    ({"instruction": "i", "output": 3}, r"'output' must be a string"),
    ({"instruction": "i", "output": "o", "history": [["only one"]]}, r"'history' must be"),
    ({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]},
     r"both be strings or both be lists"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "completion": []},
     r"'prompt' has an assistant turn"),
    ({"prompt": "q", "response": "a", "tools": {"name": "f"}}, r"'tools' must be a list"),
])
def test_a_record_that_breaks_its_format_is_named(record, message):
    fmt = next(f for f, keys in (("messages", "messages"), ("sharegpt", "conversations"),
                                 ("alpaca", "instruction"), ("prompt-completion", "completion"),
                                 ("prompt-response", "response")) if keys in record)
    with pytest.raises(DataError, match=rf"^f:7: .*{message}"):
        convert_record(record, fmt, "f:7")


def test_a_part_that_is_not_text_is_an_error_naming_file_and_line(tmp_path):
    image = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "x.png"}}]},
        {"role": "assistant", "content": "A cat."}]}
    path = write_jsonl(tmp_path / "d.jsonl", [CASES["prompt-response"][0], image])
    with pytest.raises(UnsupportedContent,
                       match=r"d\.jsonl:2: messages\[0\]\.content\[1\] is a 'image_url' part"):
        read_conversation_files(path)


def test_the_docs_show_the_table_of_the_code():
    import pathlib

    from q_tuning.sft.data.formats import FORMATS

    docs = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "data.md").read_text()
    for name, spec in FORMATS.items():
        keys = ", ".join(f"`{k}`" for k in spec.keys)
        assert f"| `{name}` | {keys} | {spec.summary} |" in docs, name


def test_data_flags_are_checked_at_parse_time(tmp_path, capsys):
    from q_tuning.sft.data.config import DataConfig
    from q_tuning.sft.train.arguments import parse_args

    base = ["--hf-checkpoint", "m", "--data-path", "d.jsonl", "--global-batch-size", "2",
            "--train-iters", "1"]
    for extra, message in (
            (["--chat-template-kwargs", "[1]"], "--chat-template-kwargs: expected a JSON object"),
            (["--chat-template-kwargs", "{enable"], "--chat-template-kwargs: not JSON"),
            (["--chat-template", str(tmp_path / "no.jinja")], "no.jinja: no such file"),
            (["--tokenizer-workers", "0"], "--tokenizer-workers"),
            (["--data-format", "csv"], "--data-format: invalid choice")):
        with pytest.raises(SystemExit):
            parse_args(base + extra)
        assert message in capsys.readouterr().err, extra
    args = parse_args(base + ["--chat-template-kwargs", '{"enable_thinking": false}',
                              "--output-dir", str(tmp_path / "out")])
    config = DataConfig.from_args(args)
    assert config.chat_template_kwargs == {"enable_thinking": False}
    assert config.cache_dir == str(tmp_path / "out" / "data_cache")
    assert DataConfig.from_args(parse_args(base + ["--no-data-cache"])).cache_dir is None
    assert DataConfig.from_args(parse_args(
        base + ["--data-cache-path", str(tmp_path / "c")])).cache_dir == str(tmp_path / "c")
