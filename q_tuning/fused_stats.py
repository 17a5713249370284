"""Per-token NLL and entropy straight from hidden states: the output layer fused with the token
statistics (SPEC section 1), without ever forming the `[tokens, vocab]` logits.

The meaning of `fused_nll_entropy` is the short reference it must equal (kept in
tests/distributed/test_fused_stats.py):

    logits = hidden.to(weight.dtype) @ weight.T            # [n, V/tp], as the output layer does
    logits = logits + bias                                   # if any, also in the weight's dtype
    token_nll_entropy(logits, targets, tp_group)

What differs is cost: tokens x vocabulary are visited in blocks of at most `chunk_tokens x
chunk_vocab` logits. Each block is projected into one reusable buffer, reduced to four float32
numbers per token (max, sum-exp, sum e*(z - max), target logit), and merged into running
per-token values with the same log-sum-exp algebra that `token_nll_entropy` uses to combine
tensor-parallel shards. Extra memory is one block (its logits in the weight's dtype plus two
float32 buffers) and `[4, tokens]` of statistics, whatever the vocabulary size.
"""

from __future__ import annotations

import torch

# Shared with token_nll_entropy so that both paths compute the same per-block values and combine
# shards the same way (q_tuning.lse_stats).
from q_tuning.lse_stats import STAT_ROWS, check_targets, chunk_stats, merge_shards
from q_tuning.parallel import comm

__all__ = ["fused_nll_entropy", "fused_workspace_bytes"]

# Default block: (logits per block, vocabulary entries per block). Measured on a 2-core CPU
# (docs/benchmarks.md, section "Fused scoring", block study): 2^22 logits as 512 tokens x 8192
# entries was among the fastest shapes with one thread and with two (where every op on a block is
# an OpenMP region waiting for all its threads, so 2^20 blocks ran 2-3x slower); blocks of few
# tokens (85 x 49,152) re-read the weight from memory per block and ran 1.2-1.5x slower; 2^24
# gained at most 1.4x for 4x the memory. On GPUs a block is a handful of kernel launches and the
# product wants large tiles: 2^24 as 1024 x 16384 (160 MiB in bf16 with its two float32 buffers)
# keeps each block compute-bound (reasoned, not measured in this repository).
_BLOCK = {"cpu": (1 << 22, 8192)}
_BLOCK_OTHER = (1 << 24, 16384)


