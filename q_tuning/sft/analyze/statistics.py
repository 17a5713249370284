"""What `q-tuning-analyze` computes: every sample's statistics (scored in data-parallel passes),
Q-Tuning's selection over batches of them, and the per-token statistics of the HTML report's
examples.

Public API:
    score_dataset(chunks, samples, *, batch_size, micro_batch_size, method, dp_rank, dp_size,
                  dp_group, entropy_scope="response") -> {"ppl", "entropy", "targets"}
    select_in_batches(ppl, entropy, config, batch_size) -> (decision, batch summaries)
    example_tokens(chunks, samples, picks, config, micro_batch_size) -> {index: token stats}
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from q_tuning.config import QTuningConfig
from q_tuning.observe.progress import Progress
from q_tuning.parallel import comm
from q_tuning.report import Thresholds
from q_tuning.selection import sample_ppl_entropy_from_tokens, select_samples

__all__ = ["example_tokens", "score_dataset", "select_in_batches"]


def score_dataset(chunks, samples, *, batch_size: int, micro_batch_size: Optional[int],
                  method: str, dp_rank: int, dp_size: int, dp_group,
                  entropy_scope: str = "response") -> dict[str, torch.Tensor]:
    """Per-sample `ppl`, `entropy` (float64, NaN when unplaceable) and `targets` (int64) of every
    sample, on every rank. Pass b scores samples [b*B*dp, (b+1)*B*dp); replica r takes its r-th
    block of B; the results are all-gathered over DP at the end. Progress: samples scored, on
    stderr from global rank 0 (`q_tuning.observe.progress`)."""
    n = len(samples)
    stride = batch_size * dp_size
    mine: list[tuple[int, float, float, int]] = []
    with Progress("scoring", total=n, unit="samples") as progress:
        for start in range(0, n, stride):
            _score_pass(chunks, samples, mine, lo=min(n, start + dp_rank * batch_size),
                        batch_size=batch_size, micro_batch_size=micro_batch_size, method=method,
                        entropy_scope=entropy_scope)
            progress.update(min(n, start + stride) - min(n, start))
    parts = comm.all_gather_objects(mine, dp_group) if dp_size > 1 else [mine]
    rows = sorted(r for p in parts for r in p)
    assert [r[0] for r in rows] == list(range(n)), "every sample is scored exactly once"
    return {"ppl": torch.tensor([r[1] for r in rows], dtype=torch.float64),
            "entropy": torch.tensor([r[2] for r in rows], dtype=torch.float64),
            "targets": torch.tensor([r[3] for r in rows], dtype=torch.int64)}


def _score_pass(chunks, samples, mine: list, *, lo: int, batch_size: int,
                micro_batch_size: Optional[int], method: str, entropy_scope: str) -> None:
    """Score this replica's block `samples[lo:lo + batch_size]` of one pass into `mine`."""
    from q_tuning.passes.scoring import score_samples, target_masks

    part = samples[lo:min(len(samples), lo + batch_size)]
    if not part:
        return
    masks = [s.loss_mask for s in part]
    scores = score_samples(chunks, [s.tokens for s in part],
                           masks if entropy_scope == "response"
                           else [torch.ones_like(m) for m in masks],
                           rows_per_micro_batch=micro_batch_size, method=method)
    loss = target_masks(masks, scores.target_mask.shape[1])
    ppl, ent = sample_ppl_entropy_from_tokens(scores.nll, scores.entropy, loss,
                                              entropy_mask=scores.target_mask)
    targets = loss.sum(dim=1)
    mine += [(lo + i, float(ppl[i]), float(ent[i]), int(targets[i])) for i in range(len(part))]


def select_in_batches(ppl: torch.Tensor, entropy: torch.Tensor, config: QTuningConfig,
                      batch_size: Optional[int]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """`select_samples` on consecutive batches of `batch_size` samples (None: one batch).

    Returns per-sample `keep`, `quadrant`, `entry_level`, `batch`, and one summary per batch.
    A batch in which no sample can be placed keeps nothing (its summary says so).
    """
    n = ppl.numel()
    batch_size = batch_size or n
    out = {"keep": torch.zeros(n, dtype=torch.bool), "quadrant": torch.zeros(n, dtype=torch.int64),
           "entry_level": torch.full((n,), float("nan"), dtype=torch.float64),
           "batch": torch.arange(n) // batch_size}
    batches = []
    for b, start in enumerate(range(0, n, batch_size)):
        part = slice(start, min(n, start + batch_size))
        info = {"batch": b, "first_index": start, "size": part.stop - start}
        try:
            sel = select_samples(ppl[part], entropy[part], config.sample_keep_ratio,
                                 config.bisect_max_iter, step=b + 1, rule=config.selection)
        except ValueError as err:  # nothing placeable in this batch
            batches.append({**info, "error": str(err), "kept_samples": 0})
            continue
        out["keep"][part], out["quadrant"][part] = sel.keep, sel.quadrant
        out["entry_level"][part] = sel.entry_level
        batches.append({**info, "level": sel.level,
                        "thresholds": dataclasses.asdict(
                            Thresholds.from_quantiles(sel.thresholds)),
                        "quadrant_counts": sel.quadrant_counts(), "kept_samples": sel.target_count,
                        "unplaceable_samples": sel.num_unplaceable})
    return out, batches




def example_tokens(chunks, samples, picks: dict[int, list[int]], config: QTuningConfig,
                   micro_batch_size: Optional[int]) -> dict[int, dict]:
    """Per picked sample: per-token nll, target mask and (Q2) the pruned positions.
    Collective (every rank scores the picked samples again: a few dozen)."""
    from q_tuning.passes.scoring import score_samples
    from q_tuning.token_pruning import token_keep_mask

    chosen = sorted(i for idx in picks.values() for i in idx)
    if not chosen:
        return {}
    scores = score_samples(chunks, [samples[i].tokens for i in chosen],
                           [samples[i].loss_mask for i in chosen],
                           rows_per_micro_batch=micro_batch_size, method=config.scoring_method)
    keep = token_keep_mask(scores.nll, scores.target_mask, config.token_keep_ratio,
                           config.neighbor_lambda)
    q2 = set(picks[2])
    out = {}
    for row, i in enumerate(chosen):
        length = samples[i].tokens.numel()
        target = scores.target_mask[row, :length]
        pruned = target & ~keep[row, :length] if i in q2 else torch.zeros_like(target)
        out[i] = {"nll": scores.nll[row, :length].tolist(), "target": target.tolist(),
                  "pruned": pruned.tolist()}
    return out
