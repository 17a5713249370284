"""Test-only `--spec tests.integrations.slime_real.cpu_spec layer_spec` for slime's model provider: megatron's
local (pure PyTorch) GPT layer spec with a core attention that takes slime's packed THD
micro-batches (`PackedSeqParams`, `qkv_format="thd"`) on CPU.

megatron-core's local `DotProductAttention` refuses packed sequences ("Packed sequence is not
supported by DotProductAttention. Please use TEDotProductAttention instead.",
megatron/core/transformer/dot_product_attention.py), and transformer-engine needs CUDA; slime
packs every micro-batch as THD. `tests.harness.megatron.PackedSeqDotProductAttention` computes
causal attention within each `cu_seqlens` segment, which is what TE's THD attention computes.
"""

from tests.harness.megatron import tiny_gpt_layer_spec


def layer_spec(args, config, vp_stage=None):
    """slime calls a callable spec as `spec(args, config, vp_stage)` (model_provider.py)."""
    if args.context_parallel_size > 1:
        raise ValueError("tests.integrations.slime_real.cpu_spec: the CPU THD attention supports CP = 1 only")
    return tiny_gpt_layer_spec(thd_attention=True, qk_layernorm=args.qk_layernorm)
