"""The log-sum-exp statistics kernel shared by `token_stats` (from logits) and `fused_stats` (from
hidden states): per-chunk statistics, the merge of tensor-parallel vocabulary shards, and the
target check. One order and naming of the four statistic rows, `STAT_ROWS`.

Public API:
    STAT_ROWS = ("max", "sum_ed", "sum_exp", "target")
    chunk_stats(rows, local_targets, buffers, out)    `[4, n]` stats of one `[n, V_local]` chunk
    merge_shards(stats, owned, group)                 full-vocabulary stats from TP shards
    check_targets(targets, vocab_size)

Per token, against the max m of the (local) logits and e = exp(z - m): m; sum e*(z - m) (<= 0);
sum e; z[target] - m (0 where the target is in another TP shard). From them
`nll = log(sum e) - (z[target] - m)` and `entropy = log(sum e) - sum e*(z - m) / sum e`.
"""

from __future__ import annotations

import torch

from q_tuning.parallel import comm

__all__ = ["STAT_ROWS", "check_targets", "chunk_stats", "merge_shards"]

STAT_ROWS = ("max", "sum_ed", "sum_exp", "target")


def chunk_stats(rows: torch.Tensor, local_targets: torch.Tensor, buffers: torch.Tensor,
                 out: torch.Tensor) -> None:
    """Fill `out` `[4, n]` (see `STAT_ROWS`) for `rows` `[n, V_local]`; `buffers` is `[2, n, V_local]`.

    Five passes over the chunk, one exp per logit; the buffers stay in cache between them.
    """
    shifted, exps = buffers  # each [n, V_local]
    max_out, target_out = out[0], out[3]
    max_out.copy_(rows.amax(dim=-1))  # exact in any dtype
    if rows.dtype == shifted.dtype:
        torch.sub(rows, max_out[:, None], out=shifted)  # d = z - m
    else:  # upcast in the copy: sub() would first make a float32 copy of the chunk
        shifted.copy_(rows).sub_(max_out[:, None])
    v_local = rows.shape[-1]
    owned = (local_targets >= 0) & (local_targets < v_local)  # [n]
    index = local_targets.clamp(0, v_local - 1)[:, None]  # [n, 1]
    target_out.copy_(shifted.gather(1, index)[:, 0]).masked_fill_(~owned, 0.0)
    torch.exp(shifted, out=exps)  # e = exp(d)
    shifted.mul_(exps)  # e * d <= 0
    torch.sum(buffers, dim=-1, out=out[1:3])  # [2, n]: sum e*d and sum e in one reduction


def merge_shards(stats: torch.Tensor, owned: torch.Tensor, group) -> None:
    """Turn per-shard stats `[4, N]` into full-vocabulary stats, in place, identical on every rank.

    Shard r has S_r = sum exp(z - m_r) and T_r = sum exp(z - m_r)(z - m_r) against its own max
    m_r. With the global max M and c_r = exp(m_r - M) <= 1: S = sum_r c_r S_r and
    T = sum_r c_r (T_r + (m_r - M) S_r), sums of terms of one sign (no cancellation).
    """
    local_max, sum_ed, sum_exp, target_logit = stats
    global_max = local_max.clone()
    comm.all_reduce_max_(global_max, group)
    shift = local_max - global_max  # m_r - M <= 0, [N]
    scale = shift.exp()
    sum_ed.add_(shift * sum_exp).mul_(scale)
    sum_exp.mul_(scale)
    target_logit.add_(shift.masked_fill(~owned, 0.0))
    comm.all_reduce_sum_(stats[1:], group)  # [3, N] in one call
    local_max.copy_(global_max)


def check_targets(targets: torch.Tensor, vocab_size: int) -> None:
    """Raise ValueError for a target outside [0, vocab_size). One host sync."""
    bad = (targets < 0) | (targets >= vocab_size)
    if bool(bad.any()):
        value = int(targets[bad].flatten()[0])
        raise ValueError(f"target id {value} is outside the vocabulary [0, {vocab_size}) "
                         f"({int(bad.sum())} bad target(s)); pass a valid id such as 0 at "
                         f"positions whose statistics are not needed")
