"""LoRA adapters on megatron-core's tensor-parallel linear layers, added in place (the base
weights keep their names, so HF conversion and megatron's own code see the same model).

Public API:
    LoRAAdapter                 A (`linear_in`) and B (`linear_out`) of one layer, TP-aware
    AdaptedLayer                one adapted layer: where it is, its kind, its adapter
    apply_lora(model_chunks, config, *, seed) -> int       freeze the base, add the adapters
    adapted_layers(model_chunks) -> list[AdaptedLayer]
    is_applied(model_chunks) -> bool
    merged_weights(model_chunks)                           context: W + (alpha/R) B A in place
    delta_weight(adapter) -> Tensor                        this rank's (alpha/R) B A, float32

Each adapted layer computes W x + (alpha/R) B A dropout(x) (peft's LoRA; Megatron-Bridge's
`linear_in` / `linear_out` names). A starts Kaiming-uniform (peft's init, bound 1/sqrt(in)) and
B at zero, so training starts from the base model. A is drawn from a generator seeded by the run
seed, the layer's global index and the module name, in the full (TP 1) shape, and then split:
the adapters are the same at every parallel split.

Composability: TP: a column-parallel layer (linear_qkv, linear_fc1) keeps A [R, in] replicated
and B [out/tp, R] split like its weight rows, so the fused QKV (per KV group) and [gate; up]
layouts are those of the weight; a row-parallel layer (linear_proj, linear_fc2) splits A
[R, in/tp] like its weight columns and keeps B [out, R] replicated. The rank-R intermediate goes
through `q_tuning.parallel.low_rank` (exact gradients). Sequence parallelism is refused at
parse time (the local spec's norm has none). PP / VPP:
each chunk adapts its own layers (keys by global layer index). DP: the adapters are ordinary
trainable parameters of megatron's DDP; the frozen base has no gradient buffer and no optimizer
state. CP is refused at parse time (local layers). Only megatron's local layers are adapted:
transformer-engine's fused layernorm-linear is refused here, and the trainer builds the local
spec when LoRA is on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import zlib
from typing import Iterator, Sequence

import torch

from q_tuning.parallel import comm
from q_tuning.parallel.low_rank import column_parallel_intermediate, row_parallel_intermediate
from q_tuning.sft.lora.config import ADAPTER_ATTR, TARGET_MODULES, LoRAConfig

__all__ = ["AdaptedLayer", "LoRAAdapter", "adapted_layers", "apply_lora", "delta_weight",
           "is_applied", "merged_weights"]


class LoRAAdapter(torch.nn.Module):
    """delta(x) = scale * B A dropout(x) of one column- or row-parallel layer (this rank's part)."""

    def __init__(self, base: torch.nn.Module, kind: str, config: LoRAConfig, full_a: torch.Tensor):
        super().__init__()
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        tp, tp_rank = comm.size_and_rank(base.tp_group)
        out_features, in_features = base.weight.shape  # this rank's shard
        opts = dict(bias=False, dtype=base.weight.dtype, device=base.weight.device)
        self.linear_in = torch.nn.Linear(in_features, config.rank, **opts)    # A
        self.linear_out = torch.nn.Linear(config.rank, out_features, **opts)  # B
        a = full_a if kind == "column" else full_a.chunk(tp, dim=1)[tp_rank]
        with torch.no_grad():
            self.linear_in.weight.copy_(a)
            self.linear_out.weight.zero_()
        self.kind, self.scale, self.dropout = kind, config.scale, config.dropout
        self.tp_group, self.tp = base.tp_group, tp
        if getattr(base, "sequence_parallel", False):
            raise ValueError("LoRA does not support --sequence-parallel")
        split, dim = (self.linear_out.weight, 0) if kind == "column" else (self.linear_in.weight, 1)
        set_tensor_model_parallel_attributes(split, True, dim, 1)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.dropout > 0):
            return x
        if self.kind == "row" and self.tp > 1:  # this rank's input columns: its own mask
            from megatron.core.tensor_parallel import get_cuda_rng_tracker

            with get_cuda_rng_tracker().fork():
                return torch.nn.functional.dropout(x, self.dropout, True)
        return torch.nn.functional.dropout(x, self.dropout, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_in(self._dropout(x))          # [s, b, R]; a partial sum when row
        mapping = column_parallel_intermediate if self.kind == "column" \
            else row_parallel_intermediate
        h = mapping(h, self.tp_group)
        return self.linear_out(h) * self.scale


def _add_adapter_output(module, args, kwargs, output):
    """Forward hook of an adapted layer: (out, bias) -> (out + adapter(x), bias)."""
    x = args[0] if args else kwargs["input_"]
    out, bias = output
    return out + getattr(module, ADAPTER_ATTR)(x), bias


@dataclasses.dataclass(frozen=True)
class AdaptedLayer:
    """One adapted linear layer of a chunk."""

    model: torch.nn.Module   # the bare GPTModel it belongs to
    name: str                # module name in its chunk, e.g. decoder.layers.0.mlp.linear_fc1
    global_name: str         # the same with the global layer index (checkpoint keys)
    layer: int               # global layer index
    kind: str                # 'column' or 'row'
    module: torch.nn.Module  # the megatron linear layer (its adapter: .adapter)

    @property
    def adapter(self) -> LoRAAdapter:
        return getattr(self.module, ADAPTER_ATTR)


def _bare(model_chunks) -> list[torch.nn.Module]:
    from q_tuning.sft.hf.config import unwrap_model

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    return [unwrap_model(c) for c in chunks]


def _linear_layers(model, targets: Sequence[str], *, check: bool = True
                   ) -> Iterator[AdaptedLayer]:
    """The target layers of one bare chunk (`check`: ValueError unless they are megatron's local
    linear classes)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    classes = {"column": ColumnParallelLinear, "row": RowParallelLinear}
    for name, module in model.named_modules():
        m = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)\.(\w+)", name)
        if m is None or m.group(3) not in targets:
            continue
        kind = TARGET_MODULES[m.group(3)]
        if check and type(module) is not classes[kind]:
            raise ValueError(f"LoRA: {name} is a {type(module).__name__}, not megatron-core's "
                             f"{classes[kind].__name__} (build the model with the local layer "
                             "spec: use_transformer_engine=False)")
        layer = model.decoder.layers[int(m.group(1))].layer_number - 1
        global_name = f"decoder.layers.{layer}.{m.group(2)}.{m.group(3)}"
        yield AdaptedLayer(model, name, global_name, layer, kind, module)


def _initial_a(layer: AdaptedLayer, config: LoRAConfig, in_features: int, seed: int
               ) -> torch.Tensor:
    """The full A [R, in] of a layer, the same on every rank and at every split."""
    generator = torch.Generator().manual_seed(
        (seed * 1_000_003 + zlib.crc32(layer.global_name.encode())) % 2 ** 63)
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(config.rank, in_features, generator=generator, dtype=torch.float64)
            * 2 - 1) * bound


def apply_lora(model_chunks, config: LoRAConfig, *, seed: int) -> int:
    """Freeze every parameter of the chunks and add an adapter to each target layer (before
    wrapping in Float16Module / DDP and building the optimizer). Returns the number of adapted
    layers on this rank; ValueError when already applied or for a layer it cannot adapt."""
    if is_applied(model_chunks):
        raise ValueError("LoRA is already applied to these model chunks")
    count = 0
    for model in _bare(model_chunks):
        layers = list(_linear_layers(model, config.target_modules))
        for param in model.parameters():
            param.requires_grad_(False)
        for layer in layers:
            tp, _ = comm.size_and_rank(layer.module.tp_group)
            in_features = layer.module.weight.shape[1] * (tp if layer.kind == "row" else 1)
            full_a = _initial_a(layer, config, in_features, seed)
            adapter = LoRAAdapter(layer.module, layer.kind, config, full_a)
            setattr(layer.module, ADAPTER_ATTR, adapter)
            layer.module.register_forward_hook(_add_adapter_output, with_kwargs=True)
            count += 1
    return count


def adapted_layers(model_chunks) -> list[AdaptedLayer]:
    """Every adapted layer of this rank's chunks, in chunk and module order."""
    return [layer for model in _bare(model_chunks)
            for layer in _linear_layers(model, tuple(TARGET_MODULES), check=False)
            if hasattr(layer.module, ADAPTER_ATTR)]


def is_applied(model_chunks) -> bool:
    return any(hasattr(m, ADAPTER_ATTR) for model in _bare(model_chunks)
               for m in model.modules())


def delta_weight(adapter: LoRAAdapter) -> torch.Tensor:
    """This rank's scale * B A in float32, the shape of its weight shard."""
    return adapter.scale * (adapter.linear_out.weight.detach().float()
                            @ adapter.linear_in.weight.detach().float())


@contextlib.contextmanager
def merged_weights(model_chunks):
    """Inside: each adapted weight holds W + (alpha/R) B A (this rank's shard: exact, as B is
    split like the weight's rows or A like its columns) and the adapters are bypassed; on exit
    the original weights are restored bit for bit. A no-op without adapters."""
    layers = adapted_layers(model_chunks)
    saved = [layer.module.weight.detach().clone() for layer in layers]
    scales = [layer.adapter.scale for layer in layers]
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.module.weight
                weight.copy_((weight.float() + delta_weight(layer.adapter)).to(weight.dtype))
                layer.adapter.scale = 0.0
        yield layers
    finally:
        with torch.no_grad():
            for layer, weight, scale in zip(layers, saved, scales):
                layer.module.weight.copy_(weight)
                layer.adapter.scale = scale
