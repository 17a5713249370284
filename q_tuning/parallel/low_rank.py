"""Tensor-parallel mappings of a LoRA adapter's rank-r intermediate (megatron-core's autograd-aware
regions, applied to the [tokens, r] tensor instead of the layer's output: r is small).

Public API:
    column_parallel_intermediate(h, group) -> Tensor
    row_parallel_intermediate(h, group) -> Tensor

Column-parallel layer (A replicated, B split along the output like the weight): every rank
computes h = A x; its B shard gives a partial gradient of h, which the mapping sums over TP in
the backward (identity forward, all-reduce backward), so A's gradient is exact and the same on
every rank.

Row-parallel layer (A split along the input like the weight, B replicated): h = A_r x_r is a
partial sum, all-reduced (backward: identity) before B, so B's input and gradient are the same on
every rank and A_r's gradient is exact.

Sequence parallelism is not handled (the trainer refuses it with LoRA: the local layer spec that
LoRA runs on has no sequence-parallel norm).
"""

from __future__ import annotations

import torch

__all__ = ["column_parallel_intermediate", "row_parallel_intermediate"]


def column_parallel_intermediate(h: torch.Tensor, group) -> torch.Tensor:
    """h [tokens, ..., r] -> the same, the input of a column-parallel layer's B shard."""
    from megatron.core.tensor_parallel import mappings

    return mappings.copy_to_tensor_model_parallel_region(h, group=group)


def row_parallel_intermediate(h: torch.Tensor, group) -> torch.Tensor:
    """Partial h [tokens, ..., r] of a row-parallel layer's A shard -> summed over TP."""
    from megatron.core.tensor_parallel import mappings

    return mappings.reduce_from_tensor_model_parallel_region(h, group=group)
