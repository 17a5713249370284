"""Each baseline's rule against a slow, obviously-correct reference (q_tuning.strategies)."""

from __future__ import annotations

import math

import pytest
import torch

from q_tuning import keep_count, select_samples
from q_tuning.config import STRATEGY_NAMES, QTuningConfig
from q_tuning.strategies import (STRATEGIES, StrategyDecision, StrategyInputs, TokenPruning,
                                 decide, needs_scores, random_token_keep_mask, resolve_strategy,
                                 seeded_generator)


def inputs(n=40, seed=0, *, keep_ratio=0.25, step=1, total_steps=None, nan_at=(3,), ties=False,
           scored=True, **options) -> StrategyInputs:
    g = torch.Generator().manual_seed(seed)
    ppl = torch.exp(torch.rand(n, generator=g, dtype=torch.float64) * 3)
    ent = torch.rand(n, generator=g, dtype=torch.float64) * 2
    if ties:
        ppl, ent = torch.round(ppl), torch.round(ent * 2) / 2
    num_tokens = torch.randint(1, 50, (n,), generator=g).double()
    for i in nan_at:
        ppl[i], ent[i], num_tokens[i] = float("nan"), float("nan"), 0.0
    if not scored:
        ppl, ent = torch.full_like(ppl, float("nan")), torch.full_like(ent, float("nan"))
    return StrategyInputs(ppl=ppl, entropy=ent, num_tokens=num_tokens, keep_ratio=keep_ratio,
                          token_keep_ratio=0.7, bisect_max_iter=10, step=step,
                          total_steps=total_steps, generator=seeded_generator(seed, step),
                          options=options)


def test_names_agree_with_the_flag_choices():
    assert STRATEGIES == STRATEGY_NAMES
    assert [needs_scores(s) for s in STRATEGIES] == [s != "random" for s in STRATEGIES]


def test_eu_plane_is_select_samples_with_q2_token_pruning():
    x = inputs(ties=True)
    d = decide("eu_plane", x)
    ref = select_samples(x.ppl, x.entropy, x.keep_ratio, 10, num_tokens=x.num_tokens)
    assert torch.equal(d.keep, ref.keep)
    expected = [int(TokenPruning.SCORED) if k and q == 2 else 0
                for k, q in zip(ref.keep.tolist(), ref.quadrant.tolist())]
    assert d.token_pruning.tolist() == expected
    assert torch.all(d.loss_weight == 1)


@pytest.mark.parametrize("name,key,highest", [("ppl_high", "ppl", True), ("ppl_low", "ppl", False),
                                              ("entropy_high", "entropy", True),
                                              ("entropy_low", "entropy", False)])
@pytest.mark.parametrize("ties", [False, True])
def test_single_axis_baselines_keep_the_k_extreme_samples(name, key, highest, ties):
    x = inputs(ties=ties)
    d = decide(name, x)
    values = getattr(x, key).tolist()
    placed = [i for i, v in enumerate(values) if not math.isnan(v)]
    k = max(1, math.floor(x.keep_ratio * len(placed) + 0.5))
    # reference: sort by (value, index) with the value negated for "highest"
    ranked = sorted(placed, key=lambda i: ((-values[i] if highest else values[i]), i))
    assert sorted(d.keep.nonzero().flatten().tolist()) == sorted(ranked[:k])
    assert torch.all(d.token_pruning == 0) and torch.all(d.loss_weight == 1)
    assert d.selection is not None  # EU-plane labels for the report


def test_random_keeps_k_samples_with_loss_tokens_and_needs_no_scores():
    x = inputs(n=41, scored=False, nan_at=(0, 7))
    d = decide("random", x)
    placed = (x.num_tokens > 0).sum().item()
    assert int(d.keep.sum()) == keep_count(x.keep_ratio, int(placed))
    assert not d.keep[0] and not d.keep[7]
    assert torch.all(d.token_pruning == int(TokenPruning.RANDOM))
    assert d.selection is None
    again = decide("random", inputs(n=41, scored=False, nan_at=(0, 7)))
    assert torch.equal(again.keep, d.keep)  # a function of (seed, step) only
    other = decide("random", inputs(n=41, seed=1, scored=False, nan_at=(0, 7)))
    assert not torch.equal(other.keep, d.keep)


def test_random_sample_choice_is_uniform():
    counts = torch.zeros(20)
    trials = 2000
    for s in range(trials):
        counts += decide("random", inputs(n=20, seed=s, step=s, keep_ratio=0.25, nan_at=())).keep
    freq = counts / trials  # each sample kept with probability 5/20
    assert torch.all((freq - 0.25).abs() < 0.05), freq


