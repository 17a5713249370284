"""Real megatron-core models at any TP/PP/virtual-PP/CP/DP split, on CPU with gloo (tests only).

Run inside the processes of `tests.harness.launch.run_distributed` (torch.distributed is already
initialised there). Typical worker::

    def _worker(rank, world_size):
        with parallel_world(tp=2, pp=2):                   # init_parallel ... destroy_parallel
            chunks = build_tiny_gpt(layers=4, seed=7)      # list of GPTModel, one per virtual stage
            logits = forward_logits(chunks, tokens, causal_attention_mask(2, 32))
        return None if logits is None else logits.numpy()  # [b, s, V] on the last stage only

Guarantees (what the equivalence tests may rely on):

- Weights. `build_tiny_gpt(..., seed=S)` gives, on every split, the shards of ONE full model that
  is a function of (model sizes, S) only: each full parameter is drawn from its own generator,
  seeded by S and the parameter's canonical name, and each rank copies its shard. So a
  single-process model and a TP=2 x PP=2 (x VPP x CP x DP) model with the same arguments compute
  the same function (up to float summation order). Canonical names are the TP=1/PP=1 names
  (`decoder.layers.<global layer index>...`); with tied embeddings the last stage's
  `output_layer.weight` is `embedding.word_embeddings.weight`. `full_state_dict(chunks)` gathers
  those full tensors from any split (collective: every rank calls it), `load_shard(chunks, sd)`
  loads them into any split, so a model trained at one split can be checked against another.
  Norm weights are 1 + noise and biases are small noise (not 1 and 0) so that no shard mistake
  hides behind a trivial value.
- Config. `tiny_gpt_config` reads TP/PP/CP/VPP from `parallel_state` (call `init_parallel`
  first), fp32 by default, dropout 0 by default, megatron's fused kernels off. Keep
  `perform_initialization=True` in any config of your own: megatron's TP attributes on weights
  are set only then, and without them the gradient norm (clipping) is wrong at TP > 1.
- Masks. Megatron's convention: a bool tensor `[b, 1, s_q, s_k]`, True = masked out (the key is
  NOT attended). `causal_attention_mask(b, s)`; `packed_causal_attention_mask(segment_ids)` is
  causal AND block-diagonal over segments (one packed row = several independent sequences; give
  padding its own id, its outputs are meaningless and must be loss-masked). With RoPE, a segment
  in a packed row gives the same logits as that sequence alone (RoPE is relative, so the
  continuing positions do not matter); with learned absolute positions pass `position_ids` that
  restart per segment.
- Context parallelism. The inputs of CP rank r are the zigzag chunks r and 2cp-1-r of the
  sequence (`cp_split`, as megatron's `get_batch_on_this_cp_rank`): tokens/labels/position ids
  split on dim 1, the attention mask on its query dim 2 only (keys stay global), or pass the mask
  as None for plain causal. `cp_merge` puts per-rank outputs back in sequence order. With CP > 1
  `build_tiny_gpt` uses `ContextParallelDotProductAttention` (megatron's local attention refuses
  CP): it all-gathers keys and values over the CP group with an autograd-aware gather, so it
  trains too, and masks in global positions. A CP=2 model gives the CP=1 logits.
- Logits. `GPTModel` returns `[b, s, V/tp]`; `gather_tp_logits` concatenates the vocab shards.
  `forward_logits` runs `get_forward_backward_func()(..., forward_only=True)` and returns the full
  vocabulary logits of the whole (local) batch on the last pipeline stage, None on other stages.
"""

from __future__ import annotations

import contextlib
import copy
import math
import zlib
from typing import Optional

import torch
import torch.distributed as dist

import mcore_cpu

__all__ = [
    "init_parallel", "destroy_parallel", "parallel_world", "tiny_gpt_config",
    "tiny_gpt_layer_spec", "build_tiny_gpt", "full_state_dict", "load_shard",
    "causal_attention_mask", "packed_causal_attention_mask", "cp_positions", "cp_split", "cp_merge", "gather_tp_logits",
    "forward_logits", "unwrap", "ContextParallelDotProductAttention",
]


# --- process groups ------------------------------------------------------------------------------

