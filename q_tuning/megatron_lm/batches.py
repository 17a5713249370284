"""Megatron-LM micro-batches <-> Q-Tuning samples (pure tensor code, no process groups).

A Megatron-LM GPT micro-batch is the dict its DataLoader collates (what `get_batch` of
`pretrain_gpt.py` reads through `get_batch_on_this_tp_rank`, megatron/training/utils.py):
`tokens`, `labels`, `loss_mask`, `position_ids` `[b, s]`, optionally `attention_mask`
`[b, 1, s, s]` bool, and for `--sft` packed rows `cu_seqlens` `[1, n+1]` int32 with
`max_seqlen` `[1]` (b must be 1 there). Row position p predicts `labels[p]`, which is the next
input token `tokens[p + 1]` wherever `loss_mask[p] > 0` inside a segment.

A Q-Tuning sample is one segment `[a, b)` of a row: one row for pretraining/mock data, one packed
conversation for SFT. As a sample (the pruner's convention: `loss_masks[j] = 1` when token j is a
target):
    tokens     = tokens[a:b] + [labels[b-1]]        (L + 1,  L = b - a; where the last label
                                                     is not a target, any valid id stands in)
    loss_masks = [0] + loss_mask[a:b]               (L + 1)
and it carries `labels[a:b]` and `position_ids[a:b]` so that the rows can be rebuilt exactly.
Its targets are exactly the row's trained targets: target j (j >= 1) is `labels[a + j - 1]`,
weighted by `loss_mask[a + j - 1]`, predicted from `tokens[a:a + j]` at row position `a + j - 1`.
Its last token is input only (it predicts nothing), so the scoring forward's position L carries no
statistic; step.py clamps its position id where learned position embeddings end at the row length.
`samples_to_rows` is the inverse: kept samples back into rows (one per row, or packed first-fit in
order for SFT), with each row's loss mask being `loss_masks[1:]` of its samples.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from q_tuning.passes.microbatch import first_fit

PLAIN_KEYS = frozenset({"tokens", "labels", "loss_mask", "position_ids", "attention_mask"})
PACKED_ONLY = frozenset({"cu_seqlens", "max_seqlen"})
PACKED_KEYS = frozenset({"tokens", "labels", "loss_mask", "position_ids"}) | PACKED_ONLY


class UnsupportedBatch(ValueError):
    """The micro-batches are not in a layout this adapter understands (the run then stops on
    every rank with the reason, step.py)."""


@dataclasses.dataclass
class RowFormat:
    """What the rebuilt micro-batches must look like (taken from the drained ones)."""

    keys: tuple[str, ...]  # in the original order
    micro_batch_size: int
    seq_length: int
    packed: bool
    dtypes: dict[str, torch.dtype]
    attention_mask: torch.Tensor | None  # [1, 1, s, s], the one mask every plain row uses


def row_format(micro_batches: Sequence[dict]) -> RowFormat:
    """Check the drained micro-batches and describe them; raises UnsupportedBatch."""
    if not micro_batches:
        raise UnsupportedBatch("no micro-batches")
    first = micro_batches[0]
    if not isinstance(first, dict):
        raise UnsupportedBatch(f"micro-batches are {type(first).__name__}, not dicts")
    keys = set(first)
    packed = "cu_seqlens" in keys
    expected = PACKED_KEYS if packed else PLAIN_KEYS
    required = expected - {"attention_mask"}
    if not required <= keys or not keys <= expected:
        raise UnsupportedBatch(f"micro-batch keys {sorted(keys)}; expected {sorted(required)}"
                               + ("" if packed else " (+ attention_mask)"))
    b, s = first["tokens"].shape
    if packed and b != 1:
        raise UnsupportedBatch(f"packed rows need --micro-batch-size 1, got {b}")
    template = None
    if "attention_mask" in keys:
        template = first["attention_mask"][:1].clone()
    for mb in micro_batches:
        if set(mb) != keys or any(mb[k].shape[:2] != (b, s) for k in required - PACKED_ONLY):
            raise UnsupportedBatch("micro-batches differ in keys or shapes")
        if template is not None and not bool((mb["attention_mask"] == template).all()):
            raise UnsupportedBatch("rows have different attention masks (documents reset inside "
                                   "a row, --reset-attention-mask?)")
    return RowFormat(keys=tuple(first), micro_batch_size=b, seq_length=s, packed=packed,
                     dtypes={k: v.dtype for k, v in first.items()}, attention_mask=template)


def _segments(mb: dict, row: int) -> list[tuple[int, int]]:
    s = mb["tokens"].shape[1]
    if "cu_seqlens" not in mb:
        return [(0, s)]
    cu = mb["cu_seqlens"][row].tolist()
    if cu[0] != 0 or cu[-1] > s or any(b < a for a, b in zip(cu, cu[1:])):
        raise UnsupportedBatch(f"cu_seqlens {cu} do not cut a row of {s} tokens")
    return [(a, b) for a, b in zip(cu, cu[1:]) if b > a]


def micro_batches_to_samples(micro_batches: Sequence[dict]) -> dict[str, list[torch.Tensor]]:
    """Per-sample lists `tokens`, `loss_masks` (the pruner's fields), `labels`, `position_ids`,
    in row order; raises UnsupportedBatch when a target is not the next input token."""
    out: dict[str, list[torch.Tensor]] = {"tokens": [], "loss_masks": [], "labels": [],
                                          "position_ids": []}
    for mb in micro_batches:
        tokens, labels = mb["tokens"].long(), mb["labels"].long()
        mask = mb["loss_mask"].float()
        for r in range(tokens.shape[0]):
            for a, b in _segments(mb, r):
                trained = mask[r, a:b - 1] > 0
                if not torch.equal(labels[r, a:b - 1][trained], tokens[r, a + 1:b][trained]):
                    raise UnsupportedBatch("a training target is not the next input token "
                                           "(labels[p] != tokens[p+1] where loss_mask[p] > 0)")
                # The last target; where it is not trained (-100, padding) any valid id will do.
                last = labels[r, b - 1:b] if mask[r, b - 1] > 0 else tokens[r, b - 1:b]
                out["tokens"].append(torch.cat([tokens[r, a:b], last]))
                out["loss_masks"].append(torch.cat([mask.new_zeros(1), mask[r, a:b]]))
                out["labels"].append(labels[r, a:b].clone())
                out["position_ids"].append(mb["position_ids"][r, a:b].clone())
    return out


def trim_to_targets(samples: dict[str, list]) -> dict[str, list]:
    """The samples as the scoring pass needs them: `tokens` and `loss_masks` cut after the last
    target (attention is causal, so what follows it changes no target's statistic: a plain row's
    padding up to --seq-length is not scored), the full tokens kept in `row_tokens` for
    `untrim`. Every rank of a TP x PP group trims its identical samples identically."""
    ends = [_target_end(m) for m in samples["loss_masks"]]
    return {**samples, "row_tokens": list(samples["tokens"]),
            "tokens": [t[:e] for t, e in zip(samples["tokens"], ends)],
            "loss_masks": [m[:e] for m, e in zip(samples["loss_masks"], ends)]}


def _target_end(mask: torch.Tensor) -> int:
    """One past the last target (at least 2 tokens: a sample needs a target position)."""
    nonzero = mask.nonzero()
    return max(2, int(nonzero[-1]) + 1) if nonzero.numel() else min(2, mask.numel())


def untrim(kept: dict[str, list]) -> dict[str, list]:
    """Undo `trim_to_targets` on the kept samples: full tokens, loss masks (token-pruned) padded
    with zeros to them."""
    out = {k: v for k, v in kept.items() if k != "row_tokens"}
    out["tokens"] = list(kept["row_tokens"])
    out["loss_masks"] = padded_masks(kept["loss_masks"], kept["row_tokens"])
    return out


def padded_masks(masks: Sequence[torch.Tensor], tokens: Sequence[torch.Tensor]
                 ) -> list[torch.Tensor]:
    """Each (trimmed) mask padded with zeros to its sample's full length."""
    return [torch.cat([m, m.new_zeros(t.numel() - m.numel())]) for m, t in zip(masks, tokens)]


def plan_rows(lengths: Sequence[int], *, seq_length: int, packed: bool) -> list[list[int]]:
    """Sample indices per row. Plain: one sample per row. Packed: first-fit in sample order under
    `seq_length` tokens per row (`lengths` are segment lengths L, i.e. sample tokens - 1)."""
    if not packed:
        return [[i] for i in range(len(lengths))]
    too_long = [n for n in lengths if n > seq_length]
    if too_long:
        raise UnsupportedBatch(f"a segment of {too_long[0]} tokens does not fit --seq-length "
                               f"{seq_length}")
    return first_fit(lengths, seq_length)


def num_micro_batches(num_rows: int, micro_batch_size: int) -> int:
    return -(-num_rows // micro_batch_size)


def samples_to_rows(samples: dict[str, list], rows: list[list[int]], fmt: RowFormat,
                    count: int) -> list[dict]:
    """`count` micro-batches in the format of the drained ones: the planned rows, then filler rows
    (all-zero loss mask) up to `count * micro_batch_size` rows."""
    b = fmt.micro_batch_size
    if num_micro_batches(len(rows), b) > count:
        raise ValueError(f"{len(rows)} rows need more than {count} micro-batches of {b}")
    built = [_pack_row(samples, row, fmt) for row in rows]
    filler = _filler_row(fmt)
    built += [filler] * (count * b - len(built))
    out = []
    for m in range(count):
        part = built[m * b:(m + 1) * b]
        mb = {k: torch.stack([row[k] for row in part]) for k in part[0]}
        if fmt.attention_mask is not None:
            mb["attention_mask"] = fmt.attention_mask.expand(b, -1, -1, -1).clone()
        out.append({k: mb[k].to(fmt.dtypes[k]) for k in fmt.keys})
    return out


def _pack_row(samples: dict[str, list], row: list[int], fmt: RowFormat) -> dict[str, torch.Tensor]:
    s = fmt.seq_length
    parts = {k: [] for k in ("tokens", "labels", "loss_mask", "position_ids")}
    cu = [0]
    for i in row:
        parts["tokens"].append(samples["tokens"][i][:-1])
        parts["labels"].append(samples["labels"][i])
        parts["loss_mask"].append(samples["loss_masks"][i][1:].float())
        parts["position_ids"].append(samples["position_ids"][i])
        cu.append(cu[-1] + samples["labels"][i].numel())
    used = cu[-1]
    if not fmt.packed and used != s:
        raise ValueError(f"a plain row must hold exactly {s} tokens, got {used}")
    if used < s:  # packed: the rest of the row is one padding segment that trains on nothing
        pad = s - used
        parts["tokens"].append(torch.zeros(pad, dtype=torch.long))
        parts["labels"].append(torch.zeros(pad, dtype=torch.long))
        parts["loss_mask"].append(torch.zeros(pad))
        parts["position_ids"].append(torch.arange(pad))
        cu.append(s)
    row_tensors = {k: torch.cat([p.to(parts[k][0].dtype) for p in v]) for k, v in parts.items()}
    if fmt.packed:
        cu_t = torch.tensor(cu, dtype=torch.int32)
        row_tensors["cu_seqlens"] = cu_t
        row_tensors["max_seqlen"] = (cu_t[1:] - cu_t[:-1]).max()
    return row_tensors


def _filler_row(fmt: RowFormat) -> dict[str, torch.Tensor]:
    s = fmt.seq_length
    row = {"tokens": torch.zeros(s, dtype=torch.long), "labels": torch.zeros(s, dtype=torch.long),
           "loss_mask": torch.zeros(s), "position_ids": torch.arange(s)}
    if fmt.packed:
        row["cu_seqlens"] = torch.tensor([0, s], dtype=torch.int32)
        row["max_seqlen"] = torch.tensor(s, dtype=torch.int32)
    return row
