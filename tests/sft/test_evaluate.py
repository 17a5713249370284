"""q-tuning-eval: answer parsing, the stop criterion, KV-cache batched greedy decoding against a
slow no-cache reference, the generation prompt against the trainer's tokenization, reference-
solution NLL against a naive computation, the CLI and its errors. A tiny random Llama with the
SmolLM2 tokenizer, one torch thread (tiny matmuls only lose to thread hand-offs on a busy box)."""

from __future__ import annotations

import decimal
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from q_tuning.sft.evaluate import cli as E  # noqa: E402
from tests.harness.hf import save_tiny_llama, slow_greedy  # noqa: E402

pytestmark = pytest.mark.next_stack  # transformers 5 regressions: .ci/run's .venv-next

ROWS = [{"prompt": f"What is {i} + {2 * i}?", "response": f"{i} + {2 * i} = {3 * i}.\n#### {3 * i}",
         "answer": str(3 * i), "id": i} for i in range(1, 6)]
ROWS[2]["prompt"] = "A much longer question, so that the batch needs left padding: " * 3

KEYS = {"checkpoint", "data_path", "num_samples", "accuracy", "correct", "nll_per_token",
        "nll_per_sample_mean", "loss_tokens", "generated_tokens", "seconds_generate",
        "seconds_nll", "seconds_prefill", "seconds_decode", "max_new_tokens", "batch_size",
        "nll_per_number_token", "nll_per_other_token", "number_tokens"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_llama(folder, tmp_path_factory.getbasetemp() / "q_tuning_cache")
    data = folder / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    model, tokenizer = E.load_model(str(folder))
    return folder, data, model, tokenizer


@pytest.mark.parametrize("text,expected", [
    ("so 12 apples\n#### 12", "12"), ("#### $1,234.50\n", "1234.50"), ("####-7", "-7"),
    ("#### 3\nthen\n#### 4", "4"), ("#### 5.0", "5"), ("#### 12.", "12"), ("####  $7.", "7"),
    ("#### 1,000,000 dollars", "1000000"), ("no final line 12", None), ("#### none", None),
    ("#### 80 + 8 = 98 pieces", "80"), ("", None),
])
def test_extract_answer(text, expected):
    got = E.extract_answer(text)
    assert got == (None if expected is None else decimal.Decimal(expected))


@pytest.mark.parametrize("truth", ["12", "12.0", "12.00", "$12", "1,2"])
def test_numbers_compare_by_value(truth):
    assert E.extract_answer("#### 12.0\n") == E.normalize_number(truth)


def test_answer_line_completion_waits_for_the_newline():
    assert not E.answer_complete("so #### 1")
    assert not E.answer_complete("#### 12")  # the number may still grow
    assert not E.answer_complete("####")
    assert E.answer_complete("#### 12\n")
    assert not E.answer_complete("####\n")  # no number yet
    assert not E.answer_complete("#### \n")
    assert E.answer_complete("x\n#### 1,000 apples\nmore")


def test_a_row_finishes_at_end_of_turn_answer_line_or_limit(tiny):
    """The per-row stop decision on real token ids: only the generated tokens count, and a row
    stops once its answer line has ended, at an end-of-turn token, or at the token limit."""
    _, _, _, tokenizer = tiny
    eos = E._end_of_turn_ids(tokenizer)
    texts = {"so 4 + 8 = 12\n#### 1": False, "so 4 + 8 = 12\n#### 12": False,
             "so 4 + 8 = 12\n#### 12\n": True, "so 4 + 8 = 12\n####": False,
             "word " * 100 + "\n#### 7\n": True}
    for text, done in texts.items():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert E.finished(tokenizer, ids, eos, 1000) is done, text
        assert E.finished(tokenizer, ids, eos, len(ids)), text
    assert E.finished(tokenizer, tokenizer("so 4", add_special_tokens=False)["input_ids"]
                      + eos[:1], eos, 1000)


def test_batched_cached_greedy_equals_the_slow_reference(tiny):
    _, _, model, tokenizer = tiny
    prompts = [E.prompt_ids(tokenizer, r["prompt"]) for r in ROWS]
    assert len({len(p) for p in prompts}) > 2
    got = E.greedy_generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=3)
    eos = E._end_of_turn_ids(tokenizer)
    with torch.inference_mode():
        for prompt, new in zip(prompts, got):
            ref = slow_greedy(model, prompt, 12, eos)
            # generation may stop early, at the first completed answer line: a prefix
            assert new == ref[:len(new)]
            assert len(new) == len(ref) or (E.answer_complete(tokenizer.decode(new)) and
                                            not E.answer_complete(tokenizer.decode(new[:-1])))


