"""Per-token negative log-likelihood and predictive entropy (SPEC section 1).

The meaning of `token_nll_entropy` is the short reference it must equal (kept in
tests/test_token_stats.py), evaluated in float64 over the whole vocabulary:

    lp = torch.log_softmax(logits.double(), dim=-1)
    nll = -lp.gather(-1, targets[..., None])[..., 0]
    ent = -(lp.exp() * lp).sum(-1)

What differs is cost. The reference materialises several `[tokens, vocab]` tensors; here tokens go
through in chunks with two reusable chunk-sized float32 buffers, one `exp` per logit and no full
softmax, and a vocabulary sharded over tensor parallelism is combined with two all-reduces of
`[tokens]`-sized tensors instead of a gather of the vocabulary.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

__all__ = ["token_nll_entropy", "token_stats_workspace_bytes"]

# Default chunk, in logit elements (tokens x local vocabulary). Measured on a 2-core CPU
# (docs/benchmarks.md, section token_nll_entropy): single-threaded, a cache-sized chunk (2^20, two
# 4 MiB fp32 buffers) is fastest. With several intra-op threads every op on a chunk is an OpenMP
# parallel region that waits for all its threads; on shared cores that wait dominates, and 2^24
# (two 64 MiB buffers) was 5x faster than 2^20. On GPUs the per-chunk cost is kernel launches, so
# chunks are larger still (2^26; not measured in this repository).
_CPU_CHUNK_ELEMENTS_SINGLE_THREAD = 1 << 20
_CPU_CHUNK_ELEMENTS_MULTI_THREAD = 1 << 24
_CHUNK_ELEMENTS_OTHER = 1 << 26
# Per-token rows of the `[4, N]` stats, against the max m of the (local) logits, e = exp(z - m):
# m; sum e*(z - m) (<= 0); sum e; z[target] - m (0 where the target is in another TP shard).
_STATS = ("max", "sum_ed", "sum_exp", "target")


def token_nll_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    *,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token `nll = -log softmax(z)[target]` and entropy `-sum_v p_v log p_v` of `softmax(z)`.

    Args:
        logits: `[..., V]`, or under tensor parallelism this rank's vocabulary shard `[..., V/tp]`
            (Megatron convention: TP rank `r` holds vocabulary ids `[r*V/tp, (r+1)*V/tp)`). Any
            floating dtype; the math is float32 (float64 for float64 logits). Never modified.
        targets: global vocabulary ids, shape `logits.shape[:-1]`, each in `[0, V)`; pass any valid
            id (e.g. 0) at positions whose statistics you do not need.
        tp_group: the tensor-parallel group the vocabulary is sharded over; None = not sharded.
        chunk_size: tokens per chunk (peak extra memory is two fp32 buffers of
            `chunk_size x V/tp`); None picks about 2^20 logits per chunk on a single-threaded CPU,
            2^24 on a multi-threaded one and 2^26 on other devices (see `_default_chunk_elements`).

    Returns:
        `(nll, entropy)`, float32, shape `targets.shape`, on the logits' device, without autograd
        history (statistics for scoring, not a loss). Non-finite logits give non-finite statistics
        for their tokens; nll is not clamped.

    Raises:
        ValueError: a target outside `[0, V)` (names the value and V), mismatched shapes,
            non-floating logits or a chunk_size below 1.

    Composability:
        Tensor parallel: every rank of `tp_group` calls this with its own vocabulary shard and the
        same targets, and gets the same full-vocabulary statistics. Two all-reduces of
        `[tokens]`-sized tensors per call (MAX of the per-token maximum, then one SUM of the
        stacked sum-exp, entropy sum and target logit), whatever the chunk size; no vocabulary
        gather. Sequence/context/data parallel: token-local, so apply it to each rank's own tokens.
        The target check is one host sync per call.
    """
    _check_inputs(logits, targets, chunk_size)
    if tp_group is None:
        tp_size, tp_rank = 1, 0
    else:
        tp_size, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    v_local = logits.shape[-1]
    vocab_start = tp_rank * v_local
    _check_targets(targets, v_local * tp_size)

    out_shape = targets.shape
    with torch.no_grad():
        num_tokens = targets.numel()
        if num_tokens == 0:  # same on every TP rank (same targets): no collective is skipped alone
            empty = torch.empty(out_shape, dtype=torch.float32, device=logits.device)
            return empty, empty.clone()
        targets = targets.reshape(num_tokens).long()  # [N]
        if chunk_size is None:
            chunk_size = max(1, _default_chunk_elements(logits.device) // v_local)
        compute_dtype = torch.promote_types(logits.dtype, torch.float32)
        stats = torch.empty(len(_STATS), num_tokens, dtype=compute_dtype, device=logits.device)
        buffers = torch.empty(2, min(chunk_size, num_tokens), v_local, dtype=compute_dtype,
                              device=logits.device)
        first = 0
        for block in _row_blocks(logits):  # [rows, V_local] views, tokens in order
            for lo in range(0, block.shape[0], chunk_size):
                rows = block[lo:lo + chunk_size]
                n = rows.shape[0]
                _chunk_stats(rows, targets[first:first + n] - vocab_start,
                             buffers[:, :n], stats[:, first:first + n])
                first += n
        if tp_size > 1:
            owned = (targets >= vocab_start) & (targets < vocab_start + v_local)
            _combine_shards(stats, owned, tp_group)
        _, sum_ed, sum_exp, target_logit = stats
        log_sum_exp = sum_exp.log()
        nll = log_sum_exp - target_logit
        # -sum p log p = log S - sum e*(z - m) / S; both terms are >= 0, so nothing cancels.
        entropy = log_sum_exp - sum_ed / sum_exp
        return nll.float().view(out_shape), entropy.float().view(out_shape)


def token_stats_workspace_bytes(num_tokens: int, vocab_local: int, device: torch.device, *,
                                dtype: torch.dtype = torch.float32,
                                chunk_size: int | None = None) -> int:
    """Bytes `token_nll_entropy` allocates for `num_tokens` tokens of `vocab_local` logits of
    `dtype` on `device`, outputs and per-chunk `[chunk]`-sized scraps aside: two chunk buffers and
    the `[4, N]` statistics, in the compute dtype. For planning micro-batch sizes."""
    if num_tokens == 0:
        return 0
    if chunk_size is None:
        chunk_size = max(1, _default_chunk_elements(torch.device(device)) // max(vocab_local, 1))
    itemsize = torch.empty((), dtype=torch.promote_types(dtype, torch.float32)).element_size()
    return itemsize * (2 * min(chunk_size, num_tokens) * vocab_local + len(_STATS) * num_tokens)


def _default_chunk_elements(device: torch.device) -> int:
    if device.type != "cpu":
        return _CHUNK_ELEMENTS_OTHER
    if torch.get_num_threads() == 1:
        return _CPU_CHUNK_ELEMENTS_SINGLE_THREAD
    return _CPU_CHUNK_ELEMENTS_MULTI_THREAD


def _chunk_stats(rows: torch.Tensor, local_targets: torch.Tensor, buffers: torch.Tensor,
                 out: torch.Tensor) -> None:
    """Fill `out` `[4, n]` (see `_STATS`) for `rows` `[n, V_local]`; `buffers` is `[2, n, V_local]`.

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


def _combine_shards(stats: torch.Tensor, owned: torch.Tensor, group: dist.ProcessGroup) -> None:
    """Turn per-shard stats `[4, N]` into full-vocabulary stats, in place, identical on every rank.

    Shard r has S_r = sum exp(z - m_r) and T_r = sum exp(z - m_r)(z - m_r) against its own max
    m_r. With the global max M and c_r = exp(m_r - M) <= 1: S = sum_r c_r S_r and
    T = sum_r c_r (T_r + (m_r - M) S_r), sums of terms of one sign (no cancellation).
    """
    local_max, sum_ed, sum_exp, target_logit = stats
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    shift = local_max - global_max  # m_r - M <= 0, [N]
    scale = shift.exp()
    sum_ed.add_(shift * sum_exp).mul_(scale)
    sum_exp.mul_(scale)
    target_logit.add_(shift.masked_fill(~owned, 0.0))
    dist.all_reduce(stats[1:], op=dist.ReduceOp.SUM, group=group)  # [3, N] in one call
    local_max.copy_(global_max)


def _row_blocks(logits: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield `[rows, V]` views of `logits` covering its tokens in order, without copying.

    One view when the leading dims can be flattened (the usual contiguous case); otherwise one
    block per index of the first dim, recursively (e.g. a transposed `[s, b, V]` view).
    """
    try:
        yield logits.view(-1, logits.shape[-1])  # [N, V]
    except RuntimeError:
        for sub in logits.unbind(0):
            yield from _row_blocks(sub)


def _check_inputs(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int | None) -> None:
    if logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating tensor of shape [..., V], got dtype "
                         f"{logits.dtype} and shape {tuple(logits.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must hold integer vocabulary ids, got dtype {targets.dtype}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")


def _check_targets(targets: torch.Tensor, vocab_size: int) -> None:
    """Raise ValueError for a target outside [0, vocab_size). One host sync."""
    bad = (targets < 0) | (targets >= vocab_size)
    if bool(bad.any()):
        value = int(targets[bad].flatten()[0])
        raise ValueError(f"target id {value} is outside the vocabulary [0, {vocab_size}) "
                         f"({int(bad.sum())} bad target(s)); pass a valid id such as 0 at "
                         f"positions whose statistics are not needed")