def init_parallel(tp: int = 1, pp: int = 1, cp: int = 1, vpp: Optional[int] = None,
                  seed: int = 1234) -> None:
    """mcore_cpu.install(), megatron's process groups (DP = world / (tp*pp*cp)) and RNG seeds."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    mcore_cpu.install()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vpp,
                                 context_parallel_size=cp)
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Undo `init_parallel` (torch.distributed itself stays up)."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()


@contextlib.contextmanager
def parallel_world(tp: int = 1, pp: int = 1, cp: int = 1, vpp: Optional[int] = None,
                   seed: int = 1234):
    """`init_parallel(...)` for the body of a `with` block, `destroy_parallel()` after it, also
    when it raises (so the next scenario of a worker starts from a clean parallel state)."""
    init_parallel(tp=tp, pp=pp, cp=cp, vpp=vpp, seed=seed)
    try:
        yield
    finally:
        destroy_parallel()


# --- model ---------------------------------------------------------------------------------------

def tiny_gpt_config(*, layers: int = 2, hidden: int = 64, heads: int = 4,
                    kv_heads: Optional[int] = None, ffn_hidden: Optional[int] = None,
                    dtype: torch.dtype = torch.float32, dropout: float = 0.0,
                    swiglu: bool = False, **overrides):
    """A CPU-safe `TransformerConfig` for the current parallel state (see module doc)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=kv_heads, ffn_hidden_size=ffn_hidden,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=ps.get_virtual_pipeline_model_parallel_world_size(),
        context_parallel_size=ps.get_context_parallel_world_size(),
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        hidden_dropout=dropout, attention_dropout=dropout,
        gated_linear_unit=swiglu, activation_func=torch.nn.functional.silu if swiglu else
        torch.nn.functional.gelu,
        # perform_initialization stays on although build_tiny_gpt overwrites every weight:
        # megatron sets the TP attributes (`tensor_model_parallel`, `partition_dim`) only while
        # initialising, and the grad norm (`param_is_not_tensor_parallel_duplicate`) needs them.
        use_cpu_initialization=True, perform_initialization=True,
        gradient_accumulation_fusion=False, masked_softmax_fusion=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, persist_layer_norm=False,
        apply_rope_fusion=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def tiny_gpt_layer_spec(cp_attention: bool = False, thd_attention: bool = False,
                        **local_spec_kwargs):
    """megatron's local (pure PyTorch) GPT layer spec; with `cp_attention`, its core attention
    is `ContextParallelDotProductAttention`; with `thd_attention`, `PackedSeqDotProductAttention`
    (packed rows in THD format, as transformer-engine's attention takes them)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(**local_spec_kwargs)
    if cp_attention or thd_attention:
        spec = copy.deepcopy(spec)
        spec.submodules.self_attention.submodules.core_attention = \
            PackedSeqDotProductAttention if thd_attention else ContextParallelDotProductAttention
    return spec


def build_tiny_gpt(vocab: int = 128, layers: int = 2, hidden: int = 64, heads: int = 4,
                   kv_heads: Optional[int] = None, seq_len: int = 32, tied: bool = True,
                   seed: int = 1234, position_embedding: str = "rope",
                   cp_attention: Optional[bool] = None, thd_attention: bool = False, config=None,
                   **config_kwargs) -> list:
    """The model chunks of this rank (one `GPTModel` per virtual stage, as Megatron builds them),
    holding the shards of the full model determined by the sizes and `seed` (see module doc).

    `cp_attention` defaults to CP > 1. `config` overrides the one from `tiny_gpt_config(layers=,
    hidden=, heads=, kv_heads=, **config_kwargs)`.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    if config is None:
        config = tiny_gpt_config(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                                 **config_kwargs)
    if cp_attention is None:
        cp_attention = config.context_parallel_size > 1
    spec = tiny_gpt_layer_spec(cp_attention=cp_attention, thd_attention=thd_attention)
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = None if vpp is None else vp_stage
        chunks.append(GPTModel(
            config=config, transformer_layer_spec=spec, vocab_size=vocab,
            max_sequence_length=seq_len,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=tied,
            position_embedding_type=position_embedding, vp_stage=stage))
    _fill_shards(chunks, lambda name, shape: _seeded_full_param(name, shape, seed))
    return chunks


