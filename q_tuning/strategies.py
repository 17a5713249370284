"""Which samples and tokens a step trains on: Q-Tuning's EU-plane rule and the baselines it is
compared with, behind one flag (`--q-tuning-strategy`), so ablations run under identical
conditions (same scoring, rebalancing, loss normalisation and logs).

Public API:
    STRATEGIES                      built-in names
    StrategyInputs, StrategyDecision, TokenPruning
    decide(name, inputs) -> StrategyDecision
    resolve_strategy(name) -> callable   (a built-in, or a user's `module.path.function`)
    needs_scores(name) -> bool
    random_token_keep_mask(target_mask, keep_ratio, generator) -> bool mask

Built-ins (k = keep_count(keep ratio, placed samples), as for the EU-plane rule):
    eu_plane      SPEC sections 3-4: the k samples entering Q2 ∪ Q4 first; Q2 samples get
                  neighbour-aware token pruning.
    random        k placed samples uniformly at random; every kept sample keeps a random
                  `token keep ratio` share of its loss tokens. Needs no scoring forward.
    ppl_high / ppl_low          the k samples of highest / lowest PPL, all their tokens.
    entropy_high / entropy_low  the same by mean predictive entropy.
    infobatch     InfoBatch (Qin et al., ICLR 2024): samples whose loss (mean NLL) is below the
                  batch mean are dropped with probability `--q-tuning-infobatch-prune-ratio` r,
                  the surviving ones get loss weight 1/(1-r); over the last
                  `--q-tuning-infobatch-anneal` share of the run's steps nothing is pruned.
                  InfoBatch keeps each sample's loss from its previous epoch; a single-epoch SFT
                  run has none, so the loss comes from this step's scoring forward. The keep
                  ratio flags do not apply: the kept share follows from r and the data.

A user's rule is `--q-tuning-strategy my.module.function`: `function(inputs: StrategyInputs)`
returns a `StrategyDecision`, or a bool tensor `[N]` of kept samples (all tokens kept, weight 1).
It runs on every rank with identical inputs and must return identical results (draw random
numbers from `inputs.generator`); the pruner checks that the ranks agree. See
`examples/custom_strategy.py`.

Pure tensor code, no communication.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import math
from typing import Callable

import torch
from torch import Tensor

from q_tuning.config import SETTINGS
from q_tuning.selection import SampleSelection, keep_count, select_samples

__all__ = ["STRATEGIES", "StrategyDecision", "StrategyInputs", "TokenPruning", "decide",
           "needs_scores", "random_token_keep_mask", "resolve_strategy", "seeded_generator"]


class TokenPruning(enum.IntEnum):
    """How a kept sample's loss tokens are pruned."""

    NONE = 0
    SCORED = 1  # SPEC section 4: the highest neighbour-aware PPL scores go
    RANDOM = 2  # a uniformly random `token keep ratio` share stays


@dataclasses.dataclass(frozen=True)
class StrategyInputs:
    """The global batch as every rank sees it. Per-sample tensors are `[N]` in DP-rank order."""

    ppl: Tensor  # float64; NaN: cannot be placed (no loss tokens, non-finite, or not scored)
    entropy: Tensor  # float64 mean predictive entropy; NaN as for ppl
    num_tokens: Tensor  # float64 loss-token count
    keep_ratio: float  # the sample keep ratio for this step (refill: from the wanted count)
    token_keep_ratio: float
    bisect_max_iter: int
    step: int  # 1-based step of this pruner
    total_steps: int | None  # the run's planned steps, when known
    generator: torch.Generator  # seeded from (--q-tuning-seed, step): the same on every rank
    options: dict  # strategy-specific settings, e.g. {"infobatch_prune_ratio": 0.5, ...}
    selection_rule: str = "exact"  # select_samples' rule (--q-tuning-selection)

    @property
    def scored(self) -> bool:
        return bool(torch.isfinite(self.ppl).any())


