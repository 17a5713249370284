"""Rank functions for the tensor-parallel tests of token_nll_entropy (spawned, so module level)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from q_tuning.token_stats import token_nll_entropy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_case(seed: int, shape: tuple[int, ...], vocab: int, dtype: str, scale: float = 3.0):
    """The same full logits `[*shape, vocab]` and targets `shape` on every rank, from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=gen) * scale).to(DTYPES[dtype])
    targets = torch.randint(0, vocab, shape, generator=gen)
    return logits, targets


def shard(logits: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Megatron's vocabulary split: rank r holds the contiguous ids [r*V/size, (r+1)*V/size)."""
    v_local = logits.shape[-1] // size
    return logits[..., rank * v_local:(rank + 1) * v_local]


def sharded_stats(rank: int, world_size: int, cases: list[tuple],
                  subgroup_case: tuple | None = None) -> tuple[list, tuple | None]:
    """For each case `(seed, shape, vocab, dtype, scale, chunk_size)`: this rank's (nll, entropy)
    on its shard over the whole world, and whether its shard was left unchanged (bitwise). Then,
    if given, `subgroup_stats` of `subgroup_case` (one spawn serves both tests)."""
    out = []
    for seed, shape, vocab, dtype, scale, chunk_size in cases:
        logits, targets = make_case(seed, shape, vocab, dtype, scale)
        local = shard(logits, rank, world_size).clone()
        before = local.clone()
        nll, ent = token_nll_entropy(local, targets, dist.group.WORLD, chunk_size=chunk_size)
        out.append((nll, ent, torch.equal(local, before)))
    sub = subgroup_stats(rank, world_size, subgroup_case) if subgroup_case is not None else None
    return out, sub


def subgroup_stats(rank: int, world_size: int, case: tuple) -> tuple:
    """TP groups of 2 inside the world ({0, 1}, {2, 3}, ...): the shard index is the rank in the
    group, not the global rank. Each pair gets its own seed, so pairs compute different things."""
    groups = [dist.new_group([r, r + 1]) for r in range(0, world_size, 2)]  # every rank creates all
    group = groups[rank // 2]
    seed, shape, vocab, dtype, scale, chunk_size = case
    logits, targets = make_case(seed + rank // 2, shape, vocab, dtype, scale)
    local = shard(logits, dist.get_rank(group), 2)
    return token_nll_entropy(local, targets, group, chunk_size=chunk_size)