def fused_nll_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    tp_group: torch.distributed.ProcessGroup | None = None,
    *,
    chunk_tokens: int | None = None,
    chunk_vocab: int | None = None,
    validate_targets: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token `nll = -log softmax(z)[target]` and entropy of `softmax(z)`, `z = hidden @ weight.T
    (+ bias)`, computed block by block without the `[n, V]` logits.

    Args:
        hidden: `[n, h]` final hidden states (after the final norm) of the tokens to score only,
            e.g. the response positions. Any floating dtype; cast to `weight.dtype` chunk by chunk
            for the product, as megatron's output layer multiplies in the weight's dtype.
        weight: the output layer's weight, or under tensor parallelism this rank's vocabulary
            shard `[V/tp, h]` (Megatron convention: TP rank `r` holds ids `[r*V/tp, (r+1)*V/tp)`).
            With tied embeddings, the word-embedding weight.
        targets: `[n]` global vocabulary ids in `[0, V)`.
        bias: `[V/tp]` output bias, or None.
        tp_group: the tensor-parallel group the vocabulary is sharded over; None = not sharded.
        chunk_tokens, chunk_vocab: block shape (tokens x vocabulary entries). None picks
            `chunk_vocab = min(V/tp, 8192)` and 2^22 logits per block on CPU (`min(V/tp, 16384)`
            and 2^24 on other devices).
        validate_targets: False skips the target check (its host sync) for callers that checked
            the ids already, once for many calls (`score_samples`).

    Returns:
        `(nll, entropy)`, float32 (computed in float64 for a float64 weight), shape `[n]`, on the
        weight's device, without autograd history. Non-finite logits give non-finite statistics
        for their tokens; nll is not clamped.

    Raises:
        ValueError: mismatched shapes or dtypes (expected vs. got), a target outside `[0, V)`, or a
            chunk size below 1.

    Composability:
        Tensor parallel: every rank of `tp_group` passes its weight (and bias) shard and the same
        hidden states and targets; all get the full-vocabulary statistics. Two all-reduces of
        `[n]`-sized tensors per call (MAX, then one SUM of three rows), exactly as
        `token_nll_entropy`; no vocabulary gather. Sequence parallel: pass the full (gathered)
        sequence's hidden states of the tokens to score, the same on every TP rank. Context/data
        parallel: token-local, apply it to each rank's own tokens. Pipeline: last stage only (it
        holds the output layer). The target check is one host sync per call.
    """
    _check_inputs(hidden, weight, targets, bias, chunk_tokens, chunk_vocab)
    tp_size, tp_rank = comm.size_and_rank(tp_group)
    v_local = weight.shape[0]
    vocab_start = tp_rank * v_local
    if validate_targets:
        check_targets(targets, v_local * tp_size)

    compute_dtype = torch.promote_types(weight.dtype, torch.float32)
    with torch.no_grad():
        n = hidden.shape[0]
        if n == 0:  # same on every TP rank (same targets): no collective is skipped alone
            empty = torch.empty(0, dtype=torch.float32, device=weight.device)
            return empty, empty.clone()
        chunk_tokens, chunk_vocab = _block_shape(n, v_local, weight.device, chunk_tokens,
                                                 chunk_vocab)
        local_targets = targets.long().to(weight.device) - vocab_start  # [n]
        stats = torch.empty(4, n, dtype=compute_dtype, device=weight.device)
        block = chunk_tokens * chunk_vocab
        logits_buffer = torch.empty(block, dtype=weight.dtype, device=weight.device)
        work = torch.empty(2 * block, dtype=compute_dtype, device=weight.device)
        block_stats = torch.empty(4, chunk_tokens, dtype=compute_dtype, device=weight.device)
        for lo in range(0, n, chunk_tokens):
            rows = hidden[lo:lo + chunk_tokens].to(device=weight.device, dtype=weight.dtype)
            _token_chunk(rows, weight, bias, local_targets[lo:lo + chunk_tokens], chunk_vocab,
                         logits_buffer, work, block_stats, stats[:, lo:lo + rows.shape[0]])
        if tp_size > 1:
            owned = (local_targets >= 0) & (local_targets < v_local)
            merge_shards(stats, owned, tp_group)
        _, sum_exp, sum_ed, target_logit = _named_rows(stats)
        log_sum_exp = sum_exp.log()
        nll = log_sum_exp - target_logit
        entropy = log_sum_exp - sum_ed / sum_exp  # -sum p log p, both terms >= 0
        return nll.float(), entropy.float()


def fused_workspace_bytes(num_tokens: int, vocab_local: int, weight_dtype: torch.dtype,
                          device: torch.device | str = "cpu", *, chunk_tokens: int | None = None,
                          chunk_vocab: int | None = None) -> int:
    """Upper bound of the bytes `fused_nll_entropy` allocates for `num_tokens` tokens, its two
    results included (not the caller's hidden states): one block, then `[tokens]`-sized values."""
    if num_tokens == 0:
        return 0
    ct, cv = _block_shape(num_tokens, vocab_local, torch.device(device), chunk_tokens, chunk_vocab)
    fp = torch.promote_types(weight_dtype, torch.float32).itemsize
    block = ct * cv * (weight_dtype.itemsize + 2 * fp)  # logits of one block + two work buffers
    # [4, n] stats, four [n] results/temporaries, ~12 [c] merge temporaries, targets and checks
    per_token = fp * (8 * num_tokens + 12 * ct) + 10 * num_tokens
    return block + per_token


def _token_chunk(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 local_targets: torch.Tensor, chunk_vocab: int, logits_buffer: torch.Tensor,
                 work: torch.Tensor, block_stats: torch.Tensor, out: torch.Tensor) -> None:
    """Fill `out` `[4, c]` with the stats of `rows @ weight.T (+ bias)` over this rank's whole
    vocabulary shard, one vocabulary block at a time, relative to the shard's running max."""
    c = rows.shape[0]
    for v0 in range(0, weight.shape[0], chunk_vocab):
        w = weight[v0:v0 + chunk_vocab]  # [vc, h], a view
        vc = w.shape[0]
        logits = logits_buffer[:c * vc].view(c, vc)
        torch.mm(rows, w.t(), out=logits)  # [c, vc] in the weight's dtype
        if bias is not None:  # added after the product, as ColumnParallelLinear does (2 roundings)
            logits.add_(bias[v0:v0 + vc])
        dest = out if v0 == 0 else block_stats[:, :c]
        chunk_stats(logits, local_targets - v0, work[:2 * c * vc].view(2, c, vc), dest)
        if v0:
            _merge_block(out, dest, local_targets, v0, vc)


def _merge_block(running: torch.Tensor, block: torch.Tensor, local_targets: torch.Tensor,
                 v0: int, vc: int) -> None:
    """Fold the stats of vocabulary block `[v0, v0 + vc)` into the running stats (in place).

    Both are `[4, c]` (rows as `STAT_ROWS`): max m, S = sum exp(z - m), T = sum exp(z - m)(z - m),
    target logit - m (0 if the target is elsewhere). With M = max(m_a, m_b) and d = m - M <= 0:
    S = sum e^d S_i and T = sum e^d (T_i + d S_i), the algebra `merge_shards` uses across TP.
    """
    run_max, run_s, run_t, run_tgt = _named_rows(running)
    blk_max, blk_s, blk_t, blk_tgt = _named_rows(block)
    new_max = torch.maximum(run_max, blk_max)
    d_run, d_blk = run_max - new_max, blk_max - new_max
    e_run, e_blk = d_run.exp(), d_blk.exp()
    run_t.add_(d_run * run_s).mul_(e_run).add_((blk_t + d_blk * blk_s).mul_(e_blk))
    run_s.mul_(e_run).add_(blk_s * e_blk)
    seen = (local_targets >= 0) & (local_targets < v0)
    here = (local_targets >= v0) & (local_targets < v0 + vc)
    run_tgt.copy_(torch.where(here, blk_tgt + d_blk, torch.where(seen, run_tgt + d_run, 0.0)))
    run_max.copy_(new_max)


def _named_rows(stats: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(max, sum_exp, sum_ed, target) rows of `[4, N]` stats laid out as `STAT_ROWS` says."""
    return tuple(stats[STAT_ROWS.index(name)] for name in ("max", "sum_exp", "sum_ed", "target"))


def _block_shape(n: int, v_local: int, device: torch.device, chunk_tokens: int | None,
                 chunk_vocab: int | None) -> tuple[int, int]:
    budget, default_vocab = _BLOCK.get(device.type, _BLOCK_OTHER)
    vocab = min(v_local, chunk_vocab or default_vocab)
    tokens = chunk_tokens or max(1, budget // vocab)
    return min(tokens, n), vocab


def _check_inputs(hidden, weight, targets, bias, chunk_tokens, chunk_vocab) -> None:
    if hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating [n, h] tensor, got dtype {hidden.dtype} and "
                         f"shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or not weight.is_floating_point() or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be a floating [V/tp, h={hidden.shape[1]}] tensor, got dtype "
                         f"{weight.dtype} and shape {tuple(weight.shape)}")
    if tuple(targets.shape) != (hidden.shape[0],):
        raise ValueError(f"targets must have shape [n] = ({hidden.shape[0]},), got "
                         f"{tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must hold integer vocabulary ids, got dtype {targets.dtype}")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(f"bias must be [V/tp] = ({weight.shape[0]},) of dtype {weight.dtype}, got "
                         f"{tuple(bias.shape)} of dtype {bias.dtype}")
    for name, value in (("chunk_tokens", chunk_tokens), ("chunk_vocab", chunk_vocab)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
