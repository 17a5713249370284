"""Samples -> megatron-core micro-batches, shared by the scoring pass and the training step.

A sample is `tokens[L]` with `loss_mask[L]` (1 = token t is a training target, slime's convention).
Rows hold either one sample each (padded layout) or several samples packed first-fit under a token
budget (slime's `--use-dynamic-batch-size --max-tokens-per-gpu`). In both layouts a row position
`p` predicts the token at `p + 1` only when both belong to the same sample, so neither targets nor
attention ever cross a sample boundary.

Model inputs follow megatron-core's GPTModel: `input_ids`, `position_ids` (restarting at 0 in every
sample) and `attention_mask` (bool, True = masked out). Padded rows pass `attention_mask=None`
(the causal mask of the attention implementation applies; padding sits after the sample so it
cannot influence it); packed rows pass a block-diagonal causal mask `[b, 1, s, s]`, or, when the
model's core attention takes megatron's `PackedSeqParams` (transformer-engine's, on GPU), the THD
format: `attention_mask=None` and `packed_seq_params` with the row's `cu_seqlens`. The scoring and
the training pass decide once per pass (`takes_packed_seq_params`) and build their micro-batches
for that path (`build_micro_batches(thd=...)`); `model_inputs` turns a micro-batch into the call.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Sequence

import torch


# Length bucketing (`bucket_rows`): what one more micro-batch costs, in padded tokens. On the
# 2-core CPU of docs/benchmarks.md a token of SmolLM2-135M costs ~16 ms forward-backward and a
# micro-batch's fixed part (reading the weights, the schedule's Python) ~0.1-0.2 s, i.e. ~10
# tokens; 64 stays on the safe side of that and leaves small samples grouped as before.
MICRO_BATCH_OVERHEAD_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """Which samples go in which row, and which rows form a micro-batch."""

    rows: list[list[int]]  # sample indices per row, in order
    rows_per_micro_batch: int  # the most rows of one micro-batch
    seq_length: int  # the longest row, rounded up to `length_multiple`
    length_multiple: int = 1
    # False: every micro-batch is padded only to its own longest row. Allowed without pipeline
    # parallelism, where no p2p buffer fixes the shape; with rows grouped by length it removes
    # most padding.
    uniform_length: bool = True
    # Rows per micro-batch, in order, when they differ (length buckets, `bucket_rows`); None:
    # `rows_per_micro_batch` each (the last one may be short).
    bucket_sizes: tuple[int, ...] | None = None

    def micro_batch_length(self, rows: list[list[int]], lengths: Sequence[int]) -> int:
        if self.uniform_length:
            return self.seq_length
        longest = max((sum(lengths[i] for i in row) for row in rows), default=1)
        return round_up(max(longest, 1), self.length_multiple)

    def micro_batch_rows(self) -> list[list[list[int]]]:
        """The rows of each micro-batch, in order."""
        sizes = self.bucket_sizes or [self.rows_per_micro_batch] * self.num_micro_batches
        out, start = [], 0
        for size in sizes:
            out.append(self.rows[start:start + size])
            start += size
        return out

    @property
    def num_micro_batches(self) -> int:
        if self.bucket_sizes is not None:
            return len(self.bucket_sizes)
        return math.ceil(len(self.rows) / self.rows_per_micro_batch) if self.rows else 0

    @property
    def packed(self) -> bool:
        return any(len(r) > 1 for r in self.rows)

    def padded_tokens(self, lengths: Sequence[int], num_micro_batches: int | None = None) -> int:
        """Token positions the micro-batches of this layout hold (`build_micro_batches`'s
        shapes; extra all-padding micro-batches up to `num_micro_batches` included)."""
        groups = self.micro_batch_rows()
        total = sum(self.rows_in(g) * self.micro_batch_length(g, lengths) for g in groups)
        extra = (num_micro_batches or len(groups)) - len(groups)
        return total + extra * self.rows_in([]) * self.micro_batch_length([], lengths)

    def padding(self, lengths: Sequence[int]) -> float:
        """Padded positions per real token of this layout's micro-batches (0: none)."""
        real = sum(lengths)
        return (self.padded_tokens(lengths) - real) / max(real, 1)

    def rows_in(self, group: list[list[int]]) -> int:
        """Rows of the built micro-batch holding `group`: `rows_per_micro_batch` unless bucketed
        (then its own; an all-padding filler has one)."""
        return self.rows_per_micro_batch if self.bucket_sizes is None else max(len(group), 1)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def first_fit(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit bins of sample indices, in sample order, under `budget` tokens each; a sample
    longer than the budget sits alone in its bin (callers that cannot allow it check first)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(budget - n)
    return bins


def bucket_rows(lengths: Sequence[int], max_rows: int,
                overhead_tokens: int = MICRO_BATCH_OVERHEAD_TOKENS) -> list[int]:
    """Sizes of consecutive micro-batches over rows sorted longest first (`lengths` descending):
    at most `max_rows` each, chosen to minimise the padded tokens (`rows x first row's length`)
    plus `overhead_tokens` per micro-batch. Exact (dynamic programming over the split points,
    O(n max_rows)); ties go to fewer, fuller micro-batches first."""
    n = len(lengths)
    best = [0] + [math.inf] * n  # best[j]: cost of the first j rows
    size = [0] * (n + 1)
    for j in range(1, n + 1):
        for k in range(1, min(max_rows, j) + 1):  # the last micro-batch holds rows j-k .. j-1
            cost = best[j - k] + k * lengths[j - k] + overhead_tokens
            if cost < best[j] or (cost == best[j] and k > size[j]):
                best[j], size[j] = cost, k
    sizes, j = [], n
    while j:
        sizes.append(size[j])
        j -= size[j]
    return sizes[::-1]


def plan_rows(lengths: Sequence[int], *, rows_per_micro_batch: int | None = None,
              max_tokens_per_row: int | None = None, seq_length: int | None = None,
              length_multiple: int = 1, uniform_length: bool = True,
              max_padding: float | None = None) -> RowLayout:
    """Lay samples out in rows: one per row, or packed first-fit under `max_tokens_per_row`.

    `seq_length` (the row length every micro-batch is padded to, a megatron p2p shape) defaults to
    the longest row, rounded up to `length_multiple` (2*cp, and tp with sequence parallelism).
    With `uniform_length=False` (no pipeline parallelism) rows are sorted by length, longest
    first, cut into length buckets of at most `rows_per_micro_batch` rows (`bucket_rows`), and
    each micro-batch is padded to its own longest row. `max_padding` bounds the buckets' padding
    (`RowLayout.padding`): the micro-batch overhead that `bucket_rows` trades against padding is
    halved until the bound holds, down to 0 (the least padding these rows allow).
    """
    if max_tokens_per_row is not None:
        for i, n in enumerate(lengths):
            if n > max_tokens_per_row:
                raise ValueError(f"sample {i} has {n} tokens, more than --max-tokens-per-gpu "
                                 f"{max_tokens_per_row}")
        rows = first_fit(lengths, max_tokens_per_row)
        rows_per_micro_batch = 1
    else:
        order = range(len(lengths))
        if not uniform_length:
            order = sorted(order, key=lambda i: (-lengths[i], i))
        rows = [[i] for i in order]
        rows_per_micro_batch = rows_per_micro_batch or 1
    longest = max((sum(lengths[i] for i in row) for row in rows), default=1)
    if seq_length is None:
        seq_length = round_up(max(longest, 1), length_multiple)
    elif longest > seq_length:
        raise ValueError(f"a row of {longest} tokens does not fit --seq-length {seq_length}")
    if seq_length % length_multiple:
        raise ValueError(f"sequence length {seq_length} must be a multiple of {length_multiple} "
                         "(2 x context-parallel size, x tensor-parallel size with sequence "
                         "parallelism)")
    layout = RowLayout(rows=rows, rows_per_micro_batch=rows_per_micro_batch,
                       seq_length=seq_length, length_multiple=length_multiple,
                       uniform_length=uniform_length)
    if uniform_length or rows_per_micro_batch == 1:
        return layout
    row_lengths = [sum(lengths[i] for i in row) for row in rows]
    overhead = MICRO_BATCH_OVERHEAD_TOKENS
    while True:
        bucketed = dataclasses.replace(layout, bucket_sizes=tuple(
            bucket_rows(row_lengths, rows_per_micro_batch, overhead)))
        if max_padding is None or overhead == 0 or bucketed.padding(lengths) <= max_padding:
            return bucketed
        overhead //= 2


def build_micro_batches(tokens: Sequence[torch.Tensor], loss_masks: Sequence[torch.Tensor],
                        layout: RowLayout, *, num_micro_batches: int | None = None,
                        thd: bool = False) -> list[dict[str, torch.Tensor | None]]:
    """Full-sequence micro-batches (before any context-parallel split).

    Each is a dict of `[b, s]` tensors: `tokens`, `labels` (next token of the same sample, else
    0), `loss_mask` (float, 1 where `labels` is a training target), `position_ids`,
    `sample_index` / `target_index` (which sample and which of its tokens position p predicts;
    -1 where none) and `attention_mask` (None or `[b, 1, s, s]` bool). Packed rows with `thd`
    get `cu_seqlens` (their segment boundaries) instead of the mask. Micro-batches beyond the
    samples (`num_micro_batches` larger than needed, to keep counts equal across ranks) are
    all-padding with an all-zero loss mask.
    """
    count = layout.num_micro_batches if num_micro_batches is None else num_micro_batches
    if count < layout.num_micro_batches:
        raise ValueError(f"{layout.num_micro_batches} micro-batches needed, {count} requested")
    lengths = [t.numel() for t in tokens]
    groups = layout.micro_batch_rows()
    groups += [[] for _ in range(count - len(groups))]
    return [_micro_batch(tokens, loss_masks, layout, rows, lengths, thd) for rows in groups]


def _micro_batch(tokens: Sequence[torch.Tensor], loss_masks: Sequence[torch.Tensor],
                 layout: RowLayout, rows: list[list[int]], lengths: list[int],
                 thd: bool) -> dict[str, torch.Tensor | None]:
    """One micro-batch of `build_micro_batches` holding `rows`."""
    b, s = layout.rows_in(rows), layout.micro_batch_length(rows, lengths)
    mb = {k: torch.zeros(b, s, dtype=torch.long) for k in ("tokens", "labels", "position_ids")}
    mb["sample_index"] = torch.full((b, s), -1, dtype=torch.long)
    mb["target_index"] = torch.full((b, s), -1, dtype=torch.long)
    mb["loss_mask"] = torch.zeros(b, s, dtype=torch.float32)
    segment = torch.full((b, s), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            tok, n = tokens[i], lengths[i]
            end = start + n
            mb["tokens"][r, start:end] = tok
            mb["position_ids"][r, start:end] = torch.arange(n)
            segment[r, start:end] = i
            # position p predicts token p + 1 of the same sample
            mb["labels"][r, start:end - 1] = tok[1:]
            mb["loss_mask"][r, start:end - 1] = loss_masks[i][1:].to(torch.float32)
            mb["sample_index"][r, start:end - 1] = i
            mb["target_index"][r, start:end - 1] = torch.arange(1, n)
            start = end
    mb["attention_mask"] = None
    if layout.packed and thd:  # one row per micro-batch (plan_rows): its segments
        mb["cu_seqlens"] = row_cu_seqlens([lengths[i] for i in rows[0]] if rows else [], s)
    elif layout.packed:
        mb["attention_mask"] = block_causal_mask(segment)
    return mb


def row_cu_seqlens(segment_lengths: Sequence[int], row_length: int) -> torch.Tensor:
    """int32 `[0, n1, n1+n2, ..., row_length]`: segment boundaries of a packed row; the padding
    after the last sample is one more segment (it attends only to itself, as in the mask path)."""
    bounds = [0]
    for n in segment_lengths:
        bounds.append(bounds[-1] + n)
    if bounds[-1] < row_length:
        bounds.append(row_length)
    return torch.tensor(bounds, dtype=torch.int32)


def takes_packed_seq_params(model: torch.nn.Module) -> bool:
    """True when the model's core attention runs packed rows in the THD format: transformer-
    engine's `TEDotProductAttention`, or any core attention declaring
    `accepts_packed_seq_params = True`. megatron-core's local `DotProductAttention` does not."""
    return any(getattr(m, "accepts_packed_seq_params", False)
               or type(m).__name__ == "TEDotProductAttention" for m in model.modules())


def model_inputs(mb: dict) -> tuple[tuple, dict]:
    """`(args, kwargs)` of the GPTModel call for a micro-batch: tokens, position ids and the
    attention mask; or, for a packed row built for THD, no mask and `packed_seq_params`."""
    if mb.get("cu_seqlens") is None:
        return (mb["tokens"], mb["position_ids"], mb["attention_mask"]), {}
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = mb["cu_seqlens"].to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=longest, max_seqlen_kv=longest)
    return (mb["tokens"], mb["position_ids"], None), {"packed_seq_params": params}


def check_thd_context_parallel(thd: bool, cp_size: int, max_tokens_per_row: int | None) -> None:
    """Packed rows in THD format under context parallelism need per-segment zigzag splitting
    (transformer-engine's `thd_get_partitioned_indices`), which is not implemented: refuse it on
    every rank alike (the condition depends on configuration only, never on the data)."""
    if thd and cp_size > 1 and max_tokens_per_row is not None:
        raise ValueError("packed rows (--use-dynamic-batch-size / --max-tokens-per-gpu) with "
                         "--context-parallel-size > 1 are not supported with transformer-engine "
                         "attention (THD format); use fixed-length rows (no dynamic batch size) "
                         "or --context-parallel-size 1")


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """`[b, 1, s, s]` bool, True = masked: causal within a segment; padding (-1) sees itself."""
    s = segment_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool).tril_()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (b, s, s)
    allowed = same & causal & (segment_ids >= 0)[:, :, None]  # padding queries: only the diagonal
    allowed |= torch.eye(s, dtype=torch.bool)  # keep padding rows' softmax finite
    return ~allowed[:, None]


def slice_for_context_parallel(mb: dict, cp_group) -> dict:
    """This CP rank's zigzag chunks (rank r holds chunks r and 2cp-1-r), via megatron-core."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    if cp_group is None or cp_group.size() == 1:
        return mb
    mb = {k: v for k, v in mb.items() if k != "cu_seqlens"}  # THD + CP is refused earlier
    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        # megatron-core >= 0.17 requires it; without cu_seqlens it takes the same per-sequence
        # zigzag as 0.16's function.
        return get_batch_on_this_cp_rank(mb, is_hybrid_cp=False, cp_group=cp_group)
    return get_batch_on_this_cp_rank(mb, cp_group=cp_group)


def micro_batch_count_multiple(model_chunks: Sequence[torch.nn.Module], pp_size: int) -> int:
    """Interleaved (virtual) pipelines need the micro-batch count to be a multiple of PP."""
    return pp_size if len(model_chunks) > 1 else 1
