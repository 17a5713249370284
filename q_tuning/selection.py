"""Stage 1 of Q-Tuning: place samples on the Error-Uncertainty plane and choose the kept set.

Public API:
    sample_ppl_entropy(nll_sum, entropy_sum, num_tokens) -> (ppl, entropy)
    sample_ppl_entropy_from_tokens(token_nll, token_entropy, loss_mask) -> (ppl, entropy)
    select_samples(ppl, entropy, keep_ratio, bisect_max_iter=10, *, step=None, rule="exact")
        -> SampleSelection
    SELECTION_RULES
    SampleSelection
    keep_count(ratio, total)

Pure tensor functions, no communication: every data-parallel rank calls `select_samples` on the
same gathered global batch and gets the same decision, because it depends only on its inputs.

Rank space (SPEC section 3). With `n` placed samples and quantiles interpolated linearly between
order statistics, a group of tied values occupying sorted positions `[lo, hi]` (0-based) satisfies
`x >= Q_{1-a}` iff `(1-a)(n-1) <= hi`, and `x <= Q_a` iff `a(n-1) >= lo`. So every corner test is
a comparison of `a(n-1)` with an integer, and the whole decision is made exactly, in integers:
    Q2 entry = max(n-1 - hi_ppl, lo_ent)      (in units of 1/(n-1) on the level `a`)
    Q4 entry = max(lo_ppl, n-1 - hi_ent)
A sample is in `Q2(a) ∪ Q4(a)` iff `min(Q2 entry, Q4 entry) <= a(n-1)`. Only ranks matter, so the
decision is unchanged by any strictly increasing transform of either axis (e.g. PPL -> log PPL).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from q_tuning.config import SELECTION_RULES

__all__ = ["SELECTION_RULES", "SampleSelection", "keep_count", "sample_ppl_entropy", "sample_ppl_entropy_from_tokens",
           "select_samples"]

# exp(x) is finite in float64 for every x <= this; clamp only above it (SPEC section 1).
LOG_FLOAT64_MAX = math.log(torch.finfo(torch.float64).max)

_INT64_MAX = torch.iinfo(torch.int64).max

QUADRANT_NAMES = {1: "Q1", 2: "Q2", 3: "Q3", 4: "Q4"}

# SELECTION_RULES: "exact", SPEC section 3, exactly k from the corners (the level may pass 0.5);
# "paper", SPEC section 7, the official code's corners below level 0.49, then the off-diagonal fill.
# The paper rule's level cap 0.49 as the integer comparison 100 * entry <= 49 * (n - 1).
PAPER_LEVEL_CAP = (49, 100)


def keep_count(ratio: float, total: int | Tensor) -> int | Tensor:
    """`max(1, floor(ratio * total + 0.5))`, at most `total`: the kept count of SPEC 3 and 4.

    `total` is an int or an int64 tensor (elementwise); a total of 0 gives 0.
    """
    if isinstance(total, Tensor):
        rounded = torch.floor(ratio * total.to(torch.float64) + 0.5).to(torch.int64)
        return torch.minimum(rounded.clamp(min=1), total.to(torch.int64))
    return min(total, max(1, math.floor(ratio * total + 0.5)))


def sample_ppl_entropy(nll_sum: Tensor, entropy_sum: Tensor, num_tokens: Tensor, *,
                       entropy_tokens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-sample PPL and mean entropy (float64) from sums over the sample's loss-mask tokens
    (the entropy sum over `entropy_tokens` positions when given: --q-tuning-entropy-scope).

    Takes sums so that context-parallel ranks can add their partial sums first. A sample with no
    tokens, or whose mean NLL is not finite, gets NaN PPL: `select_samples` cannot place it. The
    mean NLL is clamped only where `exp` would overflow float64, so huge but finite errors still
    rank highest.
    """
    count = torch.as_tensor(num_tokens, device=nll_sum.device).to(torch.float64)
    has_tokens = count > 0
    divisor = torch.where(has_tokens, count, torch.ones_like(count))
    mean_nll = nll_sum.to(torch.float64) / divisor
    if entropy_tokens is None:
        mean_entropy = entropy_sum.to(torch.float64) / divisor
    else:
        entropy_count = torch.as_tensor(entropy_tokens, device=nll_sum.device).to(torch.float64)
        mean_entropy = entropy_sum.to(torch.float64) / entropy_count.clamp(min=1)
    nan = torch.full_like(mean_nll, float("nan"))
    ppl = torch.exp(mean_nll.clamp(max=LOG_FLOAT64_MAX))
    ppl = torch.where(has_tokens & torch.isfinite(mean_nll), ppl, nan)
    entropy = torch.where(has_tokens, mean_entropy, nan)
    return ppl, entropy


