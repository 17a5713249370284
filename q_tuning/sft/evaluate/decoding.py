"""Greedy decoding for `q-tuning-eval`: a pool of row slots kept full (continuous batching).

Decoding one token per row per step streams all the weights once per step, so a step costs
about as much with 3 rows as with 16. Decoding batch by batch, each batch ends on a long tail
of a few rows that never write an answer line. Here a finished row's slot takes the next prompt
at once, so every step runs `batch_size` rows until the prompts run out.

- Rows share one left-padded KV window `[start, end)` in a preallocated buffer (`SlotCache`):
  a step writes one column in place (no `torch.cat` of the whole cache), a joining row is
  written right-aligned into its slot, and the window's start slides right past columns that
  no live row uses.
- `use_gqa_attention` runs transformers' SDPA attention with `enable_gqa` instead of copying
  the few KV heads to every query head on every step (the same kernel and sums).

Public API:
    Prefilled, prefill(model, prompts, live) -> Prefilled
    decode_pool(model, order, out, *, admit, batch_size, join_rows, finished, room=64)
    use_gqa_attention(model), GQA_ATTENTION
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = ["GQA_ATTENTION", "Prefilled", "SlotCache", "decode_pool", "prefill",
           "use_gqa_attention"]

GQA_ATTENTION = "q_tuning_gqa_sdpa"


class Prefilled(NamedTuple):
    """A left-padded batch after its prompt forward: the rows' prompt indices, KV cache, attention
    mask and position ids `[b, width]`, and the last position's logits `[b, V]`."""

    live: list[int]
    cache: Any
    attention: torch.Tensor
    positions: torch.Tensor
    logits: torch.Tensor


def prefill(model, prompts: Sequence[list[int]], live: list[int]) -> Prefilled:
    """One forward over the `live` prompts, left-padded to the longest."""
    width = max(len(prompts[i]) for i in live)
    ids = torch.zeros((len(live), width), dtype=torch.long)
    attention = torch.zeros((len(live), width), dtype=torch.long)
    for row, i in enumerate(live):  # left padding
        ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
        attention[row, width - len(prompts[i]):] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions,
                   past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    return Prefilled(list(live), cache, attention, positions, logits[:, -1])


def _gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
              is_causal=None, **kwargs):
    """transformers' `sdpa_attention_forward` with `enable_gqa=True` in place of `repeat_kv`."""
    if attention_mask is not None and attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, :key.shape[-2]]
    if is_causal is None:
        is_causal = (query.shape[2] > 1 and attention_mask is None
                     and getattr(module, "is_causal", True))
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=is_causal, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_gqa_attention(model) -> bool:
    """Switch a model that runs transformers' "sdpa" attention to `GQA_ATTENTION` (idempotent);
    False, and the model left as it is, for any other attention implementation."""
    current = model.config._attn_implementation
    if current == GQA_ATTENTION:
        return True
    if current != "sdpa" or _torch_version() < (2, 5):  # enable_gqa came with torch 2.5
        return False
    AttentionInterface.register(GQA_ATTENTION, _gqa_sdpa)
    AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)
    model.set_attn_implementation(GQA_ATTENTION)
    return True


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


class _SlotLayer:
    """One layer's keys and values `[slots, kv_heads, capacity, head_dim]`; the model sees the
    window `[start, end)` plus the columns a forward appends."""

    is_sliding = False
    is_initialized = True
    is_compileable = False

    def __init__(self, window: "SlotCache", keys: torch.Tensor, values: torch.Tensor):
        self.window, self.buffers = window, [keys, values]

    @property
    def keys(self) -> torch.Tensor:
        return self.buffers[0][:, :, self.window.start:self.window.end]

    @property
    def values(self) -> torch.Tensor:
        return self.buffers[1][:, :, self.window.start:self.window.end]

    def update(self, keys, values, *args, **kwargs):
        # transformers 4.57 passes cache_kwargs positionally; 5.x passes keyword arguments.
        start, end = self.window.start, self.window.end
        for buffer, new in zip(self.buffers, (keys, values)):
            buffer[:, :, end:end + new.shape[2]] = new
        return tuple(buffer[:, :, start:end + keys.shape[2]] for buffer in self.buffers)

    def get_seq_length(self) -> int:
        return self.window.end - self.window.start

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.get_seq_length() + cache_position.shape[0], 0

    def get_max_cache_shape(self) -> int:
        return -1


