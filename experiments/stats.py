"""Statistics shared by the grids' tables.

    paired_bootstrap(diffs) -> PairedInterval   mean of per-item paired differences and its
                                                percentile bootstrap 95% interval
"""

from __future__ import annotations

import random
import statistics
from typing import NamedTuple, Sequence

__all__ = ["BOOTSTRAP_DRAWS", "PairedInterval", "paired_bootstrap"]

BOOTSTRAP_DRAWS = 2000


class PairedInterval(NamedTuple):
    mean: float
    low: float
    high: float
    seeds: int


def paired_bootstrap(diffs: Sequence[Sequence[float]], draws: int = BOOTSTRAP_DRAWS,
                     seed: int = 0) -> PairedInterval:
    """`diffs[s][i]`: the difference A - B on item i in seed s (both runs of seed s). The mean
    over all items and seeds, and the 2.5% and 97.5% percentiles of `draws` bootstrap means:
    seeds resampled, then items within each resampled seed, from a fixed generator (the same
    numbers on every call)."""
    mean = statistics.fmean(d for per_seed in diffs for d in per_seed)
    rng = random.Random(seed)
    means = []
    for _ in range(draws):
        total, count = 0.0, 0
        for _ in diffs:
            per_seed = diffs[rng.randrange(len(diffs))]
            total += sum(per_seed[rng.randrange(len(per_seed))] for _ in per_seed)
            count += len(per_seed)
        means.append(total / count)
    means.sort()
    return PairedInterval(mean, means[int(0.025 * len(means))],
                          means[int(0.975 * len(means)) - 1], len(diffs))
