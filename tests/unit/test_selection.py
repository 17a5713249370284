"""select_samples and the per-sample statistics against SPEC sections 2 and 3, read literally.

The references below are plain Python: corner sets from `numpy.quantile` thresholds, the
bisection as the SPEC words it, and the final ranking with exact fractions of rank positions.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from q_tuning.selection import (
    LOG_FLOAT64_MAX,
    SampleSelection,
    keep_count,
    sample_ppl_entropy,
    sample_ppl_entropy_from_tokens,
    select_samples,
)

# ----------------------------------------------------------------------------- references


def ref_corner_members(ppl: list[float], ent: list[float], a: float) -> list[bool]:
    """Q2(a) ∪ Q4(a) membership from numpy.quantile thresholds (SPEC 3, literally)."""
    ppl_low, ppl_high = np.quantile(ppl, a), np.quantile(ppl, 1 - a)
    ent_low, ent_high = np.quantile(ent, a), np.quantile(ent, 1 - a)
    return [(p >= ppl_high and e <= ent_low) or (p <= ppl_low and e >= ent_high)
            for p, e in zip(ppl, ent)]


def ref_bisect(ppl: list[float], ent: list[float], k: int, max_iter: int) -> float:
    """Smallest a (to 2**-max_iter) whose corners hold >= k samples; raise a when too few."""
    def enough(a: float) -> bool:
        return sum(ref_corner_members(ppl, ent, a)) >= k

    if enough(0.0):
        return 0.0
    low, high = 0.0, 1.0
    for _ in range(max_iter):
        mid = (low + high) / 2
        if enough(mid):
            high = mid
        else:
            low = mid
    return high


def ref_ranks(values: list[float], x: float) -> tuple[int, int]:
    """Sorted positions [lo, hi] of the tie group of x."""
    return sum(v < x for v in values), sum(v <= x for v in values) - 1


def ref_candidates(P: list[float], E: list[float]) -> list[tuple]:
    """Per placed sample j: (entry level, depth, j, label if kept, label if dropped), SPEC 3 with
    exact fractions of rank positions."""
    n = len(P)
    top = max(n - 1, 1)  # n == 1: every rank fraction is 0
    candidates = []
    for j in range(n):
        p_lo, p_hi = ref_ranks(P, P[j])
        e_lo, e_hi = ref_ranks(E, E[j])
        q2 = (1 - Fraction(p_hi, top), Fraction(e_lo, top)) if n > 1 else (Fraction(0),) * 2
        q4 = (Fraction(p_lo, top), 1 - Fraction(e_hi, top)) if n > 1 else (Fraction(0),) * 2
        corner = q2 if max(q2) <= max(q4) else q4
        label = 2 if corner is q2 else 4
        dropped_label = 1 if Fraction(p_lo + p_hi + e_lo + e_hi, 2 * top) >= 1 else 3
        candidates.append((max(corner), sum(corner), j, label, dropped_label))
    return candidates


def ref_select(ppl: list[float], ent: list[float], ratio: float, max_iter: int) -> dict:
    """SPEC 3 in plain Python: keep, labels (0 = unplaced), level, k."""
    placed = [i for i in range(len(ppl)) if math.isfinite(ppl[i]) and math.isfinite(ent[i])]
    P, E = [ppl[i] for i in placed], [ent[i] for i in placed]
    n = len(P)
    k = min(n, max(1, math.floor(ratio * n + 0.5)))
    candidates = ref_candidates(P, E)
    kept = sorted(candidates)[:k]
    kept_j = {c[2] for c in kept}
    labels = [0] * len(ppl)
    keep = [False] * len(ppl)
    for entry, depth, j, label, dropped_label in candidates:
        keep[placed[j]] = j in kept_j
        labels[placed[j]] = label if j in kept_j else dropped_label
    return {"keep": keep, "labels": labels, "k": k,
            "level": ref_bisect(P, E, k, max_iter) if n else None}


# ----------------------------------------------------------------------------- strategies

UNPLACEABLE = [float("nan"), float("inf"), float("-inf")]


@st.composite
def batches(draw, max_n: int = 24, with_unplaceable: bool = True):
    """(ppl, ent) lists on an integer lattice (many ties), some samples unplaceable."""
    n = draw(st.integers(1, max_n))
    levels = draw(st.integers(0, 8))
    ppl = [float(draw(st.integers(0, levels))) + 1.0 for _ in range(n)]
    ent = [float(draw(st.integers(0, levels))) for _ in range(n)]
    if with_unplaceable:
        for i in draw(st.lists(st.integers(0, n - 1), max_size=n // 3)):
            target = ppl if draw(st.booleans()) else ent
            target[i] = draw(st.sampled_from(UNPLACEABLE))
    return ppl, ent


ratios = st.one_of(st.floats(0.001, 1.0), st.sampled_from([1e-9, 0.125, 0.25, 0.5, 1.0]))


def run(ppl: list[float], ent: list[float], ratio: float, max_iter: int = 10) -> SampleSelection:
    return select_samples(torch.tensor(ppl, dtype=torch.float64),
                          torch.tensor(ent, dtype=torch.float64), ratio, max_iter)


def placed_lists(ppl: list[float], ent: list[float]) -> tuple[list[float], list[float]]:
    pairs = [(p, e) for p, e in zip(ppl, ent) if math.isfinite(p) and math.isfinite(e)]
    return [p for p, _ in pairs], [e for _, e in pairs]


# ----------------------------------------------------------------------------- selection


@settings(max_examples=300, deadline=None)
@given(batches(), ratios, st.integers(1, 12))
def test_matches_reference(batch, ratio, max_iter):
    ppl, ent = batch
    if not placed_lists(ppl, ent)[0]:
        return  # covered by test_all_unplaceable_names_the_step
    result = run(ppl, ent, ratio, max_iter)
    ref = ref_select(ppl, ent, ratio, max_iter)
    assert result.keep.tolist() == ref["keep"]
    assert result.quadrant.tolist() == ref["labels"]
    assert result.target_count == ref["k"]
    assert result.level == ref["level"]
    P, E = placed_lists(ppl, ent)
    expected = (np.quantile(P, result.level), np.quantile(P, 1 - result.level),
                np.quantile(E, result.level), np.quantile(E, 1 - result.level))
    assert result.thresholds == pytest.approx(expected, rel=1e-15, abs=0)


@settings(max_examples=200, deadline=None)
@given(batches(with_unplaceable=False), ratios, st.integers(1, 12))
def test_properties(batch, ratio, max_iter):
    ppl, ent = batch
    result = run(ppl, ent, ratio, max_iter)
    n = len(ppl)
    keep = result.keep.tolist()
    assert sum(keep) == result.target_count == keep_count(ratio, n)
    assert_dominance(ppl, ent, keep, result.quadrant.tolist())
    counts = result.quadrant_counts()
    assert sum(counts.values()) == n == result.num_placed
    assert counts["Q2"] + counts["Q4"] == result.target_count
    # Every kept sample lies in the corners at a*, and a* is minimal to the bisection's resolution.
    members = ref_corner_members(ppl, ent, result.level)
    assert all(members[i] for i in range(n) if keep[i])
    if result.level > 0:
        below = result.level - 2.0 ** -max_iter
        assert sum(ref_corner_members(ppl, ent, below)) < result.target_count


def assert_dominance(ppl, ent, keep, labels):
    for i in range(len(ppl)):
        if not keep[i]:
            continue
        for j in range(len(ppl)):
            if labels[i] == 2 and ppl[j] > ppl[i] and ent[j] < ent[i]:
                assert keep[j], (i, j)
            if labels[i] == 4 and ppl[j] < ppl[i] and ent[j] > ent[i]:
                assert keep[j], (i, j)


@settings(max_examples=100, deadline=None)
@given(batches(with_unplaceable=False))
def test_entry_level_agrees_with_quantile_corners(batch):
    """Membership from numpy.quantile thresholds at any level a equals `entry_level <= a`."""
    ppl, ent = batch
    entry = run(ppl, ent, 0.5).entry_level.numpy()
    levels = np.arange(257) / 256
    P, E = np.array(ppl)[None, :], np.array(ent)[None, :]  # [1, n] against [levels, 1]
    ppl_low, ppl_high = np.quantile(ppl, levels)[:, None], np.quantile(ppl, 1 - levels)[:, None]
    ent_low, ent_high = np.quantile(ent, levels)[:, None], np.quantile(ent, 1 - levels)[:, None]
    members = ((P >= ppl_high) & (E <= ent_low)) | ((P <= ppl_low) & (E >= ent_high))
    np.testing.assert_array_equal(members, entry[None, :] <= levels[:, None])


@settings(max_examples=100, deadline=None)
@given(batches(), ratios, st.integers(1, 12))
def test_invariant_under_log_ppl(batch, ratio, max_iter):
    ppl, ent = batch
    if not placed_lists(ppl, ent)[0]:
        return
    plain = run(ppl, ent, ratio, max_iter)
    logged = select_samples(torch.tensor(ppl, dtype=torch.float64).log(),
                            torch.tensor(ent, dtype=torch.float64), ratio, max_iter)
    assert torch.equal(plain.keep, logged.keep)
    assert torch.equal(plain.quadrant, logged.quadrant)
    assert plain.level == logged.level


def test_large_random_batch_properties():
    rng = np.random.default_rng(0)
    n = 3000
    ppl = np.exp(rng.normal(1.0, 0.5, n))
    ent = rng.gamma(2.0, 1.0, n) + 0.2 * np.log(ppl)  # correlated axes, as in real data
    result = select_samples(torch.from_numpy(ppl), torch.from_numpy(ent), 0.25)
    keep, labels = result.keep.numpy(), result.quadrant.numpy()
    assert keep.sum() == 750
    # [i, j]: sample j is strictly beyond kept sample i towards i's corner.
    beyond_q2 = (ppl[None, :] > ppl[:, None]) & (ent[None, :] < ent[:, None])
    beyond_q4 = (ppl[None, :] < ppl[:, None]) & (ent[None, :] > ent[:, None])
    assert keep[beyond_q2[keep & (labels == 2)].any(axis=0)].all()
    assert keep[beyond_q4[keep & (labels == 4)].any(axis=0)].all()
    members = ref_corner_members(list(ppl), list(ent), result.level)
    assert all(np.asarray(members)[keep])
    assert sum(ref_corner_members(list(ppl), list(ent), result.level - 2.0 ** -10)) < 750


@pytest.mark.parametrize("seed", range(5))
def test_thresholds_equal_numpy_quantile(seed):
    rng = np.random.default_rng(seed)
    ppl, ent = np.exp(rng.normal(size=501 + seed)), rng.random(501 + seed) * 3
    for ratio in (0.05, 0.3, 0.7):
        result = select_samples(torch.from_numpy(ppl), torch.from_numpy(ent), ratio, 14)
        a = result.level
        assert result.thresholds == (np.quantile(ppl, a), np.quantile(ppl, 1 - a),
                                     np.quantile(ent, a), np.quantile(ent, 1 - a))


def test_deterministic_and_dtype_independent():
    rng = np.random.default_rng(1)
    ppl = torch.from_numpy(rng.integers(1, 50, 500).astype(np.float64))
    ent = torch.from_numpy(rng.integers(0, 50, 500).astype(np.float64))
    first = select_samples(ppl, ent, 0.3)
    again = select_samples(ppl.clone(), ent.clone(), 0.3)
    as_f32 = select_samples(ppl.float(), ent.float(), 0.3)
    for other in (again, as_f32):
        assert torch.equal(first.keep, other.keep)
        assert torch.equal(first.quadrant, other.quadrant)
        assert first.level == other.level and first.thresholds == other.thresholds


def test_single_sample_is_kept():
    result = run([3.0], [0.7], 0.1)
    assert result.keep.tolist() == [True]
    assert result.quadrant.tolist() == [2]
    assert result.level == 0.0
    assert result.thresholds == (3.0, 3.0, 0.7, 0.7)


def test_two_samples_tie_broken_by_index():
    # Sample 0 is the Q2 corner, sample 1 the Q4 corner: both enter at a = 0 at equal depth.
    result = run([2.0, 1.0], [0.0, 1.0], 0.5)
    assert result.keep.tolist() == [True, False]
    assert result.quadrant.tolist() == [2, 1]  # the dropped one: u + v = 0 + 1 >= 1
    assert run([1.0, 2.0], [1.0, 0.0], 0.5).keep.tolist() == [True, False]


def test_three_samples_deeper_corner_first():
    # Sample 2 is extreme on both axes (high PPL, low entropy); samples 0 and 1 enter later.
    result = run([1.0, 2.0, 3.0], [1.0, 2.0, 0.0], 1 / 3)
    assert result.keep.tolist() == [False, False, True]
    assert result.quadrant.tolist()[2] == 2


def test_depth_breaks_equal_entry_levels():
    # Sample 0 enters at 0; samples 1, 3, 4 at 1/4. Sample 1 (ranks 1, 3: depth 2/4) is shallower
    # than 3 (ranks 3, 0) and 4 (ranks 4, 1), both depth 1/4; the lower index wins between those.
    ppl = [1.0, 2.0, 3.0, 4.0, 5.0]
    ent = [4.0, 3.0, 2.0, 0.0, 1.0]
    result = run(ppl, ent, 0.4)  # k = 2
    assert result.entry_level.tolist() == [0.0, 0.25, 0.5, 0.25, 0.25]
    assert result.keep.tolist() == [True, False, False, True, False]


def test_all_equal_values():
    result = run([2.0] * 5, [1.0] * 5, 0.5)
    assert result.keep.tolist() == [True, True, True, False, False]
    assert result.quadrant.tolist() == [2, 2, 2, 1, 1]
    assert result.level == 0.0


def test_keep_ratio_one_and_tiny():
    rng = np.random.default_rng(2)
    ppl, ent = list(rng.random(37) + 1), list(rng.random(37))
    assert run(ppl, ent, 1.0).keep.all()
    assert run(ppl, ent, 1e-9).keep.sum() == 1
    assert run(ppl, ent, 1.0).level <= 1.0


def test_single_bisection_step():
    rng = np.random.default_rng(3)
    ppl, ent = list(rng.random(40) + 1), list(rng.random(40))
    for ratio in (0.05, 0.5, 0.9):
        result = run(ppl, ent, ratio, max_iter=1)
        assert result.level in (0.0, 0.5, 1.0)
        assert result.keep.sum() == keep_count(ratio, 40)
        assert result.level == ref_bisect(ppl, ent, keep_count(ratio, 40), 1)


def test_unplaceable_samples_are_dropped_and_counted():
    nan, inf = float("nan"), float("inf")
    ppl = torch.tensor([2.0, nan, 3.0, inf, 1.0, 5.0], dtype=torch.float64)
    ent = torch.tensor([1.0, 1.0, -inf, 1.0, 2.0, 0.5], dtype=torch.float64)
    result = select_samples(ppl, ent, 0.5, num_tokens=torch.tensor([4, 0, 3, 2, 5, 6]))
    assert result.placed.tolist() == [True, False, False, False, True, True]
    assert result.num_placed == 3 and result.num_unplaceable == 3 and result.num_empty == 1
    assert result.target_count == 2 and result.keep.sum() == 2
    assert not result.keep[~result.placed].any()
    assert (result.quadrant[~result.placed] == 0).all()
    assert result.entry_level[~result.placed].isnan().all()
    assert sum(result.quadrant_counts().values()) == 3


def test_all_unplaceable_names_the_step():
    ppl = torch.tensor([float("nan"), float("nan"), 2.0])
    ent = torch.tensor([float("nan"), float("nan"), float("inf")])
    with pytest.raises(ValueError, match=r"Q-Tuning step 12: no sample .* EU plane "
                                         r"\(3 samples: 2 with no loss tokens, 1 with non-finite"):
        select_samples(ppl, ent, 0.5, step=12, num_tokens=torch.tensor([0, 0, 4]))
    with pytest.raises(ValueError, match="Q-Tuning: no sample"):
        select_samples(ppl, ent, 0.5)
    with pytest.raises(ValueError, match=r"\(0 samples"):
        select_samples(torch.zeros(0), torch.zeros(0), 0.5, step=3)


@pytest.mark.parametrize("kwargs, message", [
    ({"keep_ratio": 0.0}, "keep_ratio"),
    ({"keep_ratio": 1.5}, "keep_ratio"),
    ({"bisect_max_iter": 0}, "bisect_max_iter"),
    ({"bisect_max_iter": 2.0}, "bisect_max_iter"),
    ({"entropy": torch.zeros(3)}, "same shape"),
    ({"ppl": torch.zeros(2, 2), "entropy": torch.zeros(2, 2)}, "1-D"),
])
def test_invalid_arguments(kwargs, message):
    args = {"ppl": torch.ones(4), "entropy": torch.ones(4), "keep_ratio": 0.5,
            "bisect_max_iter": 10} | kwargs
    with pytest.raises(ValueError, match=message):
        select_samples(**args)


# ----------------------------------------------------------------------------- statistics


def test_sample_ppl_entropy():
    nll_sum = torch.tensor([2.0, 0.0, 1e6, float("inf"), 3.0])
    ent_sum = torch.tensor([4.0, 1.0, 2.0, 1.0, float("nan")])
    ppl, ent = sample_ppl_entropy(nll_sum, ent_sum, torch.tensor([4, 0, 1000, 2, 3]))
    assert ppl.dtype == ent.dtype == torch.float64
    assert ppl[0].item() == pytest.approx(math.exp(0.5)) and ent[0].item() == 1.0
    assert ppl[1].isnan() and ent[1].isnan()  # no tokens: unplaceable
    assert ppl[2].item() == math.exp(LOG_FLOAT64_MAX)  # mean NLL 1000: clamped, finite, highest
    assert math.isfinite(ppl[2].item())
    assert ppl[3].isnan()  # non-finite NLL: unplaceable, not clamped into the plane
    assert ent[4].isnan()


def test_sample_ppl_entropy_from_tokens_matches_loops():
    rng = np.random.default_rng(4)
    nll = rng.gamma(1.0, 1.0, (5, 9))
    ent = rng.gamma(2.0, 1.0, (5, 9))
    mask = rng.random((5, 9)) < 0.5
    mask[2] = False
    nll[~mask] = np.nan  # garbage outside the mask must not leak in
    ppl, entropy = sample_ppl_entropy_from_tokens(torch.from_numpy(nll), torch.from_numpy(ent),
                                                  torch.from_numpy(mask).float())
    for row in range(5):
        tokens = [t for t in range(9) if mask[row, t]]
        if not tokens:
            assert ppl[row].isnan() and entropy[row].isnan()
            continue
        mean_nll = sum(nll[row, t] for t in tokens) / len(tokens)
        assert ppl[row].item() == pytest.approx(math.exp(mean_nll), rel=1e-12)
        assert entropy[row].item() == pytest.approx(sum(ent[row, t] for t in tokens) / len(tokens),
                                                    rel=1e-12)


def test_keep_count():
    assert keep_count(0.5, 5) == 3  # floor(2.5 + 0.5)
    assert keep_count(0.1, 3) == 1
    assert keep_count(1.0, 7) == 7
    assert keep_count(1e-9, 4) == 1
    assert keep_count(0.5, torch.tensor([0, 1, 5, 7])).tolist() == [0, 1, 3, 4]
