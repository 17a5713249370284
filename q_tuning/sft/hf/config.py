"""HF configuration -> megatron-core: the supported architectures, the `TransformerConfig` an HF
config maps to (checked for what megatron-core can express at the requested split), and building
the `GPTModel` chunks. Weight conversion is in `q_tuning.sft.hf.weights`.

Public API:
    SUPPORTED_ARCHITECTURES, HF_VOCAB_ATTR
    hf_architecture(hf_config) -> str
    padded_vocab_size(vocab_size, *, tp=1, make_vocab_size_divisible_by=128) -> int
    transformer_config_from_hf(hf_config, *, tp=1, pp=1, vpp=None, cp=1, sequence_parallel=False,
                               params_dtype=torch.float32, **overrides) -> TransformerConfig
    build_gpt_model(hf_config, *, config=None, ...) -> GPTModel
    build_gpt_model_chunks(hf_config, *, config=None, **build_kwargs) -> list[GPTModel]
    unwrap_model(chunk) -> GPTModel
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

__all__ = ["HF_VOCAB_ATTR", "SUPPORTED_ARCHITECTURES", "build_gpt_model",
           "build_gpt_model_chunks", "hf_architecture", "padded_vocab_size",
           "transformer_config_from_hf", "unwrap_model"]


@dataclasses.dataclass(frozen=True)
class _Family:
    model_type: str
    qkv_bias: bool  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool   # per-head RMSNorm on queries and keys (Qwen3)


SUPPORTED_ARCHITECTURES: dict[str, _Family] = {
    "LlamaForCausalLM": _Family("llama", qkv_bias=False, qk_norm=False),
    "Qwen2ForCausalLM": _Family("qwen2", qkv_bias=True, qk_norm=False),
    "Qwen3ForCausalLM": _Family("qwen3", qkv_bias=False, qk_norm=True),
}
_BY_MODEL_TYPE = {f.model_type: arch for arch, f in SUPPORTED_ARCHITECTURES.items()}
HF_VOCAB_ATTR = "q_tuning_hf_vocab_size"  # set on each GPTModel by build_gpt_model


# --- configuration -------------------------------------------------------------------------------

def hf_architecture(hf_config: "PretrainedConfig") -> str:
    """The supported architecture name of `hf_config` (e.g. 'LlamaForCausalLM'), else ValueError."""
    names = list(getattr(hf_config, "architectures", None) or [])
    if not names and getattr(hf_config, "model_type", None) in _BY_MODEL_TYPE:
        names = [_BY_MODEL_TYPE[hf_config.model_type]]
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    found = ", ".join(names) or f"model_type {getattr(hf_config, 'model_type', None)!r}"
    raise ValueError(f"unsupported HF architecture {found}: supported architectures are "
                     f"{', '.join(SUPPORTED_ARCHITECTURES)}")


def padded_vocab_size(vocab_size: int, *, tp: int = 1,
                      make_vocab_size_divisible_by: int = 128) -> int:
    """Megatron-LM's padding: the smallest multiple of `make_vocab_size_divisible_by * tp`."""
    if make_vocab_size_divisible_by < 1 or tp < 1:
        raise ValueError(f"make_vocab_size_divisible_by ({make_vocab_size_divisible_by}) and "
                         f"tp ({tp}) must be >= 1")
    multiple = make_vocab_size_divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def _head_dim(hf_config) -> int:
    head_dim = getattr(hf_config, "head_dim", None)
    return head_dim or hf_config.hidden_size // hf_config.num_attention_heads


def _num_kv_heads(hf_config) -> int:
    return getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads


def _check_supported_features(hf_config, arch: str) -> None:
    """Raise for options of a supported architecture that megatron's GPTModel cannot express."""
    problems = []
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf_config.hidden_act!r} (only 'silu', i.e. SwiGLU)")
    if arch != "Qwen2ForCausalLM" and getattr(hf_config, "attention_bias", False):
        problems.append("attention_bias=True (q/k/v/o biases)")
    if getattr(hf_config, "mlp_bias", False):
        problems.append("mlp_bias=True")
    if getattr(hf_config, "use_sliding_window", False):
        problems.append("use_sliding_window=True")
    try:
        _rope_scaling(hf_config)
    except ValueError as err:
        problems.append(str(err))
    if problems:
        raise ValueError(f"{arch}: unsupported configuration: {'; '.join(problems)}")


def rope_parameters(hf_config) -> dict:
    """`rope_theta` and the scaling settings in one dict: transformers 5 keeps them in
    `config.rope_parameters` (and has no `config.rope_theta`); 4.x as `rope_theta` and
    `rope_scaling` attributes."""
    params = getattr(hf_config, "rope_parameters", None)
    if params:
        return {"rope_theta": 10000.0, **params}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    return {**scaling, "rope_theta": getattr(hf_config, "rope_theta", 10000.0)}


def _rope_scaling(hf_config) -> tuple[bool, float]:
    """(rope_scaling, factor) for GPTModel: none, or Llama-3.1 scaling with megatron's constants."""
    params = rope_parameters(hf_config)
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return False, 8.0
    # megatron's RotaryEmbedding._apply_scaling fixes these three; only the factor is free.
    fixed = {"low_freq_factor": 1, "high_freq_factor": 4, "original_max_position_embeddings": 8192}
    if kind == "llama3" and all(scaling.get(k) == v for k, v in fixed.items()):
        return True, float(scaling["factor"])
    raise ValueError(f"rope_scaling={scaling} (supported: none, or 'llama3' with {fixed})")


