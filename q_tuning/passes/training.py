"""The gradient step's forward-backward on a (pruned) batch, with megatron-core's per-token loss.

The loss function returns `(sum of token losses, number of loss tokens, report)`; with
`config.calculate_per_token_loss = True` the schedule keeps the sum and megatron-core's
`finalize_model_grads` divides the gradients by the token count all-reduced over DP x CP. The step
therefore optimises the mean over all kept tokens of the global batch, whatever the split into
micro-batches and ranks (SPEC section 5).

Micro-batch counts and row length are agreed over the DP group (max), padding with micro-batches
that carry no loss tokens, so every rank runs the same schedule.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Iterator, Sequence

import torch

from q_tuning.parallel import comm
from q_tuning.passes.microbatch import (RowLayout, build_micro_batches,
                                          check_thd_context_parallel, model_inputs, plan_rows,
                                          round_up, slice_for_context_parallel,
                                          takes_packed_seq_params)
from q_tuning.passes.scoring import ParallelGroups


def training_micro_batches(batch: dict[str, list], model_chunks: Sequence[torch.nn.Module], *,
                           micro_batch_size: int = 1, max_tokens_per_row: int | None = None,
                           groups: ParallelGroups | None = None,
                           padding_reference: Sequence[int] | None = None
                           ) -> tuple[list[dict], RowLayout]:
    """This rank's micro-batches (CP-sliced) and their layout; counts and row length are the same
    on every DP rank.

    `padding_reference`: token counts of the samples `batch` was pruned from (this rank's). Where
    rows are length-bucketed (no pipeline parallelism), the kept samples are then padded no more
    than those samples would be: a pruned step keeps fewer samples per length bucket, and
    `bucket_rows`' trade of padding against micro-batches alone would let its padding grow.
    """
    from megatron.core.utils import get_model_config

    groups = groups or ParallelGroups.from_parallel_state()
    config = get_model_config(model_chunks[0])
    multiple = 2 * groups.cp_size if groups.cp_size > 1 else 1
    if getattr(config, "sequence_parallel", False):
        multiple *= groups.tp_size
    thd = takes_packed_seq_params(model_chunks[0])
    check_thd_context_parallel(thd, groups.cp_size, max_tokens_per_row)
    lengths = [t.numel() for t in batch["tokens"]]
    uniform = groups.pp_size > 1  # p2p buffers fix the shape only with pipeline parallelism
    cap = None
    if padding_reference is not None and not uniform:
        cap = plan_rows(padding_reference, rows_per_micro_batch=micro_batch_size,
                        max_tokens_per_row=max_tokens_per_row, length_multiple=multiple,
                        uniform_length=False).padding(padding_reference)
    local = plan_rows(lengths, rows_per_micro_batch=micro_batch_size,
                      max_tokens_per_row=max_tokens_per_row, length_multiple=multiple,
                      uniform_length=uniform, max_padding=cap)
    seq_length = comm.max_over_group(local.seq_length, groups.dp) if uniform else local.seq_length
    count = comm.max_over_group(local.num_micro_batches, groups.dp)
    if len(model_chunks) > 1:
        count = round_up(count, getattr(config, "microbatch_group_size_per_vp_stage", None)
                         or groups.pp_size)
    # The same rows, padded to the group's row length (a multiple of `multiple`, like this rank's).
    layout = dataclasses.replace(local, seq_length=seq_length)
    micro_batches = [slice_for_context_parallel(mb, groups.cp)
                     for mb in build_micro_batches(batch["tokens"], batch["loss_masks"], layout,
                                                   num_micro_batches=count, thd=thd)]
    return micro_batches, layout


def per_token_loss_forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
    """megatron-core forward step: per-token cross entropy, summed over loss tokens."""
    mb = next(data_iterator)
    device = next(model.parameters()).device
    mb = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in mb.items()}
    args, kwargs = model_inputs(mb)
    losses = model(*args, labels=mb["labels"], **kwargs)
    return losses, partial(_sum_token_loss, mb["loss_mask"])


def _sum_token_loss(loss_mask: torch.Tensor, losses: torch.Tensor):
    # Mask values are per-token loss weights (1 normally; InfoBatch rescales kept easy samples);
    # the normaliser counts loss tokens, so a weight changes a token's share of the mean.
    total = (losses.float() * loss_mask).sum()
    num_tokens = loss_mask.count_nonzero().to(torch.int)
    return total, num_tokens, {"lm loss": torch.stack([total.detach(), num_tokens.float()])}


def forward_backward(model_chunks: Sequence[torch.nn.Module], batch: dict[str, list], *,
                     micro_batch_size: int = 1, max_tokens_per_row: int | None = None,
                     forward_only: bool = False, groups: ParallelGroups | None = None,
                     padding_reference: Sequence[int] | None = None) -> list:
    """Run megatron-core's schedule over `batch` with the per-token loss; returns its outputs.
    `padding_reference`: see `training_micro_batches`."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro_batches, layout = training_micro_batches(
        batch, model_chunks, micro_batch_size=micro_batch_size,
        max_tokens_per_row=max_tokens_per_row, groups=groups,
        padding_reference=padding_reference)
    return get_forward_backward_func()(
        forward_step_func=per_token_loss_forward_step,
        data_iterator=[iter(micro_batches) for _ in model_chunks], model=list(model_chunks),
        num_microbatches=len(micro_batches), seq_length=layout.seq_length,
        micro_batch_size=layout.rows_per_micro_batch, forward_only=forward_only)
