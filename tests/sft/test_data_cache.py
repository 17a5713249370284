"""Tokenize once: worker processes give the same result in the same order, the progress bar, the
on-disk cache (reused; a truncated, corrupt, foreign or stale file rebuilt, never trusted), one
rank per host tokenizing while the other waits, and records with tool calls and two turns under
a history-rewriting template training in a tiny trainer run that reloads its cache."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from q_tuning.sft.data import cache as data_cache
from q_tuning.sft.data import loading
from q_tuning.sft.data.config import DataConfig
from q_tuning.sft.data.reader import read_conversation_files
from q_tuning.sft.data.tokenizing import tokenize_all
from q_tuning.sft.hf.assets import load_tokenizer
from q_tuning.sft.data.conversations import DataError
from tests.harness import chat_reference as ref
from tests.harness.launch import run_distributed

ROWS = [{"prompt": f"What is {i} plus {i}?", "response": f"{2 * i}."} for i in range(30)] + [
    {"messages": [{"role": "user", "content": "hello?"}]},  # no assistant turn: skipped
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                       {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye!"}]}]


@pytest.fixture(scope="module")
def tok_cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "q_tuning_cache"


@pytest.fixture(scope="module")
def tok(tok_cache):
    return load_tokenizer(cache_dir=tok_cache)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def as_lists(samples):
    return [(s.source, s.index, s.truncated, s.tokens.tolist(), s.loss_mask.tolist())
            for s in samples]


@pytest.fixture
def counted(monkeypatch):
    """How many conversations `load_samples` tokenized, call by call."""
    calls = []

    def counting(tokenizer, conversations, **kwargs):
        calls.append(len(conversations))
        return tokenize_all(tokenizer, conversations, **kwargs)

    monkeypatch.setattr(loading, "tokenize_all", counting)
    return calls


def test_workers_give_the_same_samples_in_the_same_order(tok, tmp_path, capfd):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS * 3)
    conversations = read_conversation_files(path).conversations
    one = tokenize_all(tok, conversations, workers=1, progress=False)
    two = tokenize_all(tok, conversations, workers=2, progress=True)
    assert [(a.tolist(), m.tolist()) for a, m in one] == [(a.tolist(), m.tolist()) for a, m in two]
    bar = capfd.readouterr().err.replace("\r", "\n").splitlines()
    assert any(line.startswith("tokenizing: 100%") and f"{len(one)}/{len(one)} [" in line
               and "conv/s]" in line for line in bar), bar


def test_a_worker_error_names_the_record(tok, tmp_path):
    bad = tok.__class__.from_pretrained(tok.name_or_path)
    bad.chat_template = ref.CHATML.replace("m.content", "m.content.missing_method()")
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:4])
    conversations = read_conversation_files(path).conversations
    with pytest.raises(DataError, match=r"d\.jsonl:1: the chat template failed"):
        tokenize_all(bad, conversations, workers=2, progress=False)


def test_the_cache_is_written_once_and_loaded_after(tok, tmp_path, counted):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    config = DataConfig((str(path),), 44, cache_dir=str(tmp_path / "cache"))  # cuts some
    first, stats = loading.load_samples(config, tok)
    assert counted == [31] and stats.truncated > 0 and stats.skipped_no_assistant == 1
    again, stats_again = loading.load_samples(config, tok)
    assert counted == [31], "the second load tokenized again"
    assert as_lists(again) == as_lists(first) and stats_again == stats
    uncached, _ = loading.load_samples(DataConfig((str(path),), 44), tok)
    assert as_lists(uncached) == as_lists(first)
    # --strict-data applies to a cached load too
    with pytest.raises(DataError, match=r"d\.jsonl:31: no assistant turn \(--strict-data"):
        loading.load_samples(DataConfig((str(path),), 44, strict=True,
                                        cache_dir=str(tmp_path / "cache")), tok)
    assert counted == [31, 31]


@pytest.mark.parametrize("damage", ["truncate", "flip", "header", "foreign"])
def test_a_damaged_or_foreign_cache_is_rebuilt(tok, tmp_path, counted, damage):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    config = DataConfig((str(path),), 64, cache_dir=str(tmp_path / "cache"))
    first, _ = loading.load_samples(config, tok)
    file = data_cache.cache_path(config, tok)
    data = file.read_bytes()
    if damage == "truncate":
        file.write_bytes(data[:len(data) - 100])
    elif damage == "flip":
        file.write_bytes(data[:-50] + bytes([data[-50] ^ 1]) + data[-49:])
    elif damage == "header":
        file.write_bytes(b"garbage\n" + data)
    else:  # another data set's whole, valid file under this name
        other = DataConfig((str(write_jsonl(tmp_path / "e.jsonl", ROWS[:5])),), 64,
                           cache_dir=str(tmp_path / "cache"))
        loading.load_samples(other, tok)
        file.write_bytes(data_cache.cache_path(other, tok).read_bytes())
    rebuilt, _ = loading.load_samples(config, tok)
    assert as_lists(rebuilt) == as_lists(first)
    assert counted[-1] == 31 and len(counted) == (3 if damage == "foreign" else 2)
    assert loading.load_samples(config, tok)[0] and counted[-1] == 31  # valid again: reused
    assert len(counted) == (3 if damage == "foreign" else 2)


def test_a_stale_cache_is_never_used(tok, tmp_path, counted):
    """Changed data, --seq-length, template arguments, template or format: another key."""
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    base = DataConfig((str(path),), 64, cache_dir=str(tmp_path / "cache"))
    first, _ = loading.load_samples(base, tok)
    write_jsonl(path, ROWS[:-1] + [{"prompt": "Changed?", "response": "Yes."}])
    changed, _ = loading.load_samples(base, tok)
    assert changed[-1].source == f"{path}:32" and as_lists(changed)[:30] == as_lists(first)[:30]
    assert tok.decode(changed[-1].tokens[changed[-1].loss_mask.bool()]) == "Yes.<|im_end|>"
    keys = {data_cache.cache_key(base, tok)}
    for variant in (dict(seq_length=65), dict(chat_template_kwargs={"enable_thinking": False}),
                    dict(data_format="prompt-response")):
        keys.add(data_cache.cache_key(DataConfig(**{**base.__dict__, **variant}), tok))
    other_template = tok.__class__.from_pretrained(tok.name_or_path)
    other_template.chat_template = ref.CHATML
    keys.add(data_cache.cache_key(base, other_template))
    assert len(keys) == 5
    assert counted == [31, 31]


def test_one_rank_per_host_tokenizes(tok, tmp_path, tok_cache):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    config = DataConfig((str(path),), 64, cache_dir=str(tmp_path / "cache"))
    from tests.workers import data_cache as W

    results = run_distributed(W.tokenize_once, 2, config, str(tok_cache), timeout=240)
    assert [r["error"] for r in results] == [None, None]
    assert [r["tokenized"] for r in results] == [[31], []]
    assert results[0]["samples"] == results[1]["samples"]
    want, _ = loading.load_samples(DataConfig((str(path),), 64), tok)
    assert results[0]["samples"] == [(s.source, s.tokens.tolist(), s.loss_mask.tolist())
                                     for s in want]

    bad = write_jsonl(tmp_path / "bad.jsonl", ROWS[:2])
    bad.write_text(bad.read_text() + "{oops\n")
    config = DataConfig((str(bad),), 64, cache_dir=str(tmp_path / "cache"))
    results = run_distributed(W.tokenize_once, 2, config, str(tok_cache), timeout=240)
    for result in results:  # the leader's error, on both ranks
        assert "rank 0: " in result["error"] and "bad.jsonl:3: malformed JSON" in result["error"]


def test_tool_call_and_two_turn_records_train(tmp_path_factory, tok_cache):
    """q-tuning-train with a Qwen3-style template (--chat-template), tools, tool calls and two-turn
    reasoning records, 2 tokenizer workers; a second run with the same data loads the cache and
    trains identically."""
    from tests.workers import trainer as W_trainer

    root = tmp_path_factory.mktemp("train_formats")
    assets = W_trainer.make_assets(str(root), str(tok_cache))
    template = root / "qwen3_style.jinja"
    template.write_text(ref.QWEN3_STYLE)
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    rows = []
    for i in range(4):
        rows.append({"tools": [weather], "messages": [
            {"role": "user", "content": f"Weather in city {i}?"},
            {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
                "name": "get_weather", "arguments": json.dumps({"city": f"city {i}"})}}]},
            {"role": "tool", "content": f"{10 + i} C"},
            {"role": "assistant", "content": f"It is {10 + i} C."}]})
        rows.append({"conversations": [
            {"from": "human", "value": f"What is {i} + {i}?"},
            {"from": "gpt", "value": f"<think>\nadd\n</think>\n\n{2 * i}"},
            {"from": "human", "value": "Doubled?"}, {"from": "gpt", "value": f"{4 * i}"}]})
    data = write_jsonl(root / "chats.jsonl", rows)
    runs = [(name, ["--hf-checkpoint", assets["llama"], "--data-path", str(data),
                    "--chat-template", str(template), "--tokenizer-workers", "2",
                    "--data-cache-path", str(root / "data_cache"), "--global-batch-size", "4",
                    "--micro-batch-size", "2", "--seq-length", "256", "--lr", "1e-3",
                    "--train-iters", "2", "--seed", "7", "--no-save",
                    "--output-dir", str(root / name)])
            for name in ("first", "again")]
    results = run_distributed(W_trainer.run_many, 1, runs, timeout=420)[0]
    losses = {}
    for name in ("first", "again"):
        assert results[name]["error"] is None, results[name]["error"]
        losses[name] = [m["loss"] for m in results[name]["history"]]
        assert len(losses[name]) == 2 and all(loss > 0 for loss in losses[name])
    assert losses["first"] == losses["again"]
    first_log = (root / "first" / "train.log").read_text()
    again_log = (root / "again" / "train.log").read_text()
    assert "tokenized data cached in" in first_log
    assert "loaded the tokenized data from" in again_log
    assert "8 samples" in again_log and "4 messages, 4 sharegpt" in again_log
