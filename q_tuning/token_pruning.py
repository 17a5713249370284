"""Stage 2 of Q-Tuning: prune the highest-scoring response tokens of the kept Q2 samples.

Public API:
    token_keep_mask(token_nll, loss_mask, keep_ratio, neighbor_lambda) -> bool [N, T]
    segment_token_keep_mask(token_nll, loss_mask, segment_ids, keep_ratio, neighbor_lambda)
    TOKEN_BUDGETS
    global_token_budget(sample_keep_ratio, token_keep_ratio, total_tokens, q4_tokens, n_q2,
                        q2_tokens) -> int
    token_scores(token_nll, loss_mask, neighbor_lambda) -> float64 [number of mask-1 positions]
    budget_keep(scores, sample, budget) -> bool, like `scores`
    budget_token_keep_mask(token_nll, loss_mask, budget, neighbor_lambda) -> bool [N, T]

`--q-tuning-token-budget per-sample` (SPEC section 4) keeps a share of every Q2 sample;
`global` (SPEC section 7, the official code) gives all Q2 samples of the global batch one budget,
filled by the lowest scores across samples after each sample's lowest-scoring token.

Pure tensor functions (SPEC section 4). One implementation serves padded rows (one sample per
row) and packed rows (several samples per row, told apart by segment ids). Callers under context
parallelism pass whole, unsplit rows, so neighbours never stop at a chunk boundary.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from q_tuning.config import TOKEN_BUDGETS
from q_tuning.selection import LOG_FLOAT64_MAX, float64_order_key, keep_count, run_bounds

__all__ = ["TOKEN_BUDGETS", "budget_keep", "budget_token_keep_mask", "global_token_budget",
           "segment_token_keep_mask", "token_keep_mask", "token_scores"]



def token_keep_mask(token_nll: Tensor, loss_mask: Tensor, keep_ratio: float,
                    neighbor_lambda: float) -> Tensor:
    """Bool [N, T]: true where a token stays in the loss; each row is one sample (call on Q2 rows).

    The special case of `segment_token_keep_mask` where every row is a single segment.
    """
    segment_ids = torch.zeros(loss_mask.shape, dtype=torch.int64, device=loss_mask.device)
    return segment_token_keep_mask(token_nll, loss_mask, segment_ids, keep_ratio, neighbor_lambda)


def segment_token_keep_mask(token_nll: Tensor, loss_mask: Tensor, segment_ids: Tensor,
                            keep_ratio: float, neighbor_lambda: float) -> Tensor:
    """Bool [N, T]: the loss mask of each sample after token pruning; a subset of `loss_mask`.

    A sample is one segment id within one row (negative ids are padding and are never kept).
    Over a sample's mask-1 positions R, with ppl_t = exp(nll_t) in float64:
        score_t = (1 - lambda) * ppl_t + lambda * (ppl_prev + ppl_next) / 2
    where prev/next are t-1/t+1 when those are mask-1 positions of the same sample, else ppl_t
    stands in. The `keep_count(keep_ratio, |R|)` lowest scores are kept; ties keep the earlier
    position; a NaN score counts as the highest. Samples with empty R stay all-false.
    """
    _check_token_args(token_nll, loss_mask, segment_ids, keep_ratio, neighbor_lambda)
    active = loss_mask.bool() & (segment_ids >= 0)  # [N, T]
    score = _neighbour_scores(token_nll, active, segment_ids, neighbor_lambda)  # [N, T]

    # Active positions in row-major order, i.e. sequence order within each row.
    rows = torch.arange(active.shape[0], device=active.device)[:, None].expand(active.shape)
    segment = segment_ids.masked_select(active).to(torch.int64)
    # One id per (row, segment), i.e. per sample. Host sync for the max; once per call.
    segments_per_row = int(segment.max()) + 1 if segment.numel() else 1
    sample = rows.masked_select(active) * segments_per_row + segment

    # Order by (sample, score, position): two stable sorts, minor key first. index_select, not
    # `[]`: advanced indexing is several times slower for these 1-D gathers on CPU.
    score_key = float64_order_key(score.masked_select(active))
    by_score = torch.sort(score_key, stable=True).indices
    order = by_score.index_select(0, torch.sort(sample.index_select(0, by_score),
                                                stable=True).indices)
    first, last = run_bounds(sample.index_select(0, order))
    rank_in_sample = torch.arange(order.numel(), device=order.device) - first
    kept_sorted = rank_in_sample < keep_count(keep_ratio, last - first + 1)
    kept = torch.empty_like(kept_sorted).scatter_(0, order, kept_sorted)  # back to row-major
    return torch.zeros_like(active).masked_scatter_(active, kept)


def global_token_budget(sample_keep_ratio: float, token_keep_ratio: float, total_tokens: int,
                        q4_tokens: int, n_q2: int, q2_tokens: int) -> int:
    """Q2 tokens kept in all under the global budget (SPEC section 7):
    `min(A, max(n2, B - n4))` with `B = floor(r * r_tok * T + 0.5)`."""
    budget = math.floor(sample_keep_ratio * token_keep_ratio * total_tokens + 0.5)
    return min(q2_tokens, max(n_q2, budget - q4_tokens))


def token_scores(token_nll: Tensor, loss_mask: Tensor, neighbor_lambda: float) -> Tensor:
    """float64 score of every mask-1 position, row-major (each row one sample, sequence order)."""
    active = loss_mask.bool()
    segment_ids = torch.zeros(active.shape, dtype=torch.int64, device=active.device)
    return _neighbour_scores(token_nll, active, segment_ids, neighbor_lambda).masked_select(active)


def budget_keep(scores: Tensor, sample: Tensor, budget: int) -> Tensor:
    """Bool like `scores`: each sample's lowest score (earlier position on ties), then the
    `budget - samples` lowest of the rest across samples (ties: earlier sample, then position).

    `scores` lists every sample's positions in (sample, position) order, `sample` their sample
    number (non-decreasing). At least one position per sample is kept, at most all of them.
    """
    n = scores.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=scores.device)
    # a stable sort of the score keys ranks by (score, sample, position): the input order
    order = torch.sort(float64_order_key(scores), stable=True).indices
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=order.device))
    samples = int(sample.max()) + 1  # host sync, once per step
    best = torch.full((samples,), n, dtype=torch.int64, device=scores.device)
    best = best.scatter_reduce(0, sample, rank, reduce="amin")
    first = rank == best.index_select(0, sample)
    rest_sorted = ~first.index_select(0, order)
    take_sorted = rest_sorted & (torch.cumsum(rest_sorted, 0) <= budget - int(first.sum()))
    return first | torch.empty_like(take_sorted).scatter_(0, order, take_sorted)


def budget_token_keep_mask(token_nll: Tensor, loss_mask: Tensor, budget: int,
                           neighbor_lambda: float) -> Tensor:
    """Bool [N, T]: `budget_keep` over the rows of one process (each row one Q2 sample, in
    global batch order); the reference the distributed pruner must equal."""
    active = loss_mask.bool()
    rows = torch.arange(active.shape[0], device=active.device)[:, None].expand(active.shape)
    kept = budget_keep(token_scores(token_nll, active, neighbor_lambda),
                       rows.masked_select(active), budget)
    return torch.zeros_like(active).masked_scatter_(active, kept)


def _neighbour_scores(token_nll: Tensor, active: Tensor, segment_ids: Tensor,
                      neighbor_lambda: float) -> Tensor:
    """score_t of every position (float64 [N, T]); meaningful only where `active`."""
    ppl = torch.exp(token_nll.to(torch.float64).clamp(max=LOG_FLOAT64_MAX))
    # linked[:, t] : positions t and t+1 are both mask-1 positions of the same sample.
    linked = active[:, 1:] & active[:, :-1] & (segment_ids[:, 1:] == segment_ids[:, :-1])
    prev_ppl = ppl.clone()
    prev_ppl[:, 1:] = torch.where(linked, ppl[:, :-1], ppl[:, 1:])
    next_ppl = ppl.clone()
    next_ppl[:, :-1] = torch.where(linked, ppl[:, 1:], ppl[:, :-1])
    # Halve before adding: two near-float64-max neighbours must not overflow to inf.
    return (1.0 - neighbor_lambda) * ppl + neighbor_lambda * (prev_ppl / 2 + next_ppl / 2)


def _check_token_args(token_nll: Tensor, loss_mask: Tensor, segment_ids: Tensor,
                      keep_ratio: float, neighbor_lambda: float) -> None:
    if loss_mask.dim() != 2 or token_nll.shape != loss_mask.shape \
            or segment_ids.shape != loss_mask.shape:
        raise ValueError("token_nll, loss_mask and segment_ids must share one [N, T] shape, got "
                         f"{tuple(token_nll.shape)}, {tuple(loss_mask.shape)}, "
                         f"{tuple(segment_ids.shape)}")
    if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
        raise ValueError(f"segment_ids must be an integer tensor, got {segment_ids.dtype}")
    if isinstance(keep_ratio, bool) or not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    if isinstance(neighbor_lambda, bool) or not 0.0 <= neighbor_lambda <= 1.0:
        raise ValueError(f"neighbor_lambda must be in [0, 1], got {neighbor_lambda!r}")
