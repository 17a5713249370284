"""q-tuning-eval: answer parsing, KV-cache batched greedy decoding against a slow no-cache
reference, reference-solution NLL against a naive computation, the CLI and its errors."""

from __future__ import annotations

import decimal
import json
import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from q_tuning.train import evaluate as E  # noqa: E402

ROWS = [{"prompt": f"What is {i} + {2 * i}?", "response": f"{i} + {2 * i} = {3 * i}.\n#### {3 * i}",
         "answer": str(3 * i), "id": i} for i in range(1, 6)]
ROWS[2]["prompt"] = "A much longer question, so that the batch needs left padding: " * 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import transformers

    from q_tuning.train.assets import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = load_tokenizer(cache_dir=tmp_path_factory.getbasetemp() / "q_tuning_cache")
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32,
                                      intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # large weights: peaked, input-dependent greedy choices
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn_like(p) * 3 / math.sqrt(p.shape[1]))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = folder / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return folder, data


@pytest.mark.parametrize("text,expected", [
    ("so 12 apples\n#### 12", "12"), ("#### $1,234.50\n", "1234.50"), ("####-7", "-7"),
    ("#### 3\nthen\n#### 4", "4"), ("#### 5.0", "5"), ("no final line 12", None),
    ("#### none", None), ("#### 80 + 8 = 98 pieces", "80"),
])
def test_extract_answer(text, expected):
    got = E.extract_answer(text)
    assert got == (None if expected is None else decimal.Decimal(expected))


def test_answer_line_completion_waits_for_the_newline():
    assert not E.answer_complete("so #### 1")
    assert not E.answer_complete("#### 12")  # the number may still grow
    assert E.answer_complete("#### 12\n")
    assert not E.answer_complete("####\n")  # no number yet
    assert E.answer_complete("x\n#### 1,000 apples\nmore")


def slow_greedy(model, prompt: list[int], max_new: int, eos: list[int]) -> list[int]:
    """One sample, the whole sequence through the model every step, no cache: argmax."""
    ids = list(prompt)
    new = []
    for _ in range(max_new):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        token = int(logits.argmax())
        new.append(token)
        ids.append(token)
        if token in eos:
            break
    return new


def test_batched_cached_greedy_equals_the_slow_reference(tiny):
    folder, _ = tiny
    model, tokenizer = E.load_model(str(folder))
    prompts = [E._prompt_ids(tokenizer, r["prompt"]) for r in ROWS]
    assert len({len(p) for p in prompts}) > 1
    got = E.greedy_generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=3)
    eos = E._end_of_turn_ids(tokenizer)
    with torch.inference_mode():
        for prompt, new in zip(prompts, got):
            ref = slow_greedy(model, prompt, 12, eos)
            # generation may stop early at a completed answer line: a prefix of the reference
            assert new == ref[:len(new)] and (len(new) == len(ref)
                                              or E.answer_complete(tokenizer.decode(new)))


def test_nll_equals_a_naive_reference(tiny):
    from q_tuning.train.data import tokenize_conversation

    folder, _ = tiny
    model, tokenizer = E.load_model(str(folder))
    got = E.reference_nll(model, tokenizer, ROWS, batch_size=2)
    with torch.inference_mode():
        for row, (nll_sum, count) in zip(ROWS, got):
            tokens, mask = tokenize_conversation(tokenizer, [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["response"]}])
            logp = torch.log_softmax(model(input_ids=tokens[None]).logits[0].double(), -1)
            ref = [-float(logp[t - 1, tokens[t]]) for t in range(1, tokens.numel()) if mask[t]]
            assert count == len(ref)
            assert nll_sum == pytest.approx(sum(ref), rel=1e-4)


def test_cli_writes_the_result(tiny, tmp_path):
    folder, data = tiny
    out, preds = tmp_path / "r.json", tmp_path / "p.jsonl"
    E.main(["--hf-checkpoint", str(folder), "--data-path", str(data), "--num-samples", "4",
            "--batch-size", "2", "--max-new-tokens", "6", "--output", str(out),
            "--predictions", str(preds)])
    result = json.loads(out.read_text())
    assert result["num_samples"] == 4 and result["correct"] == round(4 * result["accuracy"])
    assert result["nll_per_token"] > 0 and result["loss_tokens"] > 0
    lines = [json.loads(l) for l in preds.read_text().splitlines()]
    assert [r["id"] for r in lines] == [1, 2, 3, 4]


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    ('{"prompt": "a", "response": "b", "answer": "1"}\n{oops\n', "line 2: not valid JSON"),
    ('{"prompt": "a", "answer": "1"}\n', "line 1: missing field(s) response"),
])
def test_bad_input_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "e.jsonl"
    if content is not None:
        path.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "q_tuning.train.evaluate", "--data-path",
                           str(path), "--output", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stderr.startswith("q-tuning-eval: error:")
    assert not (tmp_path / "r.json").exists()