def unwrap(chunk):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def _seeded_full_param(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    noise = torch.randn(shape, generator=gen)
    if len(shape) == 1:  # norm weights around 1, biases around 0
        return 1.0 + 0.1 * noise if name.endswith("weight") else 0.02 * noise
    return noise / math.sqrt(shape[-1])  # keeps activations O(1) through each layer


# --- canonical names and shards ------------------------------------------------------------------

def _tp_partition_dims(model) -> dict:
    """id(param) -> the dim megatron splits it on across TP, from the module types (the param
    attributes `tensor_model_parallel`/`partition_dim` are only set when megatron initialises)."""
    from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                               VocabParallelEmbedding)

    dims = {}
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dims.update({id(p): 0 for p in module.parameters(recurse=False)})
        elif isinstance(module, RowParallelLinear) and module.weight is not None:
            dims[id(module.weight)] = 1  # its bias is added after the all-reduce: replicated
    for param in model.parameters():  # e.g. LoRA adapters, which mark their split themselves
        if id(param) not in dims and getattr(param, "tensor_model_parallel", False):
            dims[id(param)] = param.partition_dim
    return dims


def _canonical_params(chunk):
    """(canonical name, local parameter, TP partition dim or None, is GLU fc1) for one chunk;
    see the module doc for canonical names."""
    model = unwrap(chunk)
    dims = _tp_partition_dims(model)
    global_layer = {str(i): str(layer.layer_number - 1)
                    for i, layer in enumerate(model.decoder.layers)}
    for name, param in model.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = global_layer[parts[2]]
        name = ".".join(parts)
        if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
            name = "embedding.word_embeddings.weight"
        glu = model.config.gated_linear_unit and ".mlp.linear_fc1." in name
        yield name, param, dims.get(id(param)), glu


def _tp_shard(full: torch.Tensor, dim: Optional[int], glu: bool) -> torch.Tensor:
    """This TP rank's piece of a full tensor, laid out as megatron lays it out."""
    from megatron.core import parallel_state as ps

    if dim is None:
        return full
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    if glu:  # full [gate; up] -> local [gate_r; up_r]
        return torch.cat([half.chunk(tp, dim)[rank] for half in full.chunk(2, dim)], dim)
    return full.chunk(tp, dim)[rank]


def _full_shape(param, dim: Optional[int]) -> torch.Size:
    from megatron.core import parallel_state as ps

    shape = list(param.shape)
    if dim is not None:
        shape[dim] *= ps.get_tensor_model_parallel_world_size()
    return torch.Size(shape)


def _fill_shards(chunks, full_param) -> None:
    for chunk in chunks:
        for name, param, dim, glu in _canonical_params(chunk):
            shape = _full_shape(param, dim)
            full = full_param(name, shape)
            if full.shape != shape:
                raise ValueError(f"{name}: full shape {tuple(shape)} expected, "
                                 f"got {tuple(full.shape)}")
            with torch.no_grad():
                param.copy_(_tp_shard(full, dim, glu))


def load_shard(chunks, full_sd: dict) -> None:
    """Copy this rank's shards of `full_sd` (canonical names -> full tensors) into `chunks`."""
    def lookup(name, shape):
        if name not in full_sd:
            raise KeyError(f"{name} missing from the full state dict")
        return full_sd[name]

    _fill_shards(chunks, lookup)


def _value(param, grads: bool) -> torch.Tensor:
    if not grads:
        return param.detach().float().clone()
    grad = getattr(param, "main_grad", None)
    grad = param.grad if grad is None else grad
    return torch.zeros(param.shape) if grad is None else grad.detach().float().clone()


