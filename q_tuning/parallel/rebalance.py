"""Redistribute the kept samples over data-parallel ranks.

After selection the kept samples sit unevenly on the ranks that scored them. Training needs the same
number of micro-batches on every DP rank (megatron-core's gradient reduction would otherwise hang or
mis-weight), and near-equal tokens so no rank idles while another works a full batch.
"""

from __future__ import annotations

import heapq
from typing import Sequence

import torch

from q_tuning.parallel import comm


def assign_to_ranks(lengths: Sequence[int], num_ranks: int) -> list[list[int]]:
    """Deterministic assignment of samples (by global index) to ranks.

    Counts differ by at most one between ranks; within that, longest-first greedy onto the rank
    with the fewest tokens so far (ties: lower rank, then lower sample index). Each rank's list is
    returned in ascending sample order, which keeps the data order within a rank.
    """
    n = len(lengths)
    capacity = [n // num_ranks + (1 if r < n % num_ranks else 0) for r in range(num_ranks)]
    heap = [(0, r) for r in range(num_ranks)]
    assigned: list[list[int]] = [[] for _ in range(num_ranks)]
    for i in sorted(range(n), key=lambda j: (-lengths[j], j)):
        tokens, r = heapq.heappop(heap)
        while len(assigned[r]) >= capacity[r]:  # full ranks leave the heap for good
            tokens, r = heapq.heappop(heap)
        assigned[r].append(i)
        heapq.heappush(heap, (tokens + lengths[i], r))
    return [sorted(a) for a in assigned]


def gather_kept(local_kept: dict[int, dict], dp_group) -> dict[int, dict]:
    """Every rank's kept samples (global index -> fields), on every rank of the DP group.

    Samples are small next to activations (token ids and masks), so one object all-gather is
    simpler than point-to-point moves and costs little.
    """
    everything: dict[int, dict] = {}
    for part in comm.all_gather_objects(local_kept, dp_group):
        everything.update(part)
    return everything


def filler_sample(sample: dict) -> dict:
    """A copy of `sample` that trains on nothing: keeps micro-batch counts equal when a rank would
    otherwise get no sample at all (fewer kept samples than DP ranks)."""
    out = dict(sample)
    out["loss_masks"] = torch.zeros_like(sample["loss_masks"])
    return out
