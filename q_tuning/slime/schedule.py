"""Pure translation between slime's per-DP-rank `rollout_data` and the pruner's batch, and the
micro-batch schedule of the kept samples. No slime import, no collectives (hook.py does those).

slime's layout of one sample (THUDM/slime, `slime/ray/rollout.py` and
`slime/backends/megatron_utils/data.py`): `tokens` (prompt then response, `total_lengths[i]`
tokens), `response_lengths[i]`, and `loss_masks[i]` over the RESPONSE only (`response_lengths[i]`
entries, aligned to the last tokens). Response entry k is the token at position
`total - response + k`; its loss is the log-prob of that token given everything before it.

Our convention (q_tuning.pruner): a full-length mask where position j = 1 means token j is a target
predicted from tokens < j (position 0 never is). So the translation is exact and needs no shift:
`ours = [0] * prompt_length + slime_mask`, and back `slime_mask = ours[prompt_length:]`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from q_tuning.passes.microbatch import first_fit

# Fields of rollout_data that describe the schedule, not samples (read by reference by slime's
# DataIterator and train(): rewritten in place by the hook).
SCHEDULE_KEYS = ("micro_batch_indices", "num_microbatches", "global_batch_sizes")
# Lists slime ships whole (indexed by rollout position, not by this rank's samples).
WHOLE_ROLLOUT_KEYS = ("raw_reward",)
# Per-sample fields indexed by response position: trimming a sample's tail would have to cut them
# too, so their presence turns the tail trim off.
PER_RESPONSE_TOKEN_KEYS = ("log_probs", "ref_log_probs", "rollout_log_probs", "teacher_log_probs",
                           "advantages", "returns", "values", "entropy",
                           "rollout_top_p_token_ids", "rollout_top_p_token_offsets",
                           "rollout_routed_experts", "multimodal_train_inputs")


def per_sample_keys(rollout_data: dict) -> list[str]:
    """Keys of rollout_data holding one entry per sample of this rank (lists, or 1-D tensors such
    as `rollout_mask_sums`), in insertion order."""
    n = len(rollout_data["tokens"])
    keys = []
    for key, value in rollout_data.items():
        if key in SCHEDULE_KEYS or key in WHOLE_ROLLOUT_KEYS:
            continue
        if isinstance(value, (list, tuple)) and len(value) == n:
            keys.append(key)
        elif torch.is_tensor(value) and value.dim() == 1 and value.numel() == n:
            keys.append(key)
    return keys


def prompt_lengths(rollout_data: dict) -> list[int]:
    return [int(t.numel()) - int(r) for t, r in zip(rollout_data["tokens"],
                                                     rollout_data["response_lengths"])]


def to_batch(rollout_data: dict, keys: Sequence[str]) -> tuple[dict[str, list], dict[str, Any]]:
    """(the pruner's batch on CPU, what `from_batch` needs to restore devices and dtypes).

    `tokens` become 1-D int64, `loss_masks` full-length int64 masks in our convention; every other
    per-sample field is carried along (tensors moved to CPU: samples cross DP ranks by an object
    all-gather); 1-D tensor fields become lists of 0-d tensors."""
    restore: dict[str, Any] = {}
    batch: dict[str, list] = {}
    for key in keys:
        value = rollout_data[key]
        if torch.is_tensor(value):
            restore[key] = ("tensor", value.device, value.dtype)
            batch[key] = list(value.detach().cpu().unbind(0))
            continue
        first = next((v for v in value if torch.is_tensor(v)), None)
        restore[key] = ("list", first.device if first is not None else None,
                        first.dtype if first is not None else None)
        batch[key] = [v.detach().cpu() if torch.is_tensor(v) else v for v in value]
    masks = []
    for i, (tok, resp) in enumerate(zip(batch["tokens"], batch["response_lengths"])):
        total, resp = int(tok.numel()), int(resp)
        slime_mask = batch["loss_masks"][i]
        slime_mask = slime_mask if torch.is_tensor(slime_mask) else torch.tensor(slime_mask)
        if resp < 1 or resp >= total or slime_mask.numel() != resp:
            raise ValueError(f"sample {i} of this data-parallel rank: response_length {resp}, "
                             f"{total} tokens, loss mask of {slime_mask.numel()} entries; slime "
                             "needs 1 <= response_length < total and one mask entry per "
                             "response token")
        full = torch.zeros(total, dtype=torch.long)
        full[total - resp:] = slime_mask.long()
        masks.append(full)
    batch["tokens"] = [t.long() for t in batch["tokens"]]
    batch["loss_masks"] = masks
    return batch, restore


def to_slime_sample(sample: dict, *, trim: bool) -> dict:
    """One kept sample (pruner batch fields, our-convention mask) in slime's layout.

    With `trim`, tokens after the last loss target are cut: under causal attention they influence
    no trained position, so the loss and its gradient are unchanged and those tokens are neither
    forwarded nor back-propagated. A sample without targets (the pruner's zero-loss filler) becomes
    a 2-token filler (`filler_sample`)."""
    tokens, mask = sample["tokens"], sample["loss_masks"]
    prompt = int(tokens.numel()) - int(sample["response_lengths"])
    targets = mask.nonzero().flatten()
    if targets.numel() == 0:
        return filler_sample(sample)
    end = int(targets[-1]) + 1 if trim else int(tokens.numel())
    out = dict(sample)
    out["tokens"] = tokens[:end]
    out["loss_masks"] = mask[prompt:end]
    out["response_lengths"] = end - prompt
    if "total_lengths" in out:
        out["total_lengths"] = end
    return out


def filler_sample(sample: dict) -> dict:
    """A 2-token sample with no loss target (one prompt token, one masked response token): keeps a
    rank's micro-batch count equal to the others' at the least compute. slime's per-token loss
    counts it as 1 token (`clamp_min(mask.sum(), 1)`); its loss is 0."""
    out = dict(sample)
    out["tokens"] = sample["tokens"][:2].clone()
    out["loss_masks"] = torch.zeros(1, dtype=torch.long)
    out["response_lengths"] = 1
    if "total_lengths" in out:
        out["total_lengths"] = 2
    return out


def fixed_chunks(count: int, size: int) -> list[list[int]]:
    """Consecutive chunks of `size` samples (slime's static micro-batches)."""
    return [list(range(i, min(i + size, count))) for i in range(0, count, size)]


def split_to(bins: list[list[int]], target: int, lengths: Sequence[int]) -> list[list[int]]:
    """Split the largest multi-sample bin (by tokens) into two token-balanced halves until there
    are `target` bins or none can be split. Halves never exceed the bin they came from."""
    bins = [list(b) for b in bins]
    while len(bins) < target:
        splittable = [(sum(lengths[i] for i in b), -j) for j, b in enumerate(bins) if len(b) > 1]
        if not splittable:
            break
        _, neg_j = max(splittable)
        j = -neg_j
        halves: list[list[int]] = [[], []]
        sums = [0, 0]
        for i in sorted(bins[j], key=lambda i: (-lengths[i], i)):
            side = 0 if sums[0] <= sums[1] else 1
            halves[side].append(i)
            sums[side] += lengths[i]
        bins[j:j + 1] = [sorted(halves[0]), sorted(halves[1])]
    return bins


def local_bins(lengths: Sequence[int], *, dynamic: bool, max_tokens: int | None,
               micro_batch_size: int | None) -> list[list[int]]:
    """This rank's micro-batches before the counts are agreed over DP."""
    if dynamic:
        if not max_tokens:
            raise ValueError("--use-dynamic-batch-size needs --max-tokens-per-gpu")
        return first_fit(lengths, max_tokens)
    return fixed_chunks(len(lengths), max(1, int(micro_batch_size or 1)))


def equalize(bins: list[list[int]], target: int, lengths: Sequence[int]) -> tuple[list[list[int]], int]:
    """(`target` bins, fillers needed): split bins up to `target`; the bins still missing (a rank
    with fewer samples than the others' micro-batches) are left to 2-token fillers, each in its own
    micro-batch, counted in the second value."""
    bins = split_to(bins, target, lengths)
    return bins, target - len(bins)


def reorder(samples: list[dict], bins: list[list[int]], fillers: list[dict]
            ) -> tuple[list[dict], list[list[int]]]:
    """Samples laid out micro-batch by micro-batch, and slime's `micro_batch_indices` over them
    (consecutive ranges, so flattening gives range(n) as slime's forward_only expects)."""
    ordered = [samples[i] for b in bins for i in b] + fillers
    indices, start = [], 0
    for size in [len(b) for b in bins] + [1] * len(fillers):
        indices.append(list(range(start, start + size)))
        start += size
    return ordered, indices


def write_back(rollout_data: dict, keys: Sequence[str], samples: list[dict],
               restore: dict[str, Any]) -> None:
    """Replace every per-sample field of rollout_data with `samples`' values (same dict object;
    tokens and loss masks back on their device with slime's dtypes)."""
    for key in keys:
        kind, device, dtype = restore[key]
        values = [s[key] for s in samples]
        if key == "tokens":
            values = [v.to(device or "cpu", dtype or torch.long) for v in values]
        elif key == "loss_masks":
            values = [v.to(device or "cpu", dtype or torch.int) for v in values]
        elif kind == "tensor":
            rollout_data[key] = torch.stack([torch.as_tensor(v) for v in values]).to(device, dtype)
            continue
        elif device is not None:
            values = [v.to(device) if torch.is_tensor(v) else v for v in values]
        rollout_data[key] = values if not isinstance(rollout_data[key], tuple) else tuple(values)