def full_state_dict(chunks, grads: bool = False) -> dict:
    """Canonical name -> full (un-sharded) fp32 tensor, the same dict on every rank, from any
    split. Collective over the model-parallel (TP x PP) group: its ranks must all call it; each
    DP/CP replica gathers its own. With `grads`, the gradients (DDP's `main_grad` where present,
    else `.grad`; zeros where None) instead of the weights: this replica's, so sum them over
    DP x CP yourself where finalize_model_grads has not.
    """
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    local = {}
    for chunk in chunks:
        for name, param, dim, glu in _canonical_params(chunk):
            local[name] = (None if dim is None else tp_rank, dim, glu, _value(param, grads))
    group = ps.get_model_parallel_group()  # TP x PP: this rank's model replica
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, local, group=group)
    pieces: dict = {}  # name -> {tp rank or None: (dim, glu, tensor)}
    for rank_dict in gathered:
        for name, (rank, dim, glu, tensor) in rank_dict.items():
            pieces.setdefault(name, {})[rank] = (dim, glu, tensor)
    full = {}
    for name, by_rank in sorted(pieces.items()):
        if None in by_rank:
            full[name] = by_rank[None][2]
            continue
        shards = [by_rank[r] for r in sorted(by_rank)]
        dim, glu = shards[0][0], shards[0][1]
        if glu:  # local [gate_r; up_r] -> full [gate; up]
            halves = [t.chunk(2, dim) for _, _, t in shards]
            full[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim)
        else:
            full[name] = torch.cat([t for _, _, t in shards], dim)
    return full


# --- masks and context-parallel layout -----------------------------------------------------------

def causal_attention_mask(batch: int, seq: int) -> torch.Tensor:
    """[batch, 1, seq, seq] bool, True = masked out (key after query)."""
    future = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
    return future.expand(batch, 1, seq, seq).contiguous()


def packed_causal_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] segment ids -> [b, 1, s, s] bool, True = masked out: a query attends to earlier
    (and its own) positions of its own segment only."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [b, s_q, s_k]
    future = torch.triu(torch.ones_like(same[0]), diagonal=1)
    return (~same | future).unsqueeze(1)


def cp_positions(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global positions held by CP rank `cp_rank`: chunks r and 2cp-1-r of 2cp chunks."""
    if seq_len % (2 * cp_size):
        raise ValueError(f"sequence length {seq_len} must divide by 2*cp = {2 * cp_size}")
    chunk = seq_len // (2 * cp_size)
    first, second = cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


def _cp_size_rank(cp_size, cp_rank):
    from megatron.core import parallel_state as ps

    if cp_size is None:
        cp_size = ps.get_context_parallel_world_size()
    if cp_rank is None:
        cp_rank = ps.get_context_parallel_rank()
    return cp_size, cp_rank


def cp_split(x: Optional[torch.Tensor], dim: int = 1, cp_size: Optional[int] = None,
             cp_rank: Optional[int] = None) -> Optional[torch.Tensor]:
    """This CP rank's zigzag part of `x` along `dim` (1 for tokens, 2 for a mask's queries);
    defaults to the current CP group. Same layout as megatron's get_batch_on_this_cp_rank."""
    cp_size, cp_rank = _cp_size_rank(cp_size, cp_rank)
    if x is None or cp_size == 1:
        return x
    return x.index_select(dim, cp_positions(x.shape[dim], cp_size, cp_rank))


def cp_merge(parts: list, dim: int = 1) -> torch.Tensor:
    """Per-CP-rank tensors (in CP rank order) -> the sequence in global order along `dim`."""
    cp_size = len(parts)
    seq_len = sum(p.shape[dim] for p in parts)
    order = torch.cat([cp_positions(seq_len, cp_size, r) for r in range(cp_size)])
    return torch.cat(list(parts), dim).index_select(dim, torch.argsort(order))


# --- CP core attention ---------------------------------------------------------------------------

class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 over `group`; backward sums the gradients of all ranks and keeps
    this rank's slice (what the gathered copies on the other ranks contributed)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        rank, size = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.chunk(size, dim=0)[rank], None