@dataclasses.dataclass
class StrategyDecision:
    """What the step trains on. `selection` labels quadrants for reports and plots."""

    keep: Tensor  # bool [N]
    token_pruning: Tensor  # int64 [N], TokenPruning values (only kept samples matter)
    loss_weight: Tensor  # float64 [N]: multiplies the sample's loss tokens (1 = unchanged)
    selection: SampleSelection | None = None  # EU-plane labels at the same keep ratio, if scored

    @classmethod
    def keep_only(cls, keep: Tensor) -> "StrategyDecision":
        return cls(keep=keep.bool(), token_pruning=torch.zeros(keep.shape, dtype=torch.int64),
                   loss_weight=torch.ones(keep.shape, dtype=torch.float64))


def eu_plane(inputs: StrategyInputs) -> StrategyDecision:
    selection = _eu_selection(inputs)
    scored_tokens = selection.keep & (selection.quadrant == 2)
    return StrategyDecision(
        keep=selection.keep,
        token_pruning=torch.where(scored_tokens, int(TokenPruning.SCORED), int(TokenPruning.NONE)),
        loss_weight=torch.ones_like(inputs.ppl), selection=selection)


def random_samples(inputs: StrategyInputs) -> StrategyDecision:
    placed = (inputs.num_tokens > 0).nonzero().flatten()
    if placed.numel() == 0:
        raise ValueError(f"Q-Tuning step {inputs.step}: no sample of the batch has loss tokens")
    k = keep_count(inputs.keep_ratio, placed.numel())
    chosen = placed[torch.randperm(placed.numel(), generator=inputs.generator)[:k]]
    keep = torch.zeros(inputs.ppl.shape, dtype=torch.bool).index_fill_(0, chosen, True)
    prune = torch.full(keep.shape, int(TokenPruning.RANDOM), dtype=torch.int64)
    return StrategyDecision(keep=keep, token_pruning=prune, loss_weight=torch.ones_like(inputs.ppl),
                            selection=_eu_selection(inputs) if inputs.scored else None)


def _by_value(values: Tensor, inputs: StrategyInputs, *, highest: bool) -> StrategyDecision:
    """The k placed samples with the highest (lowest) value; equal values keep the lower index."""
    selection = _eu_selection(inputs)  # raises, naming the step, when no sample can be placed
    placed = selection.placed.nonzero().flatten()
    k = keep_count(inputs.keep_ratio, placed.numel())
    v = values[placed]
    order = torch.sort(-v if highest else v, stable=True).indices
    keep = torch.zeros(values.shape, dtype=torch.bool).index_fill_(0, placed[order[:k]], True)
    decision = StrategyDecision.keep_only(keep)
    decision.selection = selection
    return decision


def infobatch(inputs: StrategyInputs) -> StrategyDecision:
    r = float(inputs.options.get("infobatch_prune_ratio", 0.5))
    anneal = float(inputs.options.get("infobatch_anneal", 0.125))
    selection = _eu_selection(inputs)  # raises, naming the step, when no sample can be placed
    placed = selection.placed
    draw = torch.rand(inputs.ppl.shape, generator=inputs.generator, dtype=torch.float64)
    weight = torch.ones_like(inputs.ppl)
    keep = placed.clone()
    full_data = inputs.total_steps is not None and \
        inputs.step > math.floor((1.0 - anneal) * inputs.total_steps)
    if not full_data and r > 0:
        loss = torch.log(inputs.ppl)  # mean NLL
        well_learned = placed & (loss < loss[placed].mean())
        keep = placed & ~(well_learned & (draw < r))
        weight = torch.where(well_learned & keep, 1.0 / (1.0 - r), 1.0).to(torch.float64)
    decision = StrategyDecision.keep_only(keep)
    decision.loss_weight = weight
    decision.selection = selection
    return decision


