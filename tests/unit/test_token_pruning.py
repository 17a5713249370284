"""token_keep_mask / segment_token_keep_mask against SPEC section 4, read literally."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from q_tuning.selection import LOG_FLOAT64_MAX
from q_tuning.token_pruning import segment_token_keep_mask, token_keep_mask

# ----------------------------------------------------------------------------- reference


def ref_keep_mask(nll: torch.Tensor, loss_mask: torch.Tensor, segment_ids: torch.Tensor,
                  ratio: float, lam: float) -> list[list[bool]]:
    """SPEC 4 with loops: per (row, segment), score the mask-1 positions, keep the lowest."""
    # exp from torch, elementwise, so that the reference and the code see bit-identical ppl_t.
    ppl = torch.exp(nll.to(torch.float64).clamp(max=LOG_FLOAT64_MAX)).tolist()
    mask, seg = loss_mask.bool().tolist(), segment_ids.tolist()
    rows, cols = len(mask), len(mask[0]) if mask else 0
    keep = [[False] * cols for _ in range(rows)]
    for r in range(rows):
        for s in sorted({x for x in seg[r] if x >= 0}):
            positions = [t for t in range(cols) if mask[r][t] and seg[r][t] == s]
            in_sample = set(positions)
            scored = []
            for t in positions:
                prev = ppl[r][t - 1] if t - 1 in in_sample else ppl[r][t]
                after = ppl[r][t + 1] if t + 1 in in_sample else ppl[r][t]
                # prev/2 + after/2 is (prev + after)/2 exactly (halving is exact), minus the
                # overflow of the sum when both are near float64's max.
                scored.append(((1 - lam) * ppl[r][t] + lam * (prev / 2 + after / 2), t))
            count = max(1, math.floor(ratio * len(positions) + 0.5)) if positions else 0
            for _, t in sorted(scored)[:count]:  # lowest scores; equal scores: earlier t
                keep[r][t] = True
    return keep


# ----------------------------------------------------------------------------- strategies


@st.composite
def packed_rows(draw):
    """(nll, loss_mask, segment_ids): rows of consecutive segments, trailing -1 padding."""
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 24))
    segment_ids = []
    for _ in range(rows):
        ids, current = [], draw(st.integers(0, 3))
        padding_from = draw(st.integers(0, cols))
        for t in range(cols):
            if t >= padding_from:
                ids.append(-1)
                continue
            if t and draw(st.integers(0, 4)) == 0:
                current += draw(st.integers(1, 2))
            ids.append(current)
        segment_ids.append(ids)
    mask = [[draw(st.booleans()) or draw(st.booleans()) for _ in range(cols)] for _ in range(rows)]
    values = st.one_of(st.integers(0, 3).map(float), st.floats(0.0, 12.0))
    nll = [[draw(values) for _ in range(cols)] for _ in range(rows)]
    return (torch.tensor(nll, dtype=torch.float32), torch.tensor(mask),
            torch.tensor(segment_ids, dtype=torch.int64))


ratios = st.one_of(st.floats(0.01, 1.0), st.sampled_from([1e-6, 0.3, 0.5, 0.7, 1.0]))
lambdas = st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 0.5, 1.0]))


# ----------------------------------------------------------------------------- tests


@settings(max_examples=300, deadline=None)
@given(packed_rows(), ratios, lambdas)
def test_packed_matches_reference(rows, ratio, lam):
    nll, mask, seg = rows
    keep = segment_token_keep_mask(nll, mask, seg, ratio, lam)
    assert keep.dtype == torch.bool and keep.shape == mask.shape
    assert keep.tolist() == ref_keep_mask(nll, mask, seg, ratio, lam)
    assert not (keep & ~mask).any()  # only clears mask bits


@settings(max_examples=150, deadline=None)
@given(packed_rows(), ratios, lambdas)
def test_padded_rows_match_reference(rows, ratio, lam):
    nll, mask, _ = rows
    keep = token_keep_mask(nll, mask.float(), ratio, lam)
    assert keep.tolist() == ref_keep_mask(nll, mask, torch.zeros_like(mask, dtype=torch.int64),
                                          ratio, lam)
    kept, total = keep.sum(dim=1), mask.sum(dim=1)
    expected = torch.where(total > 0, torch.floor(ratio * total.double() + 0.5).clamp(min=1), 0)
    assert torch.equal(kept, expected.long().minimum(total))


def test_lambda_zero_keeps_lowest_nll():
    nll = torch.tensor([[3.0, 0.1, 2.0, 0.2, 5.0, 0.3]])
    mask = torch.ones_like(nll, dtype=torch.bool)
    keep = token_keep_mask(nll, mask, 0.5, 0.0)
    assert keep.tolist() == [[False, True, False, True, False, True]]


def test_lambda_one_scores_neighbours_only():
    # Score = mean of the neighbours' ppl. Token 2 has the lowest NLL but sits between two high
    # ones and is pruned; tokens 1 and 3 (high NLL, low neighbours) are kept. The edge tokens
    # stand in for their missing neighbour: scores 28.1, 1.32, 54.6, 1.32, 28.1.
    nll = torch.tensor([[0.5, 4.0, 0.0, 4.0, 0.5]])
    mask = torch.ones_like(nll, dtype=torch.bool)
    keep = token_keep_mask(nll, mask, 0.6, 1.0)  # keep 3; the 28.1 tie keeps position 0
    assert keep.tolist() == [[True, True, False, True, False]]


def test_single_token_response_is_kept():
    nll = torch.tensor([[9.0, 50.0, 1.0]])
    mask = torch.tensor([[0, 1, 0]])
    assert token_keep_mask(nll, mask, 0.01, 0.5).tolist() == [[False, True, False]]


def test_gap_in_loss_mask_breaks_neighbourhood():
    # Two assistant turns with a prompt between: the token before the gap has no next neighbour,
    # so its own ppl stands in, not the prompt token's or the next turn's.
    nll = torch.tensor([[0.0, 1.0, 9.0, 9.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0, 0, 1, 1]])
    ppl = [math.exp(x) for x in (0.0, 1.0, 0.0, 0.0)]  # mask-1 positions 0, 1, 4, 5
    lam = 0.5
    scores = [(1 - lam) * ppl[0] + lam * (ppl[0] + ppl[1]) / 2,
              (1 - lam) * ppl[1] + lam * (ppl[0] + ppl[1]) / 2,
              (1 - lam) * ppl[2] + lam * (ppl[2] + ppl[3]) / 2,
              (1 - lam) * ppl[3] + lam * (ppl[2] + ppl[3]) / 2]
    assert scores[2] == scores[3] == 1.0 < scores[0] < scores[1]
    keep = token_keep_mask(nll, mask, 0.75, lam)  # keep 3 of 4
    assert keep.tolist() == [[True, False, False, False, True, True]]


def test_packed_equals_separate_rows():
    rng = np.random.default_rng(0)
    lengths = [5, 1, 9, 4]
    nll = torch.from_numpy(rng.gamma(1.0, 1.0, sum(lengths) + 3)).float()
    mask = torch.from_numpy(rng.random(sum(lengths) + 3) < 0.8)
    seg = torch.tensor(sum(([i] * n for i, n in enumerate(lengths)), []) + [-1] * 3)
    packed = segment_token_keep_mask(nll[None], mask[None], seg[None], 0.5, 0.5)[0]
    start = 0
    for n in lengths:
        alone = token_keep_mask(nll[None, start:start + n], mask[None, start:start + n], 0.5, 0.5)
        assert torch.equal(packed[start:start + n], alone[0])
        start += n
    assert not packed[start:].any()  # padding never kept


def test_same_segment_id_in_different_rows_is_a_different_sample():
    nll = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.6, 0.7, 0.8]])
    mask = torch.ones(2, 4, dtype=torch.bool)
    seg = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])  # (row 0, 1) vs (row 1, 0): distinct
    keep = segment_token_keep_mask(nll, mask, seg, 0.5, 0.0)
    assert keep.tolist() == [[True, False, True, False], [True, True, False, False]]


def test_padding_with_mask_bits_is_never_kept():
    nll = torch.zeros(1, 4)
    mask = torch.ones(1, 4, dtype=torch.bool)
    seg = torch.tensor([[0, 0, -1, -1]])
    assert segment_token_keep_mask(nll, mask, seg, 1.0, 0.5).tolist() == [[True, True, False,
                                                                           False]]


def test_ties_keep_earlier_positions():
    nll = torch.full((2, 7), 1.5)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 0] = False
    keep = token_keep_mask(nll, mask, 0.5, 0.5)
    assert keep.tolist() == [[True] * 4 + [False] * 3, [False] + [True] * 3 + [False] * 3]


def test_empty_rows_stay_false_and_ratio_one_keeps_all():
    nll = torch.rand(3, 6)
    mask = torch.tensor([[0] * 6, [1, 0, 1, 1, 0, 1], [1] * 6], dtype=torch.bool)
    assert not token_keep_mask(nll, mask, 0.5, 0.5)[0].any()
    assert torch.equal(token_keep_mask(nll, mask, 1.0, 0.5), mask)


def test_huge_nll_does_not_overflow():
    nll = torch.tensor([[800.0, 900.0, 0.0, 1000.0, 2.0]], dtype=torch.float64)
    mask = torch.ones_like(nll, dtype=torch.bool)
    keep = token_keep_mask(nll, mask, 0.4, 0.5)
    assert keep.tolist() == ref_keep_mask(nll, mask, torch.zeros_like(mask, dtype=torch.int64),
                                          0.4, 0.5)
    # Position 2 (NLL 0 between two clamped giants) scores 0.5 + max/2 and ties position 3 in
    # float64; position 4 is far lower. Ties keep the earlier position.
    assert keep.tolist() == [[False, False, True, False, True]]


def test_bfloat16_input_and_large_shape_counts():
    torch.manual_seed(0)
    nll = (torch.rand(16, 300) * 6).bfloat16()
    mask = torch.rand(16, 300) < 0.6
    keep = token_keep_mask(nll, mask, 0.7, 0.5)
    total = mask.sum(dim=1)
    assert torch.equal(keep.sum(dim=1), torch.floor(0.7 * total.double() + 0.5).long().clamp(min=1))
    assert not (keep & ~mask).any()


@pytest.mark.parametrize("kwargs, message", [
    ({"keep_ratio": 0.0}, "keep_ratio"),
    ({"keep_ratio": 1.01}, "keep_ratio"),
    ({"neighbor_lambda": -0.1}, "neighbor_lambda"),
    ({"neighbor_lambda": 1.5}, "neighbor_lambda"),
    ({"loss_mask": torch.ones(2, 4)}, "shape"),
    ({"segment_ids": torch.zeros(2, 3)}, "integer"),
])
def test_invalid_arguments(kwargs, message):
    args = {"token_nll": torch.zeros(2, 3), "loss_mask": torch.ones(2, 3),
            "segment_ids": torch.zeros(2, 3, dtype=torch.int64), "keep_ratio": 0.5,
            "neighbor_lambda": 0.5} | kwargs
    with pytest.raises(ValueError, match=message):
        segment_token_keep_mask(**args)