def sample_ppl_entropy_from_tokens(token_nll: Tensor, token_entropy: Tensor, loss_mask: Tensor,
                                   *, entropy_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`sample_ppl_entropy` for padded `[N, T]` per-token statistics; rows are samples.

    Positions outside the loss mask (the entropy over `entropy_mask` when given) are ignored even
    when they hold NaN or garbage.
    """
    mask = loss_mask.bool()
    ent_mask = mask if entropy_mask is None else entropy_mask.bool()
    zero = torch.zeros((), dtype=torch.float64, device=token_nll.device)
    nll_sum = torch.where(mask, token_nll.to(torch.float64), zero).sum(dim=-1)
    entropy_sum = torch.where(ent_mask, token_entropy.to(torch.float64), zero).sum(dim=-1)
    return sample_ppl_entropy(nll_sum, entropy_sum, mask.sum(dim=-1),
                              entropy_tokens=None if entropy_mask is None else ent_mask.sum(-1))


@dataclasses.dataclass(frozen=True)
class SampleSelection:
    """The stage-1 decision for one global batch, plus what the step's report needs.

    Per-sample tensors have shape [N] (all samples, placed or not) on the inputs' device.
    """

    keep: Tensor  # bool: trained on this step
    quadrant: Tensor  # int64: 1..4 = Q1..Q4 for placed samples, 0 for unplaceable ones
    placed: Tensor  # bool: finite PPL and entropy
    entry_level: Tensor  # float64: level a at which the sample enters Q2 ∪ Q4; NaN if unplaced
    level: float  # a*, the bisection result
    thresholds: tuple[float, float, float, float]  # (ppl_low, ppl_high, ent_low, ent_high) at a*
    target_count: int  # k, the number kept
    num_placed: int
    num_unplaceable: int
    num_empty: int | None  # unplaceable for having no loss tokens; None if num_tokens not given
    keep_ratio: float

    def quadrant_counts(self) -> dict[str, int]:
        """{"Q1": n1, "Q2": n2, "Q3": n3, "Q4": n4}, summing to `num_placed`."""
        counts = torch.bincount(self.quadrant.cpu(), minlength=5).tolist()
        return {name: counts[q] for q, name in QUADRANT_NAMES.items()}


def select_samples(ppl: Tensor, entropy: Tensor, keep_ratio: float, bisect_max_iter: int = 10,
                   *, step: int | None = None, num_tokens: Tensor | None = None,
                   rule: str = "exact") -> SampleSelection:
    """Keep exactly `k = keep_count(keep_ratio, n)` of the `n` placed samples (SPEC section 3).

    Samples with non-finite PPL or entropy are unplaceable: dropped and counted (give
    `num_tokens` to tell empty samples apart in the counts). The kept set is the `k` samples
    entering `Q2 ∪ Q4` at the lowest level, ordered by the key
        (entry level, depth, sample index),
    where depth, the tie-break "more extreme corner first", is the sum of the two per-axis
    requirements of the corner the sample enters through: `(n-1 - hi_ppl) + lo_ent` for Q2,
    `lo_ppl + (n-1 - hi_ent)` for Q4 (module docstring); smaller is deeper in the corner. A
    sample enters through Q2 when its Q2 entry <= its Q4 entry. `level` is the bisection's `a*`
    (the smallest level, to `2**-bisect_max_iter`, whose corners hold `k` samples), and every
    kept sample lies in the corners at `a*`.

    `rule="paper"` (SPEC section 7) takes samples in the same order only while their entry level
    is <= 0.49, then fills up to `k` by the off-diagonal score `|ppl_n - ent_n|` (min-max
    normalised axes), largest first, lower index on ties; a fill sample is Q2 when
    `ppl_n >= ent_n`, else Q4, and `level` is then the bisection level of the corner samples.

    Raises ValueError, naming `step`, when no sample can be placed.
    """
    _check_selection_args(ppl, entropy, keep_ratio, bisect_max_iter)
    if rule not in SELECTION_RULES:
        raise ValueError(f"selection rule must be one of {SELECTION_RULES}, got {rule!r}")
    total = ppl.numel()
    ppl, entropy = ppl.to(torch.float64), entropy.to(torch.float64)
    placed = torch.isfinite(ppl) & torch.isfinite(entropy)
    placed_index = placed.nonzero().squeeze(1)
    n = placed_index.numel()
    num_empty = None if num_tokens is None else int((torch.as_tensor(num_tokens) <= 0).sum())
    if n == 0:
        raise ValueError(_unplaceable_message(step, total, num_empty))

    ppl, entropy = ppl.index_select(0, placed_index), entropy.index_select(0, placed_index)
    plane = _RankPlane.build(ppl, entropy)
    k = keep_count(keep_ratio, n)
    order_key = plane.entry * (2 * n - 1) + plane.depth  # by (entry, depth), then index
    via_q2 = plane.via_q2
    if rule == "exact":
        kept = _lowest_k(order_key, k)
        corner = kept
    else:
        corner = _lowest_k(order_key, k) & (PAPER_LEVEL_CAP[1] * plane.entry
                                            <= PAPER_LEVEL_CAP[0] * (n - 1))
        kept, fill_via_q2 = _off_diagonal_fill(ppl, entropy, corner, k)
        via_q2 = torch.where(corner, via_q2, fill_via_q2)
    # host sync: scalar bisection over the corner samples (-1: none, level 0)
    kth_entry = int(torch.where(corner, plane.entry, -1).max())
    level = _bisect_level(kth_entry, n - 1, bisect_max_iter)
    quadrant = torch.where(kept, torch.where(via_q2, 2, 4),
                           torch.where(plane.high_high, 1, 3))
    return SampleSelection(
        keep=_scatter(kept, placed_index, total, False),
        quadrant=_scatter(quadrant.to(torch.int64), placed_index, total, 0),
        placed=placed,
        entry_level=_scatter(plane.entry / max(n - 1, 1), placed_index, total, float("nan")),
        level=level,
        thresholds=(_quantile(ppl, plane.ppl_order, level),
                    _quantile(ppl, plane.ppl_order, 1 - level),
                    _quantile(entropy, plane.ent_order, level),
                    _quantile(entropy, plane.ent_order, 1 - level)),
        target_count=k,
        num_placed=n,
        num_unplaceable=total - n,
        num_empty=num_empty,
        keep_ratio=float(keep_ratio),
    )


@dataclasses.dataclass(frozen=True)
class _RankPlane:
    """The placed samples in rank space (module docstring); integer levels in units of 1/(n-1)."""

    entry: Tensor  # int64: level at which the sample enters Q2 ∪ Q4
    depth: Tensor  # int64 in [0, 2(n-1)]: requirement sum of the entry corner (tie-break)
    via_q2: Tensor  # bool: enters through Q2 (Q2 entry <= Q4 entry)
    high_high: Tensor  # bool: u + v >= 1 with normalized mid-ranks u, v
    ppl_order: Tensor  # permutation sorting PPL
    ent_order: Tensor  # permutation sorting entropy

    @classmethod
    def build(cls, ppl: Tensor, entropy: Tensor) -> "_RankPlane":
        ppl_lo, ppl_hi, ppl_order = _tie_ranks(ppl)
        ent_lo, ent_hi, ent_order = _tie_ranks(entropy)
        top = ppl.numel() - 1
        q2_entry = torch.maximum(top - ppl_hi, ent_lo)
        q4_entry = torch.maximum(ppl_lo, top - ent_hi)
        via_q2 = q2_entry <= q4_entry
        return cls(
            entry=torch.where(via_q2, q2_entry, q4_entry),
            depth=torch.where(via_q2, top - ppl_hi + ent_lo, ppl_lo + top - ent_hi),
            via_q2=via_q2,
            high_high=ppl_lo + ppl_hi + ent_lo + ent_hi >= 2 * top,
            ppl_order=ppl_order,
            ent_order=ent_order,
        )


def _off_diagonal_fill(ppl: Tensor, entropy: Tensor, corner: Tensor,
                       k: int) -> tuple[Tensor, Tensor]:
    """(kept, via_q2): `corner` plus the `k - |corner|` other samples of largest `|ppl_n - ent_n|`
    (ties: lower index), and whether each would be labelled Q2 (`ppl_n >= ent_n`)."""
    ppl_n, ent_n = _min_max_normalised(ppl), _min_max_normalised(entropy)
    room = k - int(corner.sum())  # host sync, once per step
    if room <= 0:
        return corner, ppl_n >= ent_n
    gap = (ppl_n - ent_n).abs()
    # Largest gap first, lower index on ties: smallest key of (-gap) via the ordered int64 key.
    key = torch.where(corner, _INT64_MAX, float64_order_key(-gap))
    return corner | _lowest_k(key, room), ppl_n >= ent_n


def _min_max_normalised(values: Tensor) -> Tensor:
    """(x - min) / (max - min); a constant axis normalises to 0."""
    low, high = values.min(), values.max()
    span = high - low
    return torch.where(span > 0, (values - low) / torch.where(span > 0, span, 1.0),
                       torch.zeros_like(values))


def _check_selection_args(ppl: Tensor, entropy: Tensor, keep_ratio: float,
                          bisect_max_iter: int) -> None:
    if not (isinstance(ppl, Tensor) and isinstance(entropy, Tensor)):
        raise ValueError(f"ppl and entropy must be tensors, got {type(ppl).__name__} and "
                         f"{type(entropy).__name__}")
    if ppl.dim() != 1 or ppl.shape != entropy.shape:
        raise ValueError("ppl and entropy must be 1-D tensors of the same shape [N], got "
                         f"{tuple(ppl.shape)} and {tuple(entropy.shape)}")
    if isinstance(keep_ratio, bool) or not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    if isinstance(bisect_max_iter, bool) or not isinstance(bisect_max_iter, int) \
            or bisect_max_iter < 1:
        raise ValueError(f"bisect_max_iter must be an integer >= 1, got {bisect_max_iter!r}")


def _unplaceable_message(step: int | None, total: int, num_empty: int | None) -> str:
    where = "Q-Tuning" if step is None else f"Q-Tuning step {step}"
    if num_empty is None:
        detail = f"{total} samples, none with finite PPL and entropy"
    else:
        detail = (f"{total} samples: {num_empty} with no loss tokens, "
                  f"{total - num_empty} with non-finite statistics")
    return f"{where}: no sample of the batch can be placed on the EU plane ({detail})"


def run_bounds(sorted_keys: Tensor) -> tuple[Tensor, Tensor]:
    """First and last position of the run of equal keys that each position of `sorted_keys` is in.

    Linear after the sort (no searchsorted): run lengths, their starts, expanded back per position.
    """
    _, run_length = torch.unique_consecutive(sorted_keys, return_counts=True)
    run_start = torch.cumsum(run_length, dim=0) - run_length
    first = torch.repeat_interleave(run_start, run_length)
    last = first + torch.repeat_interleave(run_length, run_length) - 1
    return first, last


def float64_order_key(values: Tensor) -> Tensor:
    """int64 key with the order (and the equalities) of float64 `values`; NaN sorts last.

    Sorting int64 keys is several times faster on CPU than sorting floats (radix sort). The IEEE
    bit pattern is already ordered for non-negative floats; negative ones get their magnitude
    bits flipped. -0.0 becomes +0.0 first, so that the two stay equal.
    """
    bits = (values.to(torch.float64) + 0.0).view(torch.int64)
    key = torch.where(bits < 0, bits ^ _INT64_MAX, bits)
    return torch.where(torch.isnan(values), _INT64_MAX, key)


def _tie_ranks(values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(lo, hi, order): the sorted positions [lo, hi] of each value's group of ties, and the
    permutation that sorts `values`."""
    sorted_keys, order = torch.sort(float64_order_key(values))
    first, last = run_bounds(sorted_keys)
    lo = torch.empty_like(first).scatter_(0, order, first)
    hi = torch.empty_like(last).scatter_(0, order, last)
    return lo, hi, order


def _lowest_k(key: Tensor, k: int) -> Tensor:
    """Bool mask of the k smallest keys; equal keys go to the lower index first. O(n), no sort."""
    kth = torch.kthvalue(key, k).values
    below = key < kth
    at_kth = key == kth
    room = k - below.sum()
    return below | (at_kth & (torch.cumsum(at_kth, dim=0) <= room))


def _bisect_level(kth_entry: int, top: int, max_iter: int) -> float:
    """Bisection on a in [0, 1] for the smallest a with |Q2(a) ∪ Q4(a)| >= k.

    The corners hold >= k samples iff the k-th smallest entry is <= a(n-1). The level is kept as
    the fraction `numerator / 2**max_iter` so every comparison is exact integer arithmetic. a = 0
    is tried first; then the level is raised while too few samples are kept.
    """
    scale = 1 << max_iter
    if kth_entry == 0:
        return 0.0
    low, high = 0, scale
    for _ in range(max_iter):
        mid = (low + high) // 2
        if mid * top >= kth_entry * scale:
            high = mid
        else:
            low = mid
    return high / scale


def _quantile(values: Tensor, order: Tensor, level: float) -> float:
    """`numpy.quantile(values, level)` (linear method, same float arithmetic); `order` sorts
    `values`."""
    n = values.numel()
    position = (n - 1) * level
    below = min(math.floor(position), n - 1)
    above = min(below + 1, n - 1)
    t = position - below
    low, high = float(values[order[below]]), float(values[order[above]])
    diff = high - low
    return high - diff * (1 - t) if t >= 0.5 else low + diff * t


def _scatter(values: Tensor, index: Tensor, size: int, fill: float | bool | int) -> Tensor:
    out = torch.full((size,), fill, dtype=values.dtype, device=values.device)
    return out.index_copy_(0, index, values)