def _check_divisibility(hf_config, tp: int, pp: int, vpp: Optional[int]) -> None:
    """ValueError naming the model dimension that a parallel size does not divide, and the flag."""
    heads, kv = hf_config.num_attention_heads, _num_kv_heads(hf_config)
    ffn, layers = hf_config.intermediate_size, hf_config.num_hidden_layers
    for name, value in (("tp", tp), ("pp", pp), ("vpp", 1 if vpp is None else vpp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    tp_flag = f"--tensor-model-parallel-size {tp}"
    if heads % tp:
        raise ValueError(f"num_attention_heads ({heads}) is not divisible by the tensor-parallel "
                         f"size ({tp_flag})")
    if kv % tp and tp % kv:
        raise ValueError(f"num_key_value_heads ({kv}) must be a multiple or a divisor of the "
                         f"tensor-parallel size ({tp_flag})")
    if ffn % tp:
        raise ValueError(f"intermediate_size (the FFN hidden size, {ffn}) is not divisible by "
                         f"the tensor-parallel size ({tp_flag})")
    if vpp is not None and pp == 1:
        raise ValueError(f"--virtual-pipeline-model-parallel-size {vpp} needs "
                         f"--pipeline-model-parallel-size > 1")
    if layers % (pp * (vpp or 1)):
        what = f"--pipeline-model-parallel-size {pp}" + \
            ("" if vpp is None else f" x --virtual-pipeline-model-parallel-size {vpp}")
        raise ValueError(f"num_hidden_layers ({layers}) is not divisible by the number of "
                         f"pipeline chunks ({what})")


def transformer_config_from_hf(hf_config: "PretrainedConfig", *, tp: int = 1, pp: int = 1,
                               vpp: Optional[int] = None, cp: int = 1,
                               sequence_parallel: bool = False,
                               params_dtype: torch.dtype = torch.float32,
                               **overrides: Any) -> "TransformerConfig":
    """The megatron `TransformerConfig` of an HF Llama / Qwen2 / Qwen3 config at a parallel split.

    Fused kernels stay off (megatron's defaults) so that the config also runs on CPU; pass
    `overrides` (any `TransformerConfig` field, e.g. `bias_activation_fusion=True`,
    `perform_initialization=False`, `calculate_per_token_loss=True`) to change that. Raises
    ValueError for an unsupported architecture or option, or a parallel size that does not divide
    the model (the dimension is named).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    arch = hf_architecture(hf_config)
    family = SUPPORTED_ARCHITECTURES[arch]
    _check_supported_features(hf_config, arch)
    _check_divisibility(hf_config, tp, pp, vpp)
    kwargs = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=_num_kv_heads(hf_config),
        kv_channels=_head_dim(hf_config),  # Qwen3: head_dim != hidden_size / heads
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,            # SwiGLU: silu(gate) * up
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=family.qkv_bias,
        qk_layernorm=family.qk_norm,
        hidden_dropout=0.0,                # megatron defaults to 0.1; these models have none
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
        init_method_std=getattr(hf_config, "initializer_range", 0.02),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


# --- model ---------------------------------------------------------------------------------------

def _transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install raising something else
        return False
    return torch.cuda.is_available()


def _layer_spec(config: "TransformerConfig", use_transformer_engine: bool):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_transformer_engine:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    return specs.get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm,
                                          normalization="RMSNorm")


def build_gpt_model(hf_config: "PretrainedConfig", *, config: Optional["TransformerConfig"] = None,
                    pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                    vp_stage: Optional[int] = None, make_vocab_size_divisible_by: int = 128,
                    use_transformer_engine: Optional[bool] = None) -> "GPTModel":
    """One megatron-core `GPTModel` (this rank's chunk `vp_stage`) for an HF config.

    `config` defaults to `transformer_config_from_hf` at the current `parallel_state` sizes;
    `pre_process` / `post_process` default to whether this chunk is the first / last pipeline
    stage. Layer spec: transformer-engine's when it imports and CUDA is present (or as
    `use_transformer_engine` says), megatron's local (pure PyTorch) spec otherwise. Weights are
    megatron's initialisation: load real ones with `load_hf_weights`.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    if config is None:
        config = transformer_config_from_hf(
            hf_config, tp=ps.get_tensor_model_parallel_world_size(),
            pp=ps.get_pipeline_model_parallel_world_size(),
            vpp=ps.get_virtual_pipeline_model_parallel_world_size(),
            cp=ps.get_context_parallel_world_size())
    else:
        _check_supported_features(hf_config, hf_architecture(hf_config))
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    if use_transformer_engine is None:
        use_transformer_engine = _transformer_engine_available()
    rope_scaling, rope_factor = _rope_scaling(hf_config)
    vocab = padded_vocab_size(hf_config.vocab_size, tp=config.tensor_model_parallel_size,
                              make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    model = GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(config, use_transformer_engine),
        vocab_size=vocab,
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=rope_parameters(hf_config)["rope_theta"],
        rope_scaling=rope_scaling,
        rope_scaling_factor=rope_factor,
        vp_stage=vp_stage,
    )
    setattr(model, HF_VOCAB_ATTR, hf_config.vocab_size)
    return model


def build_gpt_model_chunks(hf_config: "PretrainedConfig", *,
                           config: Optional["TransformerConfig"] = None,
                           **build_kwargs: Any) -> list["GPTModel"]:
    """This rank's model chunks, one `GPTModel` per virtual pipeline stage (one without VPP),
    as Megatron-LM's `get_model` builds them; `build_kwargs` go to `build_gpt_model`."""
    from megatron.core import parallel_state as ps

    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    if vpp is None:
        return [build_gpt_model(hf_config, config=config, **build_kwargs)]
    return [build_gpt_model(hf_config, config=config, vp_stage=stage, **build_kwargs)
            for stage in range(vpp)]


def unwrap_model(chunk) -> "GPTModel":
    """The GPTModel inside DDP / Float16Module wrappers (what converts and checkpoints)."""
    while not hasattr(chunk, "decoder") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk
