"""The no-grad scoring forward through megatron-core's own pipeline schedules.

Composability, axis by axis:
- TP: logits arrive vocab-sharded `[b, s, V/tp]`; `token_nll_entropy` combines the shards with
  all-reduces of `[tokens]`-sized tensors, never gathering the vocabulary.
- PP (1F1B and interleaved): the schedule runs the stages; statistics exist on the last stage
  only and are broadcast to the other stages.
- CP: each rank holds the zigzag chunks r and 2cp-1-r (megatron-core's
  `get_batch_on_this_cp_rank`); it writes the statistics of the positions it holds into
  per-sample arrays and a sum over the CP group reassembles the unsplit result.
- DP: each DP replica scores its own samples; the selection gathers across DP (pruner.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
from functools import partial
from typing import Iterator, Sequence

import torch

from q_tuning.parallel import comm
from q_tuning.parallel.microbatch import (build_micro_batches, plan_rows, round_up,
                                          slice_for_context_parallel)
from q_tuning.token_stats import token_nll_entropy


@dataclasses.dataclass
class TokenScores:
    """Per-token statistics of this DP replica's samples, identical on all its ranks."""

    nll: torch.Tensor  # [n, L] float32, nll of token j given tokens < j; 0 where not a target
    entropy: torch.Tensor  # [n, L] float32
    target_mask: torch.Tensor  # [n, L] bool, loss-mask targets that were scored (j >= 1)


@dataclasses.dataclass(frozen=True)
class ParallelGroups:
    tp: object
    pp: object
    cp: object
    dp: object
    tp_size: int
    pp_size: int
    cp_size: int
    is_last_stage: bool

    @classmethod
    def from_parallel_state(cls) -> "ParallelGroups":
        from megatron.core import parallel_state as ps

        return cls(tp=ps.get_tensor_model_parallel_group(), pp=ps.get_pipeline_model_parallel_group(),
                   cp=ps.get_context_parallel_group(), dp=ps.get_data_parallel_group(),
                   tp_size=ps.get_tensor_model_parallel_world_size(),
                   pp_size=ps.get_pipeline_model_parallel_world_size(),
                   cp_size=ps.get_context_parallel_world_size(),
                   is_last_stage=ps.is_pipeline_last_stage(ignore_virtual=True))


def target_masks(loss_masks: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """`[n, length]` bool of scorable targets: the loss mask without position 0 (nothing predicts
    the first token)."""
    out = torch.zeros(len(loss_masks), length, dtype=torch.bool)
    for i, m in enumerate(loss_masks):
        out[i, 1:m.numel()] = m[1:].bool()
    return out


@contextlib.contextmanager
def eval_mode(chunks: Sequence[torch.nn.Module]):
    """Scoring uses the current weights without dropout; training mode is restored after."""
    was = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        yield
    finally:
        for c, mode in zip(chunks, was):
            c.train(mode)


def _scoring_forward_step(tp_group, data_iterator: Iterator[dict], model: torch.nn.Module):
    mb = next(data_iterator)
    device = next(model.parameters()).device
    mb = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in mb.items()}
    logits = model(mb["tokens"], mb["position_ids"], mb["attention_mask"])
    return logits, partial(_token_statistics, tp_group, mb)


def _token_statistics(tp_group, mb: dict, logits: torch.Tensor, non_loss_data: bool = True):
    # Only loss-mask positions are scored: prompt positions never enter the softmax.
    selected = mb["loss_mask"] > 0  # (b, s_local), identical on every TP rank
    nll, ent = token_nll_entropy(logits[selected], mb["labels"][selected], tp_group)
    return (nll.cpu(), ent.cpu(), mb["sample_index"][selected].cpu(),
            mb["target_index"][selected].cpu())


def score_samples(model_chunks: Sequence[torch.nn.Module], tokens: Sequence[torch.Tensor],
                  loss_masks: Sequence[torch.Tensor], *, rows_per_micro_batch: int | None = None,
                  max_tokens_per_row: int | None = None,
                  groups: ParallelGroups | None = None) -> TokenScores:
    """Score this DP replica's samples with one forward-only pass of megatron-core's schedule."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    groups = groups or ParallelGroups.from_parallel_state()
    config = get_model_config(model_chunks[0])
    multiple = 2 * groups.cp_size if groups.cp_size > 1 else 1
    if getattr(config, "sequence_parallel", False):
        multiple *= groups.tp_size
    layout = plan_rows([t.numel() for t in tokens], rows_per_micro_batch=rows_per_micro_batch,
                       max_tokens_per_row=max_tokens_per_row, length_multiple=multiple)
    count = layout.num_micro_batches
    if len(model_chunks) > 1 and count:
        # Interleaved schedule: whole groups of `microbatch_group_size_per_vp_stage` (default PP).
        count = round_up(count, getattr(config, "microbatch_group_size_per_vp_stage", None)
                         or groups.pp_size)
    micro_batches = [slice_for_context_parallel(mb, groups.cp)
                     for mb in build_micro_batches(tokens, loss_masks, layout,
                                                   num_micro_batches=count)]
    length = max((t.numel() for t in tokens), default=0)
    scores = torch.zeros(2, len(tokens), length, dtype=torch.float32)  # (nll|entropy, n, L)
    if count:
        forward_backward = get_forward_backward_func()
        with torch.no_grad(), eval_mode(model_chunks):
            collected = forward_backward(
                forward_step_func=partial(_scoring_forward_step, groups.tp),
                data_iterator=[iter(micro_batches) for _ in model_chunks],
                model=list(model_chunks), num_microbatches=count,
                seq_length=layout.seq_length, micro_batch_size=layout.rows_per_micro_batch,
                forward_only=True, collect_non_loss_data=True)
        if groups.is_last_stage:
            for nll, ent, sample, target in collected:
                scores[0, sample, target] = nll
                scores[1, sample, target] = ent
    comm.sum_over_context_parallel(scores, groups.cp)
    comm.broadcast_from_last_stage(scores, groups.pp)
    return TokenScores(nll=scores[0], entropy=scores[1], target_mask=target_masks(loss_masks, length))