def test_random_token_keep_mask():
    target = torch.tensor([0, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
    hits = torch.zeros(target.shape)
    for s in range(1000):
        keep = random_token_keep_mask(target, 0.7, seeded_generator(s))
        assert int(keep.sum()) == keep_count(0.7, 8)  # round(5.6) = 6
        assert not bool((keep & ~target).any())
        hits += keep
    freq = hits[target] / 1000
    assert torch.all((freq - 0.75).abs() < 0.06), freq  # 6 of 8 each time
    assert not random_token_keep_mask(torch.zeros(4, dtype=torch.bool), 0.7,
                                      seeded_generator(0)).any()


def infobatch_reference(x: StrategyInputs, r: float, anneal: float):
    """InfoBatch, written out per sample, consuming the same uniform draws."""
    draws = torch.rand(x.ppl.shape, generator=seeded_generator(0, x.step),
                       dtype=torch.float64).tolist()
    loss = [math.log(p) if not math.isnan(p) else None for p in x.ppl.tolist()]
    placed = [v is not None for v in loss]
    mean = sum(v for v in loss if v is not None) / sum(placed)
    full = x.total_steps is not None and x.step > math.floor((1 - anneal) * x.total_steps)
    keep, weight = [], []
    for v, u in zip(loss, draws):
        if v is None:
            keep.append(False); weight.append(1.0)
        elif not full and v < mean and u < r:
            keep.append(False); weight.append(1.0)
        else:
            keep.append(True)
            weight.append(1.0 / (1 - r) if (not full and v < mean) else 1.0)
    return keep, weight


@pytest.mark.parametrize("r", [0.0, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("step,total", [(1, None), (1, 8), (7, 8), (8, 8)])
def test_infobatch_matches_its_published_rule(r, step, total):
    x = inputs(n=64, step=step, total_steps=total, infobatch_prune_ratio=r, infobatch_anneal=0.25)
    d = decide("infobatch", x)
    keep, weight = infobatch_reference(x, r, 0.25)
    assert d.keep.tolist() == keep
    torch.testing.assert_close(d.loss_weight, torch.tensor(weight, dtype=torch.float64))
    if total == 8 and step > 6:  # the last 25% of 8 steps: full data, no rescaling
        assert d.keep.sum() == 63 and torch.all(d.loss_weight == 1)


def test_infobatch_prunes_r_of_the_well_learned_samples():
    x = inputs(n=4000, infobatch_prune_ratio=0.5, nan_at=())
    d = decide("infobatch", x)
    well = torch.log(x.ppl) < torch.log(x.ppl).mean()
    pruned_share = float((~d.keep & well).sum() / well.sum())
    assert abs(pruned_share - 0.5) < 0.05
    assert torch.all(d.keep[~well])
    # rescaling keeps the expected weight of a well-learned sample at 1
    assert abs(float((d.loss_weight * d.keep)[well].sum()) / float(well.sum()) - 1.0) < 0.1


def keep_two_lowest_ppl(x: StrategyInputs) -> torch.Tensor:
    order = torch.argsort(torch.nan_to_num(x.ppl, nan=float("inf")), stable=True)
    return torch.zeros(x.ppl.shape, dtype=torch.bool).index_fill_(0, order[:2], True)


def weighted_decision(x: StrategyInputs) -> StrategyDecision:
    d = StrategyDecision.keep_only(torch.isfinite(x.ppl))
    d.loss_weight = torch.full_like(x.ppl, 2.0)
    return d


def test_custom_strategy_by_module_path():
    x = inputs()
    d = decide(f"{__name__}.keep_two_lowest_ppl", x)
    assert d.keep.sum() == 2 and d.selection is not None
    assert torch.all(decide(f"{__name__}.weighted_decision", x).loss_weight == 2)
    from examples.custom_strategy import q2_only
    d = decide("examples.custom_strategy.q2_only", x)
    assert resolve_strategy("examples.custom_strategy.q2_only") is q2_only
    sel = select_samples(x.ppl, x.entropy, x.keep_ratio, num_tokens=x.num_tokens)
    assert d.keep.tolist() == (sel.keep & (sel.quadrant == 2)).tolist()


def bad_shape(x):
    return torch.ones(3, dtype=torch.bool)


def keeps_nothing(x):
    return torch.zeros(x.ppl.shape, dtype=torch.bool)


def keeps_empty_sample(x):
    return torch.ones(x.ppl.shape, dtype=torch.bool)


def returns_a_list(x):
    return [True]


@pytest.mark.parametrize("name,message", [
    ("nonsense", "unknown strategy 'nonsense'"),
    ("no_such_module_xyz.fn", "cannot import it"),
    (f"{__name__}.missing_function", "cannot import it"),
    (f"{__name__}.bad_shape", "decision.keep must be a tensor of shape [40]"),
    (f"{__name__}.keeps_nothing", "kept no sample"),
    (f"{__name__}.keeps_empty_sample", "has no loss tokens"),
    (f"{__name__}.returns_a_list", "returned list"),
])
def test_bad_strategies_are_named(name, message):
    with pytest.raises(ValueError, match="--q-tuning-strategy|kept no sample") as e:
        decide(name, inputs())
    assert message in str(e.value)


def test_config_validates_the_strategy_flags():
    QTuningConfig(strategy="examples.custom_strategy.q2_only")
    # a dotted name that does not import fails here, at parse time, not after the model loads
    for bad in ("nonsense", ".", "", "my.module.fn"):
        with pytest.raises(ValueError, match="--q-tuning-strategy"):
            QTuningConfig(strategy=bad)
    for bad in (1.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match=r"--q-tuning-infobatch-prune-ratio must be in \[0, 1\)"):
            QTuningConfig(infobatch_prune_ratio=bad)
    with pytest.raises(ValueError, match="--q-tuning-infobatch-anneal"):
        QTuningConfig(infobatch_anneal=1.5)