class ContextParallelDotProductAttention(torch.nn.Module):
    """Test-only core attention that supports context parallelism on CPU (local spec slot).

    Same constructor and forward signatures as megatron's `DotProductAttention`; query `[s_q, b,
    np, hn]`, key/value `[s_k, b, ng, hn]` (this rank's zigzag tokens), output `[s_q, b, np*hn]`.
    Keys and values are all-gathered over the CP group; the mask is applied in global positions:
    `attention_mask` None (causal), `[b|1, 1, s_local, S]` (rows already CP-split, as
    get_batch_on_this_cp_rank leaves them) or `[b|1, 1, S, S]` (full), True = masked out. Masked
    scores are set to -10000 like megatron's `attention_mask_func`; softmax in fp32.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None):
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.utils import divide

        super().__init__()
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.config = config
        self.cp_group = pg_collection.cp
        tp = pg_collection.tp.size()
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        head_dim = divide(config.kv_channels * config.num_attention_heads,
                          config.num_attention_heads)
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(head_dim)
        self.dropout = torch.nn.Dropout(
            config.attention_dropout if attention_dropout is None else attention_dropout)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        from megatron.core import tensor_parallel

        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("ContextParallelDotProductAttention: express packing as a "
                             "block-diagonal attention_mask; attention_bias is unsupported")
        cp, rank = self.cp_group.size(), self.cp_group.rank()
        s_q = query.shape[0]
        seq = s_q * cp
        if cp > 1:
            key = _GatherSequence.apply(key, self.cp_group)      # [S, b, ng, hn], rank order
            value = _GatherSequence.apply(value, self.cp_group)
        q_pos = cp_positions(seq, cp, rank) if cp > 1 else torch.arange(seq)
        k_pos = (torch.cat([cp_positions(seq, cp, r) for r in range(cp)]) if cp > 1
                 else torch.arange(seq))
        masked = self._mask(attention_mask, q_pos, k_pos, s_q)    # [b|1, 1, s_q, S]

        key = key.repeat_interleave(self.heads // self.groups, dim=2)      # [S, b, np, hn]
        value = value.repeat_interleave(self.heads // self.groups, dim=2)
        scores = torch.einsum("qbhd,kbhd->bhqk", query, key) * self.softmax_scale
        scores = scores.float().masked_fill(masked, -10000.0)
        probs = torch.softmax(scores, dim=-1).to(query.dtype)             # [b, np, s_q, S]
        if self.config.sequence_parallel:
            probs = self.dropout(probs)
        else:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                probs = self.dropout(probs)
        context = torch.einsum("bhqk,kbhd->qbhd", probs, value)          # [s_q, b, np, hn]
        return context.reshape(s_q, context.shape[1], -1)                  # [s_q, b, np*hn]

    @staticmethod
    def _mask(attention_mask, q_pos, k_pos, s_q):
        if attention_mask is None:
            return (k_pos[None, :] > q_pos[:, None])[None, None]
        if attention_mask.shape[-2] != s_q:  # full [.., S, S]: keep this rank's query rows
            attention_mask = attention_mask.index_select(-2, q_pos)
        return attention_mask.index_select(-1, k_pos)


class PackedSeqDotProductAttention(ContextParallelDotProductAttention):
    """Test-only core attention taking packed rows in megatron's THD format (CP = 1), standing in
    for transformer-engine's on CPU: query `[t, np, hn]`, key/value `[t, ng, hn]` and
    `packed_seq_params.cu_seqlens_q`; causal attention within each segment; output
    `[t, np*hn]`. Without packed_seq_params it is the parent (the mask path)."""

    accepts_packed_seq_params = True  # what q_tuning.passes.microbatch looks for

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias)
        assert packed_seq_params.qkv_format == "thd" and attention_mask is None
        cu = packed_seq_params.cu_seqlens_q.long()
        t = query.shape[0]
        assert int(cu[-1]) == t, (cu, t)
        segment = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu[1:] - cu[:-1])
        masked = ~((segment[:, None] == segment[None, :])
                   & torch.ones(t, t, dtype=torch.bool).tril_())
        out = super().forward(query[:, None], key[:, None], value[:, None], masked[None, None])
        return out[:, 0]  # [t, np*hn]


# --- running -------------------------------------------------------------------------------------

def gather_tp_logits(logits: torch.Tensor) -> torch.Tensor:
    """[..., V/tp] vocab shards -> [..., V] (autograd-aware all-gather over the TP group)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits)