_BUILTINS: dict[str, Callable[[StrategyInputs], StrategyDecision]] = {
    "eu_plane": eu_plane,
    "random": random_samples,
    "ppl_high": lambda i: _by_value(i.ppl, i, highest=True),
    "ppl_low": lambda i: _by_value(i.ppl, i, highest=False),
    "entropy_high": lambda i: _by_value(i.entropy, i, highest=True),
    "entropy_low": lambda i: _by_value(i.entropy, i, highest=False),
    "infobatch": infobatch,
}
STRATEGIES = tuple(_BUILTINS)


def needs_scores(name: str) -> bool:
    """False only for `random`, which decides without the scoring forward."""
    return name != "random"


def resolve_strategy(name: str) -> Callable[[StrategyInputs], object]:
    """A built-in by name, or `module.path.function` imported; errors name the flag."""
    if name in _BUILTINS:
        return _BUILTINS[name]
    strategy = next(s for s in SETTINGS if s.field == "strategy")
    strategy.validate(name)  # ValueError naming --q-tuning-strategy when it does not import
    module_name, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def decide(name: str, inputs: StrategyInputs) -> StrategyDecision:
    """Run the strategy and check its result's shape and meaning; errors name the strategy."""
    result = resolve_strategy(name)(inputs)
    n = inputs.ppl.numel()
    if isinstance(result, Tensor):
        result = StrategyDecision.keep_only(result)
    if not isinstance(result, StrategyDecision):
        raise ValueError(f"--q-tuning-strategy {name} returned {type(result).__name__}; expected "
                         "a StrategyDecision or a bool tensor [N]")
    for field in ("keep", "token_pruning", "loss_weight"):
        value = getattr(result, field)
        if not isinstance(value, Tensor) or value.shape != (n,):
            raise ValueError(f"--q-tuning-strategy {name}: decision.{field} must be a tensor of "
                             f"shape [{n}]")
    result.keep = result.keep.bool().cpu()
    result.token_pruning = result.token_pruning.to(torch.int64).cpu()
    result.loss_weight = result.loss_weight.to(torch.float64).cpu()
    if not bool(result.keep.any()):
        raise ValueError(f"Q-Tuning step {inputs.step}: --q-tuning-strategy {name} kept no sample")
    if bool((result.keep & (inputs.num_tokens <= 0)).any()):
        raise ValueError(f"--q-tuning-strategy {name} kept a sample that has no loss tokens")
    if not bool(torch.isin(result.token_pruning, torch.tensor([int(t) for t in TokenPruning])).all()):
        raise ValueError(f"--q-tuning-strategy {name}: token_pruning values must be TokenPruning "
                         f"members {[int(t) for t in TokenPruning]}")
    if not bool((torch.isfinite(result.loss_weight) & (result.loss_weight > 0)).all()):
        raise ValueError(f"--q-tuning-strategy {name}: loss weights must be finite and > 0")
    if result.selection is None and inputs.scored:
        result.selection = _eu_selection(inputs)
    return result


def random_token_keep_mask(target_mask: Tensor, keep_ratio: float,
                           generator: torch.Generator) -> Tensor:
    """Bool like `target_mask` (one sample): `keep_count(keep_ratio, targets)` of its target
    positions, uniformly at random."""
    targets = target_mask.bool().nonzero().flatten()
    keep = torch.zeros(target_mask.shape, dtype=torch.bool)
    if targets.numel():
        k = keep_count(keep_ratio, targets.numel())
        keep[targets[torch.randperm(targets.numel(), generator=generator)[:k]]] = True
    return keep


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from integers (e.g. seed, step, sample index), rank-independent."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part) + 1) % (1 << 62)
    return torch.Generator().manual_seed(value)


def _eu_selection(inputs: StrategyInputs) -> SampleSelection:
    return select_samples(inputs.ppl, inputs.entropy, inputs.keep_ratio, inputs.bisect_max_iter,
                          step=inputs.step, num_tokens=inputs.num_tokens,
                          rule=inputs.selection_rule)
