"""SPEC section 7's paper-exact options against plain-Python references read from the SPEC:
`select_samples(rule="paper")`, the global token budget, and the sequence entropy scope."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from q_tuning.config import QTuningConfig, add_q_tuning_args
from q_tuning.selection import sample_ppl_entropy_from_tokens, select_samples
from q_tuning.token_pruning import budget_token_keep_mask, global_token_budget
from tests.unit.test_selection import batches, ratios, ref_candidates
from tests.unit.test_token_pruning import packed_rows

# ----------------------------------------------------------------------------- references


def ref_paper_select(ppl: list[float], ent: list[float], ratio: float) -> dict:
    """SPEC 7's paper rule: section 3's order while the entry level is <= 0.49, then the
    off-diagonal fill |ppl_n - ent_n| (largest first, earlier sample on ties)."""
    placed = [i for i in range(len(ppl)) if math.isfinite(ppl[i]) and math.isfinite(ent[i])]
    P, E = [ppl[i] for i in placed], [ent[i] for i in placed]
    n = len(P)
    k = min(n, max(1, math.floor(ratio * n + 0.5)))
    candidates = ref_candidates(P, E)
    order = [c[:3] for c in candidates]
    label_of = {c[2]: c[3] for c in candidates}
    dropped = {c[2]: c[4] for c in candidates}
    taken = [j for level, _, j in sorted(order)[:k] if level <= Fraction(49, 100)]

    def normalised(values):
        low, high = min(values), max(values)
        return [(v - low) / (high - low) if high > low else 0.0 for v in values]

    pn, en = normalised(P), normalised(E)
    rest = sorted((j for j in range(n) if j not in taken), key=lambda j: (-abs(pn[j] - en[j]), j))
    fill = rest[:k - len(taken)]
    keep, labels = [False] * len(ppl), [0] * len(ppl)
    for j in range(n):
        i = placed[j]
        keep[i] = j in taken or j in fill
        if j in taken:
            labels[i] = label_of[j]
        elif j in fill:
            labels[i] = 2 if pn[j] >= en[j] else 4
        else:
            labels[i] = dropped[j]
    return {"keep": keep, "labels": labels, "k": k, "corner": len(taken)}


def ref_budget_keep(nll: torch.Tensor, mask: torch.Tensor, budget: int,
                    lam: float) -> list[list[bool]]:
    """SPEC 7's global budget with loops: each row (sample) keeps its lowest score (earlier
    position on ties), then the lowest of the rest across rows (earlier row, then position)."""
    ppl = torch.exp(nll.to(torch.float64)).tolist()
    m = mask.bool().tolist()
    keep = [[False] * len(row) for row in m]
    rest, firsts = [], 0
    for r, row in enumerate(m):
        positions = [t for t, on in enumerate(row) if on]
        scored = []
        for t in positions:
            prev = ppl[r][t - 1] if t - 1 in positions else ppl[r][t]
            after = ppl[r][t + 1] if t + 1 in positions else ppl[r][t]
            scored.append(((1 - lam) * ppl[r][t] + lam * (prev / 2 + after / 2), t))
        if scored:
            best = min(scored)
            keep[r][best[1]] = True
            firsts += 1
            rest += [(s, r, t) for s, t in scored if t != best[1]]
    for _, r, t in sorted(rest)[:max(0, budget - firsts)]:
        keep[r][t] = True
    return keep


# ----------------------------------------------------------------------------- selection


@settings(max_examples=300, deadline=None)
@given(batches(), ratios)
def test_paper_selection_matches_reference(batch, ratio):
    ppl, ent = batch
    if not any(math.isfinite(p) and math.isfinite(e) for p, e in zip(ppl, ent)):
        return
    result = select_samples(torch.tensor(ppl, dtype=torch.float64),
                            torch.tensor(ent, dtype=torch.float64), ratio, rule="paper")
    ref = ref_paper_select(ppl, ent, ratio)
    assert result.keep.tolist() == ref["keep"]
    assert result.quadrant.tolist() == ref["labels"]
    assert int(result.keep.sum()) == ref["k"] == result.target_count
    assert result.level < 0.5


def test_paper_selection_fills_from_the_off_diagonal_on_correlated_data():
    # PPL and entropy on the diagonal but for samples 3, 10 and 11: the corners below level 0.49
    # hold 10 and 11; the fill takes the most off-diagonal of the rest (3, PPL above entropy:
    # Q2), where the exact rule raises the level past 0.5 and takes the central sample 4.
    ppl = torch.tensor([1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 6.5, 4.5], dtype=torch.float64)
    ent = torch.tensor([1., 2., 3., 2.5, 5., 6., 7., 8., 9., 10., 1.5, 9.5], dtype=torch.float64)
    paper = select_samples(ppl, ent, 0.25, rule="paper")
    assert paper.keep.nonzero().flatten().tolist() == [3, 10, 11]
    assert [int(paper.quadrant[i]) for i in (3, 10, 11)] == [2, 2, 4]
    assert paper.level < 0.49
    exact = select_samples(ppl, ent, 0.25)
    assert exact.keep.nonzero().flatten().tolist() == [4, 10, 11] and exact.level > 0.5


def test_selection_rule_is_checked():
    with pytest.raises(ValueError, match="selection rule"):
        select_samples(torch.ones(3), torch.ones(3), 0.5, rule="official")


# ----------------------------------------------------------------------------- token budget


@settings(max_examples=300, deadline=None)
@given(packed_rows(), st.integers(0, 40), st.sampled_from([0.0, 0.5, 1.0, 0.3]))
def test_budget_keep_matches_reference(rows, budget, lam):
    nll, mask, _ = rows
    keep = budget_token_keep_mask(nll, mask, budget, lam)
    assert keep.tolist() == ref_budget_keep(nll, mask, budget, lam)
    samples = int(mask.any(1).sum())
    assert int(keep.sum()) == min(int(mask.sum()), max(samples, budget))
    assert bool((keep.any(1) == mask.any(1)).all())  # one token per sample, at least


def test_budget_ties_go_to_the_earlier_sample_then_position():
    nll = torch.zeros(3, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    keep = budget_token_keep_mask(nll, mask, 6, 0.5)
    # one each (position 0), then the rest in (sample, position) order: sample 0 positions 1-3
    assert keep.tolist() == [[True] * 4, [True, False, False, False], [True, False, False, False]]


def test_one_token_responses_keep_their_token():
    nll = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 9.0]])
    mask = torch.tensor([[False, True, False], [False, False, True]])
    assert budget_token_keep_mask(nll, mask, 0, 0.5).tolist() == mask.tolist()


@pytest.mark.parametrize("r, r_tok, total, q4, n2, q2, expected", [
    (0.25, 0.7, 1000, 100, 3, 400, 75),     # B = 175: Q2 gets what Q4 leaves
    (0.25, 0.7, 1000, 300, 3, 400, 3),      # Q4 alone exceeds B: one token per Q2 sample
    (0.25, 0.7, 1000, 0, 2, 100, 100),      # B above all Q2 tokens: all of them
    (0.5, 0.5, 7, 0, 1, 7, 2),              # floor(1.75 + 0.5)
    (1.0, 1.0, 10, 0, 0, 0, 0),             # no Q2 sample
])
def test_global_token_budget(r, r_tok, total, q4, n2, q2, expected):
    assert global_token_budget(r, r_tok, total, q4, n2, q2) == expected


# ----------------------------------------------------------------------------- entropy scope


def test_sequence_scope_entropy_averages_every_target_ppl_stays_on_the_loss_tokens():
    nll = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    ent = torch.tensor([[0.0, 4.0, 6.0, 8.0]])
    loss = torch.tensor([[False, False, True, True]])
    every = torch.tensor([[False, True, True, True]])
    ppl, e = sample_ppl_entropy_from_tokens(nll, ent, loss, entropy_mask=every)
    assert float(ppl[0]) == pytest.approx(math.exp(2.5))
    assert float(e[0]) == pytest.approx(6.0)
    _, e_response = sample_ppl_entropy_from_tokens(nll, ent, loss)
    assert float(e_response[0]) == pytest.approx(7.0)


# ----------------------------------------------------------------------------- flags


def test_defaults_and_flags():
    c = QTuningConfig()
    assert (c.selection, c.token_budget, c.entropy_scope) == ("paper", "per-sample", "response")
    import argparse
    args = add_q_tuning_args(argparse.ArgumentParser()).parse_args(
        ["--q-tuning-selection", "exact", "--q-tuning-token-budget", "global",
         "--q-tuning-entropy-scope", "sequence"])
    c = QTuningConfig.from_args(args)
    assert (c.selection, c.token_budget, c.entropy_scope) == ("exact", "global", "sequence")


@pytest.mark.parametrize("flag", ["--q-tuning-selection", "--q-tuning-token-budget",
                                  "--q-tuning-entropy-scope"])
def test_bad_option_values_are_rejected_naming_the_flag(flag, capsys):
    import argparse
    with pytest.raises(SystemExit) as e:
        add_q_tuning_args(argparse.ArgumentParser()).parse_args([flag, "nonsense"])
    assert e.value.code == 2 and flag in capsys.readouterr().err
    with pytest.raises(ValueError, match=flag):
        QTuningConfig(**{flag[len("--q-tuning-"):].replace("-", "_"): "nonsense"})