def test_rows_leaving_the_batch_early_do_not_change_the_others(tiny, monkeypatch):
    """Make one row end early (its third greedy token declared end of turn): the rows that
    finish early leave the batch and the KV cache, and every row still equals its reference."""
    _, _, model, tokenizer = tiny
    prompts = [E.prompt_ids(tokenizer, r["prompt"]) for r in ROWS]
    with torch.inference_mode():
        free = [slow_greedy(model, p, 12, []) for p in prompts]
    stop = free[0][2]
    monkeypatch.setattr(E, "_end_of_turn_ids", lambda tokenizer: [stop])
    got = E.greedy_generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=5)
    lengths = [len(g) for g in got]
    assert min(lengths) < 12 == max(lengths)  # some rows left early, some ran to the limit
    with torch.inference_mode():
        assert got == [slow_greedy(model, p, 12, [stop]) for p in prompts]


def test_generation_prompt_is_the_trainers_context(tiny):
    """The prompt fed to generate is exactly the trainer's tokens before the first loss token:
    the chat-templated user turn (with the template's default system turn) + assistant header."""
    from q_tuning.sft.data.dataset import tokenize_conversation

    _, _, _, tokenizer = tiny
    for row in ROWS:
        tokens, mask = tokenize_conversation(tokenizer, [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["response"]}])
        first = int(mask.nonzero()[0])
        assert E.prompt_ids(tokenizer, row["prompt"]) == tokens[:first].tolist()
        assert tokenizer.decode(tokens[:first]).endswith("<|im_start|>assistant\n")
        assert tokenizer.decode(tokens[mask.bool()]) == row["response"] + "<|im_end|>"