def forward_logits(chunks, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                   position_ids: Optional[torch.Tensor] = None,
                   num_microbatches: int = 1) -> Optional[torch.Tensor]:
    """Full-vocabulary logits `[b, s_local, V]` of this rank's batch through the pipeline
    schedule (forward only), on the last pipeline stage; None on the other stages.

    Inputs are this rank's (already CP-split) `tokens [b, s_local]`, mask and position ids; the
    batch is cut into `num_microbatches` equal micro-batches (>= PP with virtual stages).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s_local = tokens.shape
    if b % num_microbatches:
        raise ValueError(f"batch {b} must divide by num_microbatches {num_microbatches}")
    mbs = b // num_microbatches
    cp_size, cp_rank = _cp_size_rank(None, None)
    if position_ids is None:  # this rank's global positions (used by learned_absolute only)
        positions = cp_positions(s_local * cp_size, cp_size, cp_rank) if cp_size > 1 else \
            torch.arange(s_local)
        position_ids = positions.expand(b, s_local)

    def micro_batches():
        for i in range(num_microbatches):
            rows = slice(i * mbs, (i + 1) * mbs)
            mask = None if attention_mask is None else attention_mask[rows]
            yield tokens[rows], position_ids[rows], mask

    def forward_step(data_iterator, model):
        tok, pos, mask = next(data_iterator)
        return model(tok, pos, mask), None  # no loss function: the schedule keeps the output

    iterators = [micro_batches() for _ in chunks]
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=num_microbatches,
            seq_length=s_local * cp_size, micro_batch_size=mbs,
            forward_only=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return gather_tp_logits(torch.cat(outputs, dim=0))


# --- THD rows under context parallelism (slime's get_batch layout) -------------------------------

def thd_cp_positions(cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment id, position inside its segment) of each token CP rank `cp_rank` holds of a THD
    row, as transformer-engine lays it out: `cu_seqlens` are the GLOBAL segment bounds (each
    length a multiple of 2cp) and the rank holds, of every segment in turn, its chunks r and
    2cp-1-r (slime's `slice_with_cp` per sample, then concatenated)."""
    segments, positions = [], []
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    for i, length in enumerate(lengths):
        local = cp_positions(int(length), cp_size, cp_rank)  # raises unless 2cp divides it
        segments.append(torch.full((local.numel(),), i))
        positions.append(local)
    return torch.cat(segments), torch.cat(positions)


class ContextParallelPackedSeqDotProductAttention(PackedSeqDotProductAttention):
    """`PackedSeqDotProductAttention` that also runs THD rows under CP (transformer-engine's THD
    + CP on CPU): query `[t_local, np, hn]`, `packed_seq_params.cu_seqlens_q` global as above
    (`thd_cp_positions`). Keys and values are all-gathered over CP; a query attends to the keys
    of its own segment at or before its position in that segment. Install it with
    `use_thd_cp_attention`."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        cp, rank = self.cp_group.size(), self.cp_group.rank()
        if packed_seq_params is None or cp == 1:
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params)
        assert packed_seq_params.qkv_format == "thd" and attention_mask is None
        cu = packed_seq_params.cu_seqlens_q.long()
        t = query.shape[0]
        assert int(cu[-1]) == t * cp, (cu, t, cp)
        q_seg, q_pos = thd_cp_positions(cu, cp, rank)
        k_seg, k_pos = (torch.cat(x) for x in zip(*(thd_cp_positions(cu, cp, r)
                                                     for r in range(cp))))  # gathered order
        masked = ~((q_seg[:, None] == k_seg[None, :]) & (k_pos[None, :] <= q_pos[:, None]))
        # The parent indexes mask columns by the zigzag position of the gathered key in one
        # row of t*cp tokens: put column j (gathered order) where that lookup finds it.
        gathered_at = torch.cat([cp_positions(t * cp, cp, r) for r in range(cp)])
        masked = masked.index_select(1, torch.argsort(gathered_at))  # [t, t*cp]
        out = ContextParallelDotProductAttention.forward(
            self, query[:, None], key[:, None], value[:, None], masked[None, None])
        return out[:, 0]  # [t, np*hn]


def use_thd_cp_attention(chunks) -> list:
    """Switch the core attention of `build_tiny_gpt(..., thd_attention=True)` chunks to
    `ContextParallelPackedSeqDotProductAttention` (it holds no parameters or extra state)."""
    for chunk in chunks:
        for module in unwrap(chunk).modules():
            if type(module) is PackedSeqDotProductAttention:
                module.__class__ = ContextParallelPackedSeqDotProductAttention
    return chunks
