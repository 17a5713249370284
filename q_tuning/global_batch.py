"""The global batch as the pruner sees it: per-sample sums gathered over DP, and the helpers that
build them from per-token scores (`QTuningPruner`'s stages 1-3).

Public API:
    NLL, ENTROPY, LOSS_TOKENS, LENGTH, ENTROPY_TOKENS (columns of `GlobalBatch.sums`)
    GlobalBatch
    sample_sums(scores, loss_masks, tokens) -> Tensor [n, 5]
    loss_targets_only(scores, loss_masks) -> TokenScores
    unscored_scores(loss_masks) -> TokenScores
    unscored_selection(keep, num_tokens, ratio) -> SampleSelection
    vocab_size_of(chunk) -> int | None
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from q_tuning.passes.scoring import TokenScores, target_masks
from q_tuning.selection import SampleSelection

__all__ = ["NLL", "ENTROPY", "LOSS_TOKENS", "LENGTH", "ENTROPY_TOKENS", "GlobalBatch",
           "sample_sums", "loss_targets_only", "unscored_scores", "unscored_selection",
           "vocab_size_of"]

# Columns of the per-sample sums gathered over DP (`sample_sums`).
NLL, ENTROPY, LOSS_TOKENS, LENGTH, ENTROPY_TOKENS = range(5)


@dataclasses.dataclass(frozen=True)
class GlobalBatch:
    """Per-sample sums of the whole global batch (`[N, 5]`, DP-rank-major) and where this DP
    rank's samples sit in it."""

    sums: torch.Tensor  # float64, columns NLL, ENTROPY, LOSS_TOKENS, LENGTH, ENTROPY_TOKENS
    counts: list[int]  # samples per DP rank
    dp_rank: int

    @property
    def offset(self) -> int:
        return sum(self.counts[:self.dp_rank])

    @property
    def loss_tokens(self) -> torch.Tensor:
        return self.sums[:, LOSS_TOKENS]


def unscored_scores(loss_masks: Sequence[torch.Tensor]) -> TokenScores:
    """TokenScores for a strategy that needs no scoring forward: the target mask only."""
    length = max((m.numel() for m in loss_masks), default=0)
    target = torch.zeros(len(loss_masks), length, dtype=torch.bool)
    for i, m in enumerate(loss_masks):
        target[i, 1:m.numel()] = m[1:].cpu() != 0
    zeros = torch.zeros(target.shape, dtype=torch.float32)
    return TokenScores(nll=zeros, entropy=zeros.clone(), target_mask=target, method="none")


def unscored_selection(keep: torch.Tensor, num_tokens: torch.Tensor, ratio: float
                        ) -> SampleSelection:
    """A SampleSelection without EU-plane labels (quadrant 0, NaN level and thresholds)."""
    placed = num_tokens.cpu() > 0
    nan = float("nan")
    return SampleSelection(
        keep=keep, quadrant=torch.zeros(keep.shape, dtype=torch.int64), placed=placed,
        entry_level=torch.full(keep.shape, nan, dtype=torch.float64), level=nan,
        thresholds=(nan, nan, nan, nan), target_count=int(keep.sum()),
        num_placed=int(placed.sum()), num_unplaceable=int((~placed).sum()),
        num_empty=int((~placed).sum()), keep_ratio=ratio)


def sample_sums(scores: TokenScores, loss_masks: Sequence[torch.Tensor],
                 tokens: Sequence[torch.Tensor]) -> torch.Tensor:
    """`[n, 5]` float64 per sample (columns NLL .. ENTROPY_TOKENS): NLL sum and count over the
    loss targets, entropy sum and count over the scored targets (`scores.target_mask`: the loss
    targets, or every target under --q-tuning-entropy-scope sequence), length."""
    loss = target_masks(loss_masks, scores.target_mask.shape[1])
    scored = scores.target_mask
    return torch.stack([(scores.nll.double() * loss).sum(1),
                        (scores.entropy.double() * scored).sum(1),
                        loss.sum(1).double(),
                        torch.tensor([t.numel() for t in tokens], dtype=torch.float64),
                        scored.sum(1).double()], dim=1)


def loss_targets_only(scores: TokenScores, loss_masks: Sequence[torch.Tensor]) -> TokenScores:
    """`scores` restricted to the loss targets (a no-op unless more positions were scored)."""
    loss = target_masks(loss_masks, scores.target_mask.shape[1])
    if torch.equal(loss, scores.target_mask):
        return scores
    return dataclasses.replace(scores, nll=scores.nll * loss, entropy=scores.entropy * loss,
                               target_mask=loss)


def vocab_size_of(chunk: torch.nn.Module) -> int | None:
    while hasattr(chunk, "module") and not hasattr(chunk, "vocab_size"):
        chunk = chunk.module
    return getattr(chunk, "vocab_size", None)