class SlotCache(Cache):
    """The pool's KV cache and attention mask `[slots, capacity]`: a transformers `Cache` whose
    layers share one window `[start, end)`, with the pool's operations (reserve columns, write a
    joining batch right-aligned into slots, keep slots, slide the start)."""

    def __init__(self, like: Any, slots: int, room: int):
        self.room = room
        self.start = self.end = 0
        self.mask = torch.zeros((slots, 0), dtype=torch.long)
        layers = []
        for keys, _ in _cache_layers(like):
            shape = (slots, keys.shape[1], 0, keys.shape[3])
            layers.append(_SlotLayer(self, keys.new_zeros(shape), keys.new_zeros(shape)))
        super().__init__(layers=layers)

    def _replace_buffers(self, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Each buffer (the mask, every layer's keys and values) by `change(buffer)`, one layer at
        a time, so that at most one layer's old and new buffers are held at once."""
        self.mask = change(self.mask)
        for layer in self.layers:
            layer.buffers = [change(buffer) for buffer in layer.buffers]

    def reserve(self, left: int, right: int) -> None:
        """At least `left` columns before the window and `right` after it: the window is copied
        into a larger buffer, with `room` more columns after it, when they are not there."""
        if self.start >= left and self.end + right <= self.mask.shape[1]:
            return
        start, width = self.start, self.end - self.start

        def moved(old: torch.Tensor) -> torch.Tensor:
            dim = 1 if old.dim() == 2 else 2  # the mask [slots, C]; keys, values [slots, h, C, d]
            shape = list(old.shape)
            shape[dim] = left + width + right + self.room
            new = old.new_zeros(shape)
            new.narrow(dim, left, width).copy_(old.narrow(dim, start, width))
            return new

        self._replace_buffers(moved)
        self.start, self.end = left, left + width

    def write(self, slots: list[int], batch: "Prefilled") -> None:
        """`batch`'s rows right-aligned into `slots`, the window widened to hold them."""
        width = batch.attention.shape[1]
        self.reserve(max(0, width - (self.end - self.start)), 1)
        first, index = self.end - width, torch.tensor(slots)
        for layer, kv in zip(self.layers, _cache_layers(batch.cache)):
            for buffer, new in zip(layer.buffers, kv):
                buffer[index, :, first:self.end] = new
        self.mask[index] = 0
        self.mask[index, first:self.end] = batch.attention
        self.start = min(self.start, first)

    def keep(self, slots: list[int]) -> None:
        index = torch.tensor(slots, dtype=torch.long)
        self._replace_buffers(lambda buffer: buffer[index])

    def slide(self) -> None:
        """Move the start past the columns no row attends to."""
        used = self.mask[:, self.start:self.end].any(0).nonzero()
        self.start += int(used[0]) if used.numel() else self.end - self.start


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


class _Pool:
    """The rows decoding together: prompt index per slot, position ids `[slots, 1]`, the cache."""

    def __init__(self, batch: Prefilled, slots: int, room: int):
        self.cache = SlotCache(batch.cache, slots, room)
        self.rows = [-1] * slots
        self.positions = torch.zeros((slots, 1), dtype=torch.long)

    def join(self, slots: list[int], batch: Prefilled) -> None:
        self.cache.write(slots, batch)
        self.positions[slots] = batch.positions[:, -1:]
        for slot, i in zip(slots, batch.live):
            self.rows[slot] = i

    def keep(self, slots: list[int]) -> None:
        self.cache.keep(slots)
        self.rows, self.positions = [self.rows[s] for s in slots], self.positions[slots]

    def step(self, model, tokens: list[int]) -> torch.Tensor:
        """Feed each row its last token: the next logits `[rows, V]`."""
        cache = self.cache
        cache.slide()
        cache.reserve(0, 1)
        cache.mask[:, cache.end] = 1
        self.positions = self.positions + 1
        logits = model(input_ids=torch.tensor(tokens)[:, None],
                       attention_mask=cache.mask[:, None, None, cache.start:cache.end + 1].bool(),
                       position_ids=self.positions, past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]
        cache.end += 1
        return logits


def decode_pool(model, order: Sequence[int], out: list[list[int]], *,
                admit: Callable[[list[int]], Prefilled], batch_size: int, join_rows: int,
                finished: Callable[[list[int]], bool], room: int = 64) -> None:
    """Greedy tokens into `out[i]` for every prompt index in `order` until `finished(out[i])`.

    `admit(indices)` prefills a group of prompts (its cache cropped to the prompts); up to
    `batch_size` rows decode together and a finished row's slot takes the next prompt at once,
    in groups of at most `join_rows`. `room`: columns added after the window each time the KV
    buffer grows (a copy of the window every `room` steps)."""
    queue, pool, free = list(order), None, list(range(batch_size))

    def take(slots: list[int], rows: list[int], logits: torch.Tensor) -> None:
        for slot, i, token in zip(slots, rows, logits.argmax(-1).tolist()):
            out[i].append(token)
            if finished(out[i]):
                free.append(slot)

    while True:
        while free and queue:
            size = min(len(free), join_rows)
            group, queue = queue[:size], queue[size:]
            batch = admit(group)
            pool = pool or _Pool(batch, batch_size, room)
            slots, free[:] = free[:len(group)], free[len(group):]
            pool.join(slots, batch)
            take(slots, group, batch.logits)
        if free:  # no prompt left for these slots
            live = [s for s in range(len(pool.rows)) if s not in free]
            if not live:
                return
            pool.keep(live)
            free.clear()
        take(range(len(pool.rows)), pool.rows,
             pool.step(model, [out[i][-1] for i in pool.rows]))
