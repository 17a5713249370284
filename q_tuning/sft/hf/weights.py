"""HF Llama / Qwen2 / Qwen3 weights <-> megatron-core `GPTModel` chunks at any TP / PP / VPP split:
which megatron parameter is which HF tensor, and the conversion both ways.

Public API:
    load_hf_weights(model_chunks, hf_state_dict_or_path) -> None
    export_hf_state_dict(model_chunks, *, vocab_size=None, all_ranks=False) -> dict[str, Tensor]
    hf_tensors_like(model, name, local, *, replicated) -> dict[str, Tensor]   (LoRA exports)

Name mapping (HF `model.layers.<i>.` -> megatron `decoder.layers.<j>.`, where layer j of a chunk
is global layer `layer_number - 1`, the offset megatron itself gave it for the PP/VPP stage):

    model.embed_tokens.weight          embedding.word_embeddings.weight   vocab rows split over TP
    input_layernorm.weight             input_layernorm.weight (local spec) or
                                       self_attention.linear_qkv.layer_norm_weight (TE spec)
    self_attn.{q,k,v}_proj.{weight,bias}
                                       self_attention.linear_qkv.{weight,bias}: per KV group g,
                                       [q heads of g; k_g; v_g], groups stacked; output dim split
    self_attn.{q,k}_norm.weight        self_attention.{q,k}_layernorm.weight (Qwen3, per head)
    self_attn.o_proj.weight            self_attention.linear_proj.weight  input dim split
    post_attention_layernorm.weight    pre_mlp_layernorm.weight (local) or
                                       mlp.linear_fc1.layer_norm_weight (TE)
    mlp.{gate,up}_proj.weight          mlp.linear_fc1.weight: rank r holds [gate_r; up_r]
    mlp.down_proj.weight               mlp.linear_fc2.weight              input dim split
    model.norm.weight                  decoder.final_layernorm.weight
    lm_head.weight                     output_layer.weight (untied; or, tied, the last stage's
                                       copy of the embedding when it is not also the first)

Vocabulary padding: like Megatron-LM, the megatron vocabulary is padded to a multiple of
`make_vocab_size_divisible_by * tp` (`padded_vocab_size`). The padded rows of the embedding and
the output layer are loaded as zeros and dropped on export, so the logits over the real vocabulary
equal HF's; the padded columns are exactly 0 (not -inf). A loss over the padded logits (megatron's
`vocab_parallel_cross_entropy`) therefore counts `padded - real` extra exp(0) terms in its
normaliser unless the caller masks those columns; pass `make_vocab_size_divisible_by=1` to pad
only to a multiple of `tp`.

Composability: TP: column-parallel weights (linear_qkv, linear_fc1, output_layer, embedding) are
split on their output/vocabulary dim, row-parallel ones (linear_proj, linear_fc2) on their input
dim, as megatron marks them (`param.partition_dim`); KV heads fewer than TP (megatron replicates
them) need no special case: the fused QKV tensor is split contiguously either way. PP / VPP: each
chunk loads the layers megatron numbered into it. DP / CP: replicas, nothing to do (every rank
loads the same shards). Loading reads only the tensors a rank needs (safetensors are memory-mapped).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Optional, Union

import torch

from q_tuning.observe.progress import Progress
from q_tuning.parallel import comm
from q_tuning.sft.hf.config import HF_VOCAB_ATTR, unwrap_model
from q_tuning.sft.hf.files import read_hf_checkpoint
from q_tuning.sft.lora.config import is_adapter_parameter

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel

__all__ = ["export_hf_state_dict", "hf_tensors_like", "load_hf_weights"]


# --- megatron <-> HF tensors ---------------------------------------------------------------------

# Megatron name inside `decoder.layers.<j>.` -> HF name inside `model.layers.<i>.`.
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",                       # local spec
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",  # TE spec
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",            # local spec
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",    # TE spec
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_QKV = {"self_attention.linear_qkv.weight": "weight", "self_attention.linear_qkv.bias": "bias"}
_FC1 = "mlp.linear_fc1.weight"
_EMBED = "embedding.word_embeddings.weight"
_FINAL_NORM = "decoder.final_layernorm.weight"
_OUTPUT = "output_layer.weight"
# HF's own order of a layer's tensors (module registration order), for tidy exports.
_HF_LAYER_ORDER = [f"self_attn.{p}_proj.{t}" for p in "qkvo" for t in ("weight", "bias")] + [
    "self_attn.q_norm.weight", "self_attn.k_norm.weight", "mlp.gate_proj.weight",
    "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
    "post_attention_layernorm.weight"]


@dataclasses.dataclass(frozen=True)
class _Param:
    """One megatron parameter of a chunk and where its full tensor comes from in HF."""

    name: str                # megatron name in its chunk
    param: torch.nn.Parameter
    kind: str                # 'copy', 'qkv', 'fc1', 'vocab'
    hf_names: tuple          # HF tensors that make up (kind 'qkv', 'fc1': are fused into) it
    layer: Optional[int]     # global layer index, None outside the decoder layers


def _bare_models(model_chunks) -> list["GPTModel"]:
    """The GPTModels of a list of (wrapped) chunks, or of one chunk."""
    chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
    return [unwrap_model(c) for c in chunks]


def _chunk_params(model: "GPTModel") -> Iterator[_Param]:
    """Every parameter of `model` with its HF source (LoRA adapters, which have none, are
    skipped: see `hf_tensors_like`); ValueError for one this module cannot map."""
    tied = model.share_embeddings_and_output_weights
    for name, param in model.named_parameters():
        if is_adapter_parameter(name):
            continue
        if name == _EMBED:
            yield _Param(name, param, "vocab", ("model.embed_tokens.weight",), None)
        elif name == _OUTPUT:  # a tied model's last stage holds a copy of the embedding
            hf = "model.embed_tokens.weight" if tied else "lm_head.weight"
            yield _Param(name, param, "vocab", (hf,), None)
        elif name == _FINAL_NORM:
            yield _Param(name, param, "copy", ("model.norm.weight",), None)
        elif (m := re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", name)):
            layer = model.decoder.layers[int(m.group(1))].layer_number - 1
            prefix, rest = f"model.layers.{layer}.", m.group(2)
            if rest in _LAYER_RENAMES:
                yield _Param(name, param, "copy", (prefix + _LAYER_RENAMES[rest],), layer)
            elif rest in _QKV:
                hf = tuple(f"{prefix}self_attn.{p}_proj.{_QKV[rest]}" for p in "qkv")
                yield _Param(name, param, "qkv", hf, layer)
            elif rest == _FC1:
                hf = (f"{prefix}mlp.gate_proj.weight", f"{prefix}mlp.up_proj.weight")
                yield _Param(name, param, "fc1", hf, layer)
            else:
                raise ValueError(f"megatron parameter {name} has no HF counterpart here")
        else:
            raise ValueError(f"megatron parameter {name} has no HF counterpart here")


def _qkv_to_mcore(q, k, v, config) -> torch.Tensor:
    """HF q [nh*d, ...], k/v [ng*d, ...] -> megatron's grouped [ng*(nh/ng+2)*d, ...]."""
    ng, d = config.num_query_groups, config.kv_channels
    rest = q.shape[1:]
    q = q.reshape(ng, -1, *rest)                     # [ng, nh/ng*d, ...]
    k, v = k.reshape(ng, d, *rest), v.reshape(ng, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _qkv_to_hf(qkv, config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ng, d = config.num_query_groups, config.kv_channels
    rest = qkv.shape[1:]
    grouped = qkv.reshape(ng, -1, *rest)             # [ng, (nh/ng+2)*d, ...]
    q_rows = grouped.shape[1] - 2 * d
    q, k, v = grouped.split([q_rows, d, d], dim=1)
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(),
            v.reshape(-1, *rest).contiguous())


def _full_shape(p: _Param, tp: int) -> torch.Size:
    shape = list(p.param.shape)
    if getattr(p.param, "tensor_model_parallel", False):
        shape[p.param.partition_dim] *= tp
    return torch.Size(shape)


def _shard(full: torch.Tensor, p: _Param, tp: int, rank: int) -> torch.Tensor:
    """This TP rank's piece of the full (TP=1 layout) megatron tensor of `p`."""
    if not getattr(p.param, "tensor_model_parallel", False) or tp == 1:
        return full
    dim = p.param.partition_dim
    if p.kind == "fc1":  # full [gate; up] -> local [gate_r; up_r]
        return torch.cat([half.chunk(tp, dim)[rank] for half in full.chunk(2, dim)], dim)
    return full.chunk(tp, dim)[rank]


def _unshard(shards: list, p: _Param) -> torch.Tensor:
    """Inverse of `_shard` over the TP ranks' pieces (in TP rank order)."""
    if len(shards) == 1:
        return shards[0]
    dim = p.param.partition_dim
    if p.kind == "fc1":  # local [gate_r; up_r] -> full [gate; up]
        halves = [s.chunk(2, dim) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim)
    return torch.cat(shards, dim)


def _full_from_hf(p: _Param, hf: Mapping[str, torch.Tensor], config, full_shape) -> torch.Tensor:
    tensors = [hf[n] for n in p.hf_names]
    if p.kind == "qkv":
        return _qkv_to_mcore(*tensors, config)
    if p.kind == "fc1":
        return torch.cat(tensors, dim=0)
    if p.kind == "vocab":  # pad rows (vocabulary) with zeros up to megatron's padded size
        (table,) = tensors
        if table.shape[0] > full_shape[0]:
            raise ValueError(f"{p.hf_names[0]}: vocabulary {table.shape[0]} exceeds the model's "
                             f"padded vocabulary {full_shape[0]}")
        padded = table.new_zeros(full_shape)
        padded[: table.shape[0]] = table
        return padded
    return tensors[0]


def _to_hf(p: _Param, full: torch.Tensor, config, vocab_size: int) -> dict[str, torch.Tensor]:
    if p.kind == "qkv":
        return dict(zip(p.hf_names, _qkv_to_hf(full, config)))
    if p.kind == "fc1":
        gate, up = full.chunk(2, dim=0)
        return {p.hf_names[0]: gate.contiguous(), p.hf_names[1]: up.contiguous()}
    if p.kind == "vocab":
        return {p.hf_names[0]: full[:vocab_size].contiguous()}
    return {p.hf_names[0]: full}


# --- loading -------------------------------------------------------------------------------------

def _hf_layer(name: str) -> Optional[int]:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def load_hf_weights(model_chunks, hf_state_dict_or_path: Union[Mapping[str, torch.Tensor], str,
                                                                os.PathLike]) -> None:
    """Copy this rank's shards of an HF checkpoint into its model chunks (in place).

    `hf_state_dict_or_path`: HF names -> full tensors (e.g. `hf_model.state_dict()`), or a path
    for `read_hf_checkpoint` (safetensors folder, or GGUF). Every megatron parameter is written
    (padded vocabulary rows with zeros), and every HF tensor of the layers this rank holds must be
    used (else ValueError: an option this module does not convert). Call it before wrapping the
    chunks in DDP and building the optimizer (whose fp32 main parameters copy the weights).
    Not collective.
    """
    hf = hf_state_dict_or_path
    if not isinstance(hf, Mapping):
        hf = read_hf_checkpoint(hf)[1]
    chunks = _bare_models(model_chunks)
    params = [(model, p) for model in chunks for p in _chunk_params(model)]
    used, layers = set(), set()
    with Progress("loading HF weights", total=len(params), unit="tensors") as progress:
        for model, p in params:
            tp, rank = comm.size_and_rank(model.tp_group)
            missing = [n for n in p.hf_names if n not in hf]
            if missing:
                raise ValueError(f"HF checkpoint lacks {missing} (needed for megatron {p.name})")
            full_shape = _full_shape(p, tp)
            try:
                full = _full_from_hf(p, hf, model.config, full_shape)
            except RuntimeError as err:  # a reshape that does not fit the config
                raise ValueError(f"HF {list(p.hf_names)} do not fit megatron {p.name} "
                                 f"{tuple(full_shape)}: {err}") from err
            if full.shape != full_shape:
                raise ValueError(f"HF {list(p.hf_names)} give shape {tuple(full.shape)}, megatron "
                                 f"{p.name} needs {tuple(full_shape)}")
            with torch.no_grad():
                p.param.copy_(_shard(full, p, tp, rank))
            used.update(p.hf_names)
            layers.add(p.layer)
            progress.update()
    unused = sorted(n for n in hf if _hf_layer(n) in layers - {None} and n not in used
                    and not n.endswith("rotary_emb.inv_freq"))
    if unused:
        raise ValueError(f"HF tensors not converted (unsupported option?): {unused[:8]}"
                         + (f" and {len(unused) - 8} more" if len(unused) > 8 else ""))


# --- exporting -----------------------------------------------------------------------------------

def _hf_sort_key(name: str) -> tuple:
    layer = _hf_layer(name)
    if layer is not None:
        suffix = name.split(".", 3)[3]
        order = _HF_LAYER_ORDER.index(suffix) if suffix in _HF_LAYER_ORDER else len(_HF_LAYER_ORDER)
        return (1, layer, order, name)
    head = {"model.embed_tokens.weight": 0, "model.norm.weight": 2, "lm_head.weight": 3}
    return (head.get(name, 4), 0, 0, name)


def export_hf_state_dict(model_chunks, *, vocab_size: Optional[int] = None,
                         all_ranks: bool = False) -> dict[str, torch.Tensor]:
    """The full HF state dict (CPU tensors in the parameters' dtype, HF names and order) of a
    split model: the inverse of `load_hf_weights`.

    Collective over the tensor- and pipeline-parallel groups (every rank calls it). Returns the
    dict on the ranks of the first pipeline stage (every TP rank there, every DP replica), `{}`
    elsewhere, or on every rank with `all_ranks`. With tied embeddings `lm_head.weight` is the
    same tensor as `model.embed_tokens.weight`, as in `hf_model.state_dict()`. `vocab_size` (HF's,
    without megatron's padding) defaults to the one `build_gpt_model` recorded on the chunks.
    """
    chunks = _bare_models(model_chunks)
    if vocab_size is None:
        vocab_size = getattr(chunks[0], HF_VOCAB_ATTR, None)
        if vocab_size is None:
            raise ValueError("export_hf_state_dict: pass vocab_size= (the chunks were not built "
                             "by build_gpt_model, which records it)")
    tied = chunks[0].share_embeddings_and_output_weights
    local: dict[str, torch.Tensor] = {}
    params = [(model, p) for model in chunks for p in _chunk_params(model)
              if not (p.name == _OUTPUT and tied)]  # stage 0 exports the tied original
    with Progress("gathering HF weights", total=len(params), unit="tensors") as progress:
        for model, p in params:
            tp, _ = comm.size_and_rank(model.tp_group)
            sharded = getattr(p.param, "tensor_model_parallel", False) and tp > 1
            shards = (comm.all_gather_tensors(p.param.detach(), model.tp_group) if sharded
                      else [p.param.detach()])
            full = _unshard([s.cpu() for s in shards], p)
            for name, tensor in _to_hf(p, full, model.config, vocab_size).items():
                local[name] = tensor.clone()
            progress.update()
    pp_group = chunks[0].pp_group
    if comm.size_and_rank(pp_group)[0] > 1:  # every stage's tensors, on the first (or all)
        parts = (comm.all_gather_objects(local, pp_group) if all_ranks
                 else comm.gather_objects_to_first(local, pp_group))
        if parts is None:
            return {}
        local = {k: v for part in parts for k, v in part.items()}
    if tied:
        local["lm_head.weight"] = local["model.embed_tokens.weight"]
    return {k: local[k] for k in sorted(local, key=_hf_sort_key)}


def hf_tensors_like(model, name: str, local: torch.Tensor, *,
                    replicated: bool) -> dict[str, torch.Tensor]:
    """The HF tensors (CPU) of a tensor laid out like megatron parameter `name` of the bare
    chunk `model`, as `export_hf_state_dict` would convert that parameter: a LoRA B beside a
    column-parallel weight (rows split over TP like the weight's, fused q/k/v per KV group or
    [gate; up]) or a LoRA A beside a row-parallel one (columns split). Collective over the TP
    group unless `replicated` (the tensor is the same on every TP rank, e.g. a column-parallel
    layer's A): then each of the parameter's HF names gets the whole tensor (q, k and v share
    it)."""
    (p,) = [p for p in _chunk_params(model) if p.name == name]
    if replicated:
        return {hf_name: local.detach().cpu().clone() for hf_name in p.hf_names}
    tp, _ = comm.size_and_rank(model.tp_group)
    shards = (comm.all_gather_tensors(local.detach(), model.tp_group) if tp > 1
              else [local.detach()])
    full = _unshard([s.cpu() for s in shards], p)
    return {k: v.clone() for k, v in _to_hf(p, full, model.config,
                                            getattr(model, HF_VOCAB_ATTR, 0)).items()}
