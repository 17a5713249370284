"""LoRA (`q_tuning.sft.lora`) on a real megatron-core GPTModel built from a tiny HF Llama, against
slow references; one spawn of 1 process (TP=1) and one of 2 (TP=2). B is random and non-zero
throughout (B = 0 at init would hide every mistake):

- the adapter forward equals a LoRA-free model holding W + (alpha/R) B A (fp32: atol 1e-5);
- gradients reach only A and B, and equal autograd through that dense model;
- Q-Tuning's scoring pass on the LoRA model equals it on the dense merged model;
- TP=2 equals TP=1: logits, adapter gradients, grad norm, weights after one
  clipped Adam step, and both exports;
- adapter dropout acts in training mode only (TP=1 and TP=2);
- the merged export loaded by transformers, and the peft export loaded by peft onto the base,
  give the LoRA model's logits;
- flags: bad settings are parse-time errors naming the flag.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.harness.launch import run_distributed

pytest.importorskip("transformers")

TIMEOUT = 300
ATOL, RTOL = 1e-5, 1e-4  # fp32, different summation orders


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tests.workers import lora as W

    return W.save_tiny_llama(str(tmp_path_factory.mktemp("lora_hf") / "base"))


@pytest.fixture(scope="module")
def tp1(hf_dir, tmp_path_factory):
    from tests.workers import lora as W

    out = tmp_path_factory.mktemp("lora_tp1")
    return out, run_distributed(W.reference, 1, hf_dir, str(out), timeout=TIMEOUT)[0]


@pytest.fixture(scope="module")
def tp2(hf_dir, tp1):
    from tests.workers import lora as W

    return run_distributed(W.split, 2, hf_dir, tp1[1]["full"], timeout=TIMEOUT)[0]


def _close(a: torch.Tensor, b: torch.Tensor, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


def _close_dicts(a: dict, b: dict, atol=ATOL, rtol=RTOL):
    assert sorted(a) == sorted(b)
    for key in a:
        _close(a[key], b[key], atol, rtol)


def test_adapter_forward_equals_dense_merged_weight(tp1):
    _, r = tp1
    assert r["logits"].abs().max() > 1.0  # not a degenerate model
    _close(r["logits"], r["dense_logits"])


def test_gradients_reach_only_adapters_and_equal_dense_autograd(tp1):
    _, r = tp1
    trainable = sorted(n for n, g in r["requires_grad"].items() if g)
    assert trainable and all(".adapter.linear_" in n for n in trainable)
    assert sorted(r["grads"]) == trainable == sorted(r["dense_grads"])
    for name, reference in r["dense_grads"].items():
        assert reference.abs().max() > 1e-3, name
        _close(r["grads"][name], reference, atol=1e-4, rtol=1e-5 * 20)
    # megatron's optimizer holds only the adapters
    assert r["step"]["optimized"] == r["step"]["trainable"] == sum(
        r["full"][n].numel() for n in trainable)


def test_q_tuning_scores_with_base_plus_adapters(tp1):
    _, r = tp1
    for lora, dense in zip(r["scores"], r["dense_scores"]):
        _close(lora, dense)


def test_tensor_parallel_equals_one_process(tp1, tp2):
    _, one = tp1
    _close_dicts(tp2["loaded"], one["full"], 0, 0)  # the split round-trips exactly
    _close(tp2["logits"], one["logits"])
    _close_dicts(tp2["step"]["grads"], one["step"]["grads"], atol=1e-4)
    assert tp2["step"]["grad_norm"] == pytest.approx(one["step"]["grad_norm"], rel=1e-5)
    _close_dicts(tp2["step"]["after"], one["step"]["after"])
    for kind in ("peft", "merged"):
        _close_dicts(tp2["exports"][kind], one["exports"][kind])


def test_dropout_acts_in_training_only(tp1, tp2):
    for result in (tp1[1], tp2):
        d = result["dropout"]
        _close(d["eval"], tp1[1]["logits"])
        assert not torch.allclose(d["train1"], d["eval"], atol=1e-3)
        assert not torch.allclose(d["train1"], d["train2"], atol=1e-3)


def test_step_changes_adapters_only(tp1):
    _, r = tp1
    before, after = r["full"], r["step"]["after"]
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == (".adapter." in name), name


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_merged_export_loads_in_transformers(tp1):
    import transformers

    from tests.workers import lora as W

    out, r = tp1
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "merged",
                                                              torch_dtype=torch.float32)
    _close(_hf_logits(model, W.tokens()), r["logits"])


def test_peft_export_loads_onto_base(tp1, hf_dir):
    peft = pytest.importorskip("peft")
    import transformers

    from tests.workers import lora as W

    out, r = tp1
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    base_logits = _hf_logits(base, W.tokens())
    model = peft.PeftModel.from_pretrained(base, out / "peft")
    assert model.peft_config["default"].r == W.RANK
    logits = _hf_logits(model, W.tokens())
    assert (logits - base_logits).abs().max() > 0.1  # the adapters act
    _close(logits, r["logits"])


# --- flags ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--lora-rank", "-1"], "--lora-rank: must be >= 0"),
    (["--lora-rank", "4", "--lora-target-modules", "linear_qkv", "q_proj"],
     "--lora-target-modules: unknown ['q_proj']"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha must be > 0"),
    (["--lora-rank", "4", "--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
    (["--lora-alpha", "16"], "--lora-alpha needs --lora-rank >= 1"),
    (["--export-lora", "x"], "--export-lora needs --lora-rank >= 1"),
    (["--lora-rank", "4", "--context-parallel-size", "2"], "--context-parallel-size > 1"),
    (["--lora-rank", "4", "--tensor-model-parallel-size", "2", "--sequence-parallel"],
     "--lora-rank with --sequence-parallel"),
])
def test_bad_flags_are_parse_errors(flags, message):
    proc = subprocess.run([sys.executable, "-c",
                           "import sys; from q_tuning.sft.train.arguments import parse_args; "
                           "parse_args(sys.argv[1:])", "--preset", "smollm2-gsm",
                           "--train-iters", "1", *flags], capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr


def test_default_alpha_is_twice_the_rank():
    from q_tuning.sft.lora.config import LoRAConfig
    from q_tuning.sft.train.arguments import parse_args

    args = parse_args(["--preset", "smollm2-gsm", "--train-iters", "1", "--lora-rank", "8"])
    config = LoRAConfig.from_args(args)
    assert (config.effective_alpha, config.scale) == (16.0, 2.0)
    assert config.target_modules == ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    off = parse_args(["--preset", "smollm2-gsm", "--train-iters", "1"])
    assert LoRAConfig.from_args(off) is None
