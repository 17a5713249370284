"""Per-token negative log-likelihood and predictive entropy (SPEC section 1).

The meaning of `token_nll_entropy` is the short reference it must equal (kept in
tests/distributed/test_token_stats.py), evaluated in float64 over the whole vocabulary:

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

from q_tuning.lse_stats import STAT_ROWS, check_targets, chunk_stats, merge_shards
from q_tuning.parallel import comm

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


def token_nll_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tp_group: torch.distributed.ProcessGroup | None = None,
    *,
    chunk_size: int | None = None,
    validate_targets: bool = True,
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
        validate_targets: False skips the target check (its host sync) for callers that checked
            the ids already, once for many calls (`score_samples`).

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
    tp_size, tp_rank = comm.size_and_rank(tp_group)
    v_local = logits.shape[-1]
    vocab_start = tp_rank * v_local
    if validate_targets:
        check_targets(targets, v_local * tp_size)

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
        stats = torch.empty(len(STAT_ROWS), num_tokens, dtype=compute_dtype, device=logits.device)
        buffers = torch.empty(2, min(chunk_size, num_tokens), v_local, dtype=compute_dtype,
                              device=logits.device)
        first = 0
        for block in _row_blocks(logits):  # [rows, V_local] views, tokens in order
            for lo in range(0, block.shape[0], chunk_size):
                rows = block[lo:lo + chunk_size]
                n = rows.shape[0]
                chunk_stats(rows, targets[first:first + n] - vocab_start,
                             buffers[:, :n], stats[:, first:first + n])
                first += n
        if tp_size > 1:
            owned = (targets >= vocab_start) & (targets < vocab_start + v_local)
            merge_shards(stats, owned, tp_group)
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
    return itemsize * (2 * min(chunk_size, num_tokens) * vocab_local + len(STAT_ROWS) * num_tokens)


def _default_chunk_elements(device: torch.device) -> int:
    if device.type != "cpu":
        return _CHUNK_ELEMENTS_OTHER
    if torch.get_num_threads() == 1:
        return _CPU_CHUNK_ELEMENTS_SINGLE_THREAD
    return _CPU_CHUNK_ELEMENTS_MULTI_THREAD


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
