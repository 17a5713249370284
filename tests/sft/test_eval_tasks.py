"""q-tuning-eval's --task mmlu / qa-exact / nll on a tiny random Llama with the SmolLM2 tokenizer,
each against a slow obviously-correct reference: MMLU scores against one unbatched forward per
choice, qa-exact decoding against the no-cache greedy reference, NLL against a direct
log-softmax; the answer normalisation table; flags that do not fit the task rejected at parse
time; bad rows named by file and line."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from q_tuning.sft.evaluate import cli as E  # noqa: E402
from q_tuning.sft.evaluate.tasks import mmlu, nll, qa, rows as R  # noqa: E402
from tests.harness.hf import one_torch_thread, save_tiny_llama, slow_greedy  # noqa: E402,F401

MMLU = [{"id": 0, "subject": "astronomy", "question": "Which planet is largest?",
         "choices": ["Mars", "Jupiter", "Venus", "Mercury"], "answer": 1},
        {"id": 1, "subject": "", "question": "A much longer question, so that the batch needs "
         "padding: " * 4, "choices": ["yes", "no, because of the long reason given", "maybe",
                                      "it depends"], "answer": 3},
        {"id": 2, "subject": "logic", "question": "2 + 2?", "choices": ["4", "5", "22"],
         "answer": 0}]
QA = [{"id": i, "prompt": p, "references": refs} for i, (p, refs) in enumerate([
    ("The capital of France is", ["Paris"]), ("Answer briefly. The author of Hamlet is",
                                              ["William Shakespeare", "Shakespeare"]),
    ("Complete: the largest ocean is " * 3, ["the Pacific Ocean"])])]
PAIRS = [{"id": i, "prompt": p, "response": r} for i, (p, r) in enumerate([
    ("Translate to French: cat", "chat"), ("Write a question about this text: " * 5,
                                           "What is the text about, and who wrote it?"),
    ("Sum 2 and 3.", "5")])]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_torch_thread):
    folder = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_llama(folder, tmp_path_factory.getbasetemp() / "q_tuning_cache")
    model, tokenizer = E.load_model(str(folder))
    return folder, model, tokenizer


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("text,expected", [
    ("The United States", "united states"), ("  Paris. ", "paris"), ("an Apple a day", "apple day"),
    ("U.S.A.", "usa"), ("Jean-Paul  Sartre", "jeanpaul sartre"), ("Paris, France", "paris france"), ("THE END!", "end"),
    ("theatre", "theatre"), ("«Óscar»", "óscar"), ("", ""), ("a", ""),
])
def test_normalize_answer_table(text, expected):
    assert qa.normalize_answer(text) == expected


@pytest.mark.parametrize("answer,refs,stem,exact,contains", [
    ("The Pacific Ocean.", ["Pacific Ocean"], "", True, True),
    ("Paris, France", ["Paris"], "", False, True),
    ("Parisian", ["Paris"], "", False, False),
    ("Shakespeare", ["William Shakespeare", "Shakespeare"], "", True, True),
    ("", ["x"], "", False, False),
    ("The capital of France is Paris.", ["Paris"], "The capital of France is", True, True),
    ("The capital of France is Paris.", ["Paris"], "", False, True),
    ("Paris", ["Paris"], "The capital of France is", True, True),
    ("The capital of France is", ["Paris"], "The capital of France is", False, False),
    ("The capitalist is Paris", ["Paris"], "The capital", False, True),  # whole words only
])
def test_exact_match_against_any_reference(answer, refs, stem, exact, contains):
    assert qa.score_answer(answer, refs, stem) == (exact, contains)


def test_answer_line_is_the_first_non_empty_line():
    assert qa.answer_line("\n  Paris\nis the capital") == "Paris"
    assert qa.answer_line(" \n") == ""


def _slow_choice_logprob(model, prompt: list[int], cont: list[int]) -> float:
    """The whole prompt + continuation through the model alone: sum of log p(cont token)."""
    ids = torch.tensor([prompt + cont])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(float(logp[len(prompt) + k - 1, t]) for k, t in enumerate(cont))


@pytest.mark.parametrize("continuation,batch_size", [("letter", 2), ("text", 3), ("text", 1)])
def test_mmlu_scores_equal_one_unbatched_forward_per_choice(tiny, tmp_path, continuation,
                                                            batch_size):
    _, model, tokenizer = tiny
    rows = R.read_mmlu(str(_write(tmp_path / "m.jsonl", MMLU)))
    items = mmlu.score_mmlu(model, tokenizer, rows, continuation=continuation,
                            batch_size=batch_size)
    with torch.inference_mode():
        for row, item in zip(rows, items):
            prompt, conts = mmlu.mmlu_sequences(tokenizer, row, continuation)
            ref = [_slow_choice_logprob(model, prompt, c) for c in conts]
            assert item.logprobs == pytest.approx(ref, rel=1e-4, abs=1e-4)
            assert item.predicted == max(range(len(ref)), key=ref.__getitem__)
            assert item.tokens == [len(c) for c in conts]
    if continuation == "letter":
        assert all(n == 1 for item in items for n in item.tokens)
    else:  # the text of the choices is what is scored, not a letter
        assert items[1].tokens[1] > 3


def test_mmlu_prompt_lists_the_choices_only_for_letters():
    row = R.MmluRow(0, "astronomy", "Q?", ("x", "y"), 0, "f:1")
    assert mmlu.mmlu_prompt(row, "letter").endswith("A. x\nB. y\nAnswer with the letter of the "
                                                    "correct choice.")
    assert mmlu.mmlu_prompt(row, "text") == ("The following is a multiple choice question about "
                                             "astronomy.\n\nQ?")


def test_nll_task_equals_a_direct_computation(tiny):
    from q_tuning.sft.data.dataset import tokenize_conversation

    _, model, tokenizer = tiny
    summary, records = nll.evaluate_nll(model, tokenizer, PAIRS, batch_size=2)
    total, count = 0.0, 0
    with torch.inference_mode():
        for row, record in zip(PAIRS, records):
            tokens, mask = tokenize_conversation(tokenizer, [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["response"]}])
            logp = torch.log_softmax(model(input_ids=tokens[None]).logits[0].double(), -1)
            ref = [-float(logp[t - 1, tokens[t]]) for t in range(1, tokens.numel()) if mask[t]]
            # the response's tokens and the end of turn, nothing of the prompt
            assert tokenizer.decode(tokens[mask.bool()]) == row["response"] + "<|im_end|>"
            assert record["loss_tokens"] == len(ref)
            assert record["nll_sum"] == pytest.approx(sum(ref), rel=1e-5)
            total, count = total + sum(ref), count + len(ref)
    assert summary["nll_per_token"] == pytest.approx(total / count, rel=1e-5)
    assert summary["per_item"]["loss_tokens"] == [r["loss_tokens"] for r in records]


@pytest.mark.parametrize("batch_size", [1, 2])
def test_qa_decoding_equals_the_slow_greedy_reference(tiny, tmp_path, batch_size):
    _, model, tokenizer = tiny
    rows = R.read_qa(str(_write(tmp_path / "q.jsonl", QA)))
    got = qa.generate_answers(model, tokenizer, rows, max_new_tokens=7, batch_size=batch_size)
    eos = E.end_of_turn_ids(tokenizer)
    with torch.inference_mode():
        for row, new in zip(rows, got):
            ref = slow_greedy(model, E.prompt_ids(tokenizer, row.prompt), 7, eos)
            assert new == ref[:len(new)]  # stops early only at a newline after some text
            if len(new) < len(ref):
                assert "\n" in tokenizer.decode(new).lstrip()
                assert "\n" not in tokenizer.decode(new[:-1]).lstrip()


def _cli(tmp_path, *argv):
    out, preds = tmp_path / "r.json", tmp_path / "p.jsonl"
    E.main([*argv, "--output", str(out), "--predictions", str(preds), "--threads", "1"])
    return json.loads(out.read_text()), [json.loads(x) for x in preds.read_text().splitlines()]


def test_cli_runs_each_task_with_per_item_records(tiny, tmp_path, capsys):
    folder = str(tiny[0])
    result, records = _cli(tmp_path, "--task", "mmlu", "--hf-checkpoint", folder, "--data-path",
                           str(_write(tmp_path / "m.jsonl", MMLU)), "--batch-size", "2")
    assert result["continuation"] == "letter" and result["num_samples"] == 3
    assert result["per_item"]["correct"] == [int(r["correct"]) for r in records]
    assert [r["id"] for r in records] == [0, 1, 2]
    result, records = _cli(tmp_path, "--task", "qa-exact", "--hf-checkpoint", folder,
                           "--data-path", str(_write(tmp_path / "q.jsonl", QA)),
                           "--max-new-tokens", "5")
    assert result["max_new_tokens"] == 5 and len(result["per_item"]["exact"]) == 3
    assert all(0 < r["generated_tokens"] <= 5 for r in records)
    result, records = _cli(tmp_path, "--task", "nll", "--hf-checkpoint", folder, "--data-path",
                           str(_write(tmp_path / "n.jsonl", PAIRS)), "--num-samples", "2")
    assert result["num_samples"] == 2 and result["nll_per_token"] > 0
    assert "q-tuning-eval: --task nll: held-out NLL" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--task", "mcq"], "invalid choice: 'mcq'"),
    (["--task", "mmlu", "--max-new-tokens", "4"], "--max-new-tokens: --task mmlu generates"),
    (["--task", "nll", "--max-new-tokens", "4"], "--max-new-tokens: --task nll generates"),
    (["--task", "nll", "--mmlu-continuation", "text"], "--mmlu-continuation: only for --task mmlu"),
    (["--mmlu-continuation", "letter"], "--mmlu-continuation: only for --task mmlu"),
    (["--task", "mmlu", "--mmlu-continuation", "word"], "invalid choice: 'word'"),
])
def test_flags_that_do_not_fit_the_task_fail_at_parse_time(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:  # before any file is read or model loaded
        E.main([*argv, "--data-path", str(tmp_path / "missing.jsonl")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("task,row,message", [
    ("mmlu", {"question": "q", "choices": ["a", "b"], "answer": 2}, "line 1: 'answer' must be"),
    ("mmlu", {"question": "q", "choices": ["a", "b"], "answer": True}, "line 1: 'answer' must be"),
    ("mmlu", {"question": "q", "choices": [], "answer": 0}, "line 1: 'choices' must be"),
    ("mmlu", {"choices": ["a"], "answer": 0}, "line 1: missing field 'question'"),
    ("qa-exact", {"prompt": "p", "references": "Paris"}, "line 1: 'references' must be"),
    ("qa-exact", {"prompt": "p", "references": ["a"], "stem": 3}, "line 1: 'stem' must be a"),
    ("nll", {"prompt": "p", "response": 3}, "line 1: 'response' must be a string"),
])
def test_bad_rows_name_file_and_line(tmp_path, capsys, task, row, message):
    path = _write(tmp_path / "d.jsonl", [row])
    with pytest.raises(SystemExit) as exit_info:
        E.main(["--task", task, "--data-path", str(path), "--output", str(tmp_path / "r.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("q-tuning-eval: error:") and str(path) in err and message in err
    assert not (tmp_path / "r.json").exists()