def test_nll_equals_a_naive_reference(tiny):
    from q_tuning.sft.data.dataset import tokenize_conversation

    _, _, model, tokenizer = tiny
    got = E.reference_nll(model, tokenizer, ROWS, batch_size=2)
    with torch.inference_mode():
        for row, (nll_sum, count, number_sum, number_count) in zip(ROWS, got):
            tokens, mask = tokenize_conversation(tokenizer, [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["response"]}])
            logp = torch.log_softmax(model(input_ids=tokens[None]).logits[0].double(), -1)
            ref = [-float(logp[t - 1, tokens[t]]) for t in range(1, tokens.numel()) if mask[t]]
            assert count == len(ref)
            assert nll_sum == pytest.approx(sum(ref), rel=1e-4)
            numbers = [-float(logp[t - 1, tokens[t]]) for t in range(1, tokens.numel())
                       if mask[t] and any(c.isdigit() for c in tokenizer.decode([tokens[t]]))]
            assert number_count == len(numbers) > 0
            assert number_sum == pytest.approx(sum(numbers), rel=1e-4)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_shared_prefill_path_gives_the_two_pass_outputs(tiny, batch_size):
    """`generate_with_nll` (one prompt forward per row, shared by generation and the NLL) against
    the two separate passes it replaces (`greedy_generate`, then `reference_nll`): the same
    generated tokens, and the same NLL up to float32 summation order."""
    _, _, model, tokenizer = tiny
    rows = ROWS + [dict(ROWS[0], prompt="Short?", response="A much longer reference answer, "
                        "with several clauses, so that responses need right padding.\n#### 3")]
    prompts = [E.prompt_ids(tokenizer, r["prompt"]) for r in rows]
    old_generated = E.greedy_generate(model, tokenizer, prompts, max_new_tokens=12,
                                      batch_size=batch_size)
    old_nll = E.reference_nll(model, tokenizer, rows, batch_size=max(1, batch_size // 2))
    generated, nll, seconds = E.generate_with_nll(model, tokenizer, rows, max_new_tokens=12,
                                                  batch_size=batch_size)
    assert generated == old_generated
    assert isinstance(seconds, E.EvalSeconds) and min(seconds) >= 0 and seconds.decode > 0
    for new, old in zip(nll, old_nll):
        assert (new.count, new.number_count) == (old.count, old.number_count)
        assert new.sum == pytest.approx(old.sum, rel=1e-5)
        assert new.number_sum == pytest.approx(old.number_sum, rel=1e-5, abs=1e-6)


def test_a_row_whose_prompt_is_not_a_prefix_falls_back_to_the_two_pass_nll(tiny, monkeypatch):
    _, _, model, tokenizer = tiny
    real = E.prompt_ids
    monkeypatch.setattr(E, "prompt_ids", lambda tok, prompt: real(tok, prompt)[1:]
                        if prompt == ROWS[1]["prompt"] else real(tok, prompt))
    _, nll, _ = E.generate_with_nll(model, tokenizer, ROWS, max_new_tokens=4, batch_size=2)
    old = E.reference_nll(model, tokenizer, ROWS, batch_size=1)
    for new, ref in zip(nll, old):
        assert new.count == ref.count and new.sum == pytest.approx(ref.sum, rel=1e-5)


def test_cli_writes_the_result(tiny, tmp_path, capsys):
    folder, data, _, _ = tiny
    out, preds = tmp_path / "r.json", tmp_path / "p.jsonl"
    E.main(["--hf-checkpoint", str(folder), "--data-path", str(data), "--num-samples", "4",
            "--batch-size", "2", "--max-new-tokens", "6", "--output", str(out),
            "--predictions", str(preds), "--threads", "1"])
    result = json.loads(out.read_text())
    assert set(result) == KEYS
    assert result["num_samples"] == 4 and result["correct"] == round(4 * result["accuracy"])
    assert result["nll_per_token"] > 0 and result["loss_tokens"] > 0
    assert 0 < result["generated_tokens"] <= 4 * 6
    assert result["batch_size"] == 2 and result["max_new_tokens"] == 6
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["id"] for r in lines] == [1, 2, 3, 4]  # file order, not the length-sorted order
    assert sum(r["loss_tokens"] for r in lines) == result["loss_tokens"]
    assert sum(r["correct"] for r in lines) == result["correct"]
    assert result["nll_per_sample_mean"] == pytest.approx(sum(r["nll"] for r in lines) / 4)
    assert "q-tuning-eval:" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporary file


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "a", "response": "b", "answer": "1"}\n\n{oops\n', "line 3: not valid JSON"),
    ('{"prompt": "a", "answer": "1"}\n', "line 1: missing field(s) response"),
    ('{"prompt": "a", "response": "b", "answer": "1"}\n{"response": "b"}\n',
     "line 2: missing field(s) prompt, answer"),
    ('[1, 2]\n', "line 1: expected a JSON object"),
    ('{"prompt": 3, "response": "b", "answer": "1"}\n', "line 1: 'prompt' must be a string"),
    ("\n\n", "no rows"),
])
def test_bad_data_names_file_and_line(tmp_path, capsys, content, message):
    path = tmp_path / "e.jsonl"
    path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        E.main(["--data-path", str(path), "--output", str(tmp_path / "r.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("q-tuning-eval: error:") and str(path) in err and message in err
    assert not (tmp_path / "r.json").exists()


def test_bad_checkpoint_names_the_flag(tmp_path, capsys, tiny):
    _, data, _, _ = tiny
    with pytest.raises(SystemExit) as exit_info:
        E.main(["--hf-checkpoint", str(tmp_path / "nope"), "--data-path", str(data)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--hf-checkpoint" in err and str(tmp_path / "nope") in err


def test_module_entry_point_reports_a_missing_file(tmp_path):
    """`python -m q_tuning.sft.evaluate.cli`: one error line naming the flag and file, status 2,
    no output file, no traceback."""
    path = tmp_path / "missing.jsonl"
    proc = subprocess.run([sys.executable, "-m", "q_tuning.sft.evaluate.cli", "--data-path",
                           str(path), "--output", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("q-tuning-eval: error: --data-path") and str(path) in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r.json").exists()
