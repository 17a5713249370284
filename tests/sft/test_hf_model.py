"""HF Llama / Qwen2 / Qwen3 <-> megatron-core GPTModel (q_tuning.sft.hf.model).

Reference: transformers' own forward of the same tiny random model (fp32, max |diff| <= 1e-4 on
the real vocabulary). Round trip HF -> megatron -> HF is exact (every tensor equal), at TP=1,
TP=2, PP=2 with virtual stages, and TP=2 x PP=2; so is the folder `save_hf_checkpoint` writes,
read back by transformers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.harness.launch import run_distributed

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
TIMEOUT = 240
VOCAB = 100  # not a multiple of 128: megatron pads it (to 128 at TP=1, 256 at TP=2)
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-6)
FAMILIES = {  # name -> (config class, options beyond COMMON)
    "llama": ("LlamaConfig", dict(rope_theta=500000.0)),
    "qwen2": ("Qwen2Config", dict(rope_theta=1000000.0)),               # q/k/v biases
    "qwen3": ("Qwen3Config", dict(rope_theta=1000000.0, head_dim=32)),  # q/k norms, head_dim
    "llama_mqa": ("LlamaConfig", dict(num_key_value_heads=1)),          # 1 KV head < TP=2
}
TOKENS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0)).numpy()
CASES = [(family, tied) for family in FAMILIES for tied in (True, False)
         if not (family == "llama_mqa" and not tied)]


def _case_name(family: str, tied: bool) -> str:
    return f"{family}_{'tied' if tied else 'untied'}"


def _hf_config(family: str, tied: bool):
    cls_name, options = FAMILIES[family]
    return getattr(transformers, cls_name)(**{**COMMON, **options}, tie_word_embeddings=tied)


def _random_hf_model(family: str, tied: bool, seed: int):
    """A tiny HF model whose every tensor is random and O(1)-preserving (no weight is 1 or 0,
    so a misplaced norm or bias shows)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(family, tied))
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn_like(param)
            if param.dim() == 2:
                param.copy_(noise / math.sqrt(param.shape[1]))
            elif name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:  # biases
                param.copy_(0.1 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """{case name: (HF model, its saved folder, HF logits on TOKENS)} for every case."""
    root = tmp_path_factory.mktemp("hf")
    models = {}
    for i, (family, tied) in enumerate(CASES):
        name = _case_name(family, tied)
        model = _random_hf_model(family, tied, seed=i)
        model.save_pretrained(root / name)
        with torch.no_grad():
            logits = model(torch.from_numpy(TOKENS)).logits.numpy()
        models[name] = (model, str(root / name), logits)
    return models


def _run_layouts(hf_models, out_root, world: int, layouts: list, case_names: list,
                 with_tokenizer: bool = False) -> dict:
    """One spawn of `world` gloo processes that runs every layout (tp, pp, vpp) in turn."""
    from tests.workers import hf_model as W_hf_model

    cases = [(name, hf_models[name][1]) for name in case_names]
    per_rank = run_distributed(W_hf_model.convert_and_run, world, layouts, cases, TOKENS,
                               str(out_root), with_tokenizer, timeout=TIMEOUT)
    return {"per_rank": per_rank, "out_root": out_root, "cases": case_names}


def _check_layout(hf_models, run: dict, layout: tuple, with_tokenizer: bool = False) -> None:
    """Logits within ATOL of transformers', exact export, exact saved folder, for every case."""
    tp, pp, vpp = layout
    for name in run["cases"]:
        model, _, hf_logits = hf_models[name]
        results = [r[layout, name] for r in run["per_rank"]]
        logits = [r["logits"] for r in results if r["logits"] is not None]
        assert len(logits) == 1, f"{name}: logits expected from one rank, got {len(logits)}"
        diff = np.abs(logits[0] - hf_logits).max()
        assert diff <= ATOL, f"{name} at tp={tp} pp={pp} vpp={vpp}: max |logit diff| {diff:.2e}"
        reference = {k: v.numpy() for k, v in model.state_dict().items()}
        _assert_same_state_dict(results[0]["export"], reference, f"{name} export")
        folder = run["out_root"] / f"{tp}-{pp}-{vpp}" / name
        saved = transformers.AutoModelForCausalLM.from_pretrained(folder)
        _assert_same_state_dict({k: v.numpy() for k, v in saved.state_dict().items()},
                                reference, f"{name} saved folder")
        assert saved.config.tie_word_embeddings == model.config.tie_word_embeddings
        if with_tokenizer:
            # The saved tokenizer files as they are: transformers 5's AutoTokenizer would load a
            # qwen2 folder as Qwen2Tokenizer whatever tokenizer_class says (our tiny WordLevel
            # tokenizer is not one).
            tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
            assert tokenizer("w1 w7")["input_ids"] == [1, 7]


def _assert_same_state_dict(got: dict, expected: dict, what: str) -> None:
    assert set(got) == set(expected), f"{what}: keys differ: {sorted(set(got) ^ set(expected))}"
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and np.array_equal(got[key], value), \
            f"{what}: {key} differs"


ALL_CASES = [_case_name(f, t) for f, t in CASES]
# Pipeline splits depend on the family only through tied/untied embeddings and the layer
# contents already covered at TP=2: a subset keeps the 4-process run short.
PP_CASES = ["llama_tied", "qwen3_untied", "llama_mqa_tied"]
TP2, PP2_VPP2, TP2_PP2 = (2, 1, None), (1, 2, 2), (2, 2, None)


@pytest.fixture(scope="module")
def two_process_run(hf_models, tmp_path_factory):
    return _run_layouts(hf_models, tmp_path_factory.mktemp("two"), 2, [TP2, PP2_VPP2],
                        ALL_CASES)


@pytest.mark.next_stack
def test_single_process_matches_transformers(hf_models, tmp_path):
    run = _run_layouts(hf_models, tmp_path, 1, [(1, 1, None)], ALL_CASES, with_tokenizer=True)
    _check_layout(hf_models, run, (1, 1, None), with_tokenizer=True)


def test_tensor_parallel(hf_models, two_process_run):
    _check_layout(hf_models, two_process_run, TP2)


def test_pipeline_parallel_with_virtual_stages(hf_models, two_process_run):
    _check_layout(hf_models, two_process_run, PP2_VPP2)


def test_tensor_and_pipeline_parallel(hf_models, tmp_path):
    run = _run_layouts(hf_models, tmp_path, 4, [TP2_PP2], PP_CASES)
    _check_layout(hf_models, run, TP2_PP2)


# --- bad input -----------------------------------------------------------------------------------

def test_unsupported_architecture_is_named():
    from q_tuning.sft.hf.model import transformer_config_from_hf

    config = transformers.MistralConfig(architectures=["MistralForCausalLM"])
    with pytest.raises(ValueError, match=r"MistralForCausalLM.*LlamaForCausalLM, "
                                         r"Qwen2ForCausalLM, Qwen3ForCausalLM"):
        transformer_config_from_hf(config)
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        transformer_config_from_hf(transformers.GPT2Config())


@pytest.mark.parametrize("sizes, dimension", [
    (dict(tp=3), "num_attention_heads"),                 # 4 heads
    (dict(tp=8), "intermediate_size"),                   # heads 8, kv 8 below; ffn 100
    (dict(tp=2), "num_key_value_heads"),                 # heads 6, kv 3 below
    (dict(pp=3), "num_hidden_layers"),                   # 4 layers
    (dict(pp=2, vpp=4), "num_hidden_layers"),
])
def test_non_dividing_parallel_size_names_the_dimension(sizes, dimension):
    from q_tuning.sft.hf.model import transformer_config_from_hf

    options = {"intermediate_size": dict(num_attention_heads=8, num_key_value_heads=8,
                                         hidden_size=64, intermediate_size=100),
               "num_key_value_heads": dict(num_attention_heads=6, num_key_value_heads=3,
                                           hidden_size=48)}.get(dimension, {})
    config = transformers.LlamaConfig(**{**COMMON, **options})
    with pytest.raises(ValueError, match=dimension):
        transformer_config_from_hf(config, **sizes)


@pytest.mark.next_stack
def test_unsupported_options_are_refused():
    from q_tuning.sft.hf.model import transformer_config_from_hf

    for options, text in ((dict(attention_bias=True), "attention_bias"),
                          (dict(hidden_act="gelu"), "hidden_act"),
                          (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
                           "rope_scaling")):
        with pytest.raises(ValueError, match=text):
            transformer_config_from_hf(transformers.LlamaConfig(**COMMON, **options))


@pytest.mark.next_stack
def test_rope_settings_are_read_from_either_transformers_layout():
    """transformers 5 moved rope_theta (and rope_scaling) into config.rope_parameters; reading
    only `config.rope_theta` silently fell back to 10000 there (logits off by ~1.5)."""
    from q_tuning.sft.hf.config import rope_parameters
    from q_tuning.sft.hf.model import transformer_config_from_hf

    assert rope_parameters(transformers.LlamaConfig(**COMMON, rope_theta=500000.0))[
        "rope_theta"] == 500000.0
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = transformers.LlamaConfig(**dict(COMMON, max_position_embeddings=16384),
                                      rope_theta=500000.0, rope_scaling=llama3)
    params = rope_parameters(config)
    assert params["rope_theta"] == 500000.0 and params["rope_type"] == "llama3"
    transformer_config_from_hf(config)  # accepted: Llama-3.1 scaling with megatron's constants


@pytest.mark.next_stack
def test_config_fields():
    from q_tuning.sft.hf.model import padded_vocab_size, transformer_config_from_hf

    config = transformer_config_from_hf(_hf_config("qwen3", tied=True), tp=2, pp=2)
    assert (config.kv_channels, config.num_query_groups, config.qk_layernorm,
            config.add_qkv_bias, config.add_bias_linear, config.gated_linear_unit,
            config.normalization, config.layernorm_epsilon, config.hidden_dropout) == \
        (32, 2, True, False, False, True, "RMSNorm", 1e-6, 0.0)
    assert transformer_config_from_hf(_hf_config("qwen2", tied=False)).add_qkv_bias
    assert padded_vocab_size(100, tp=2) == 256 and padded_vocab_size(49152, tp=1) == 49152
