"""Q-Tuning configuration: one validated dataclass, and the Megatron-style flags that fill it.

`add_q_tuning_args(parser)` has the signature of Megatron-LM's `extra_args_provider`
(`parser -> parser`), so the flags can be added to an existing Megatron-LM script unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable

BATCH_POLICIES = ("shrink", "refill")
SCORING_METHODS = ("fused", "logits")
# q_tuning.strategies.STRATEGIES, repeated here so the flags parse without importing torch code.
# SPEC section 7's options (used by q_tuning.selection and q_tuning.token_pruning).
SELECTION_RULES = ("paper", "exact")
TOKEN_BUDGETS = ("per-sample", "global")
ENTROPY_SCOPES = ("response", "sequence")
STRATEGY_NAMES = ("eu_plane", "random", "ppl_high", "ppl_low", "entropy_high", "entropy_low",
                  "infobatch")


@dataclasses.dataclass(kw_only=True, slots=True)
class QTuningConfig:
    """Parameters of SPEC section 6 plus the batch policy of section 5."""

    enabled: bool = True
    sample_keep_ratio: float = 0.5
    token_keep_ratio: float = 0.7
    neighbor_lambda: float = 0.5
    bisect_max_iter: int = 10
    # SPEC section 7: the official code's selection rule (default), token budget and entropy scope
    selection: str = "paper"
    token_budget: str = "per-sample"
    entropy_scope: str = "response"
    batch_policy: str = "shrink"
    # Scoring stores no activations, so it may use larger micro-batches than training.
    # None: use the training micro-batch size.
    scoring_micro_batch_size: int | None = None
    # fused: statistics from the final hidden states through the output weight, block by block,
    # response positions only; logits: from the model's logits (reference, and the fallback).
    scoring_method: str = "fused"
    # eu_plane (Q-Tuning), a baseline of q_tuning.strategies, or a user's module.path.function.
    strategy: str = "eu_plane"
    seed: int = 1234  # random draws of the random/infobatch strategies (same on every rank)
    infobatch_prune_ratio: float = 0.5
    infobatch_anneal: float = 0.125

    def __post_init__(self) -> None:
        _check_ratio(self.sample_keep_ratio, "--q-tuning-sample-keep-ratio", lower_open=True)
        _check_ratio(self.token_keep_ratio, "--q-tuning-token-keep-ratio", lower_open=True)
        _check_ratio(self.neighbor_lambda, "--q-tuning-neighbor-lambda", lower_open=False)
        if isinstance(self.bisect_max_iter, bool) or not isinstance(self.bisect_max_iter, int) \
                or self.bisect_max_iter < 1:
            raise ValueError(
                f"--q-tuning-bisect-max-iter must be an integer >= 1, got {self.bisect_max_iter!r}")
        for name, choices in (("selection", SELECTION_RULES), ("token_budget", TOKEN_BUDGETS),
                              ("entropy_scope", ENTROPY_SCOPES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"--q-tuning-{name.replace('_', '-')} must be one of {choices}, "
                                 f"got {getattr(self, name)!r}")
        if self.batch_policy not in BATCH_POLICIES:
            raise ValueError(
                f"--q-tuning-batch-policy must be one of {BATCH_POLICIES}, got {self.batch_policy!r}")
        if self.scoring_method not in SCORING_METHODS:
            raise ValueError(f"--q-tuning-scoring-method must be one of {SCORING_METHODS}, "
                             f"got {self.scoring_method!r}")
        if not isinstance(self.strategy, str) or not (
                self.strategy in STRATEGY_NAMES or "." in self.strategy.strip(".")):
            raise ValueError(f"--q-tuning-strategy must be one of {STRATEGY_NAMES} or a function "
                             f"as module.path.function, got {self.strategy!r}")
        if not 0.0 <= self.infobatch_prune_ratio < 1.0:  # NaN too; 1 would prune and rescale by 1/0
            raise ValueError("--q-tuning-infobatch-prune-ratio must be in [0, 1), got "
                             f"{self.infobatch_prune_ratio!r}")
        _check_ratio(self.infobatch_anneal, "--q-tuning-infobatch-anneal", lower_open=False)
        if self.scoring_micro_batch_size is not None and self.scoring_micro_batch_size < 1:
            raise ValueError("--q-tuning-scoring-micro-batch-size must be an integer >= 1, "
                             f"got {self.scoring_micro_batch_size!r}")

    @classmethod
    def from_args(cls, args: Any) -> "QTuningConfig":
        """Build from a parsed Megatron-style `args` namespace (underscored attribute names)."""
        defaults = cls()
        return cls(
            enabled=bool(getattr(args, "enable_q_tuning", True)),
            **{f.name: getattr(args, "q_tuning_" + f.name, getattr(defaults, f.name))
               for f in dataclasses.fields(cls) if f.name != "enabled"},
        )


def _check_ratio(value: float, flag: str, *, lower_open: bool) -> None:
    ok = (0.0 < value <= 1.0) if lower_open else (0.0 <= value <= 1.0)
    if not ok:
        interval = "(0, 1]" if lower_open else "[0, 1]"
        raise ValueError(f"{flag} must be in {interval}, got {value!r}")


def _ranged_float(lower_open: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = (0.0 < value <= 1.0) if lower_open else (0.0 <= value <= 1.0)
        if not ok:
            interval = "(0, 1]" if lower_open else "[0, 1]"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    return parse


def positive_int(text: str) -> int:
    """argparse type for flags that take an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def add_q_tuning_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the Q-Tuning flags in their own argument group; usable as `extra_args_provider`.

    Out-of-range values fail at parse time; argparse names the flag in the message.
    """
    d = QTuningConfig()
    group = parser.add_argument_group(title="q-tuning", description="Q-Tuning joint sample and "
                                      "token pruning (arXiv 2509.23873)")
    group.add_argument("--enable-q-tuning", action="store_true",
                       help="Score every step's batch on the Error-Uncertainty plane and train only "
                            "on the kept samples/tokens.")
    group.add_argument("--q-tuning-sample-keep-ratio", type=_ranged_float(True),
                       default=d.sample_keep_ratio,
                       help="Fraction of the global batch's samples kept, in (0, 1].")
    group.add_argument("--q-tuning-token-keep-ratio", type=_ranged_float(True),
                       default=d.token_keep_ratio,
                       help="Fraction of response tokens kept in Q2 samples, in (0, 1].")
    group.add_argument("--q-tuning-neighbor-lambda", type=_ranged_float(False),
                       default=d.neighbor_lambda,
                       help="Weight of the neighbours' perplexity in the token score, in [0, 1].")
    group.add_argument("--q-tuning-bisect-max-iter", type=positive_int, default=d.bisect_max_iter,
                       help="Bisection steps on the quantile level (integer >= 1).")
    group.add_argument("--q-tuning-selection", choices=SELECTION_RULES, default=d.selection,
                       help="paper: the official code's rule (corners below level 0.49, then the "
                            "most off-diagonal samples); exact: exactly k from the corners, the "
                            "level may pass 0.5.")
    group.add_argument("--q-tuning-token-budget", choices=TOKEN_BUDGETS, default=d.token_budget,
                       help="per-sample: each Q2 sample keeps its token keep ratio; global: the "
                            "step trains on sample ratio x token ratio of the global batch's loss "
                            "tokens (Q4 whole, Q2 tokens ranked across samples).")
    group.add_argument("--q-tuning-entropy-scope", choices=ENTROPY_SCOPES,
                       default=d.entropy_scope,
                       help="response: a sample's entropy over its loss tokens; sequence: over "
                            "every target position, prompt included (the official code).")
    group.add_argument("--q-tuning-batch-policy", choices=BATCH_POLICIES, default=d.batch_policy,
                       help="shrink: train on the kept part of each scored batch; refill: score "
                            "until a full batch of kept samples is collected.")
    group.add_argument("--q-tuning-scoring-micro-batch-size", type=positive_int, default=None,
                       help="Micro-batch size of the no-grad scoring forward (default: the "
                            "training micro-batch size).")
    group.add_argument("--q-tuning-scoring-method", choices=SCORING_METHODS,
                       default=d.scoring_method,
                       help="fused: per-token statistics from the final hidden states through the "
                            "output weight, response positions only, never forming the logits; "
                            "logits: from the model's logits (reference).")
    group.add_argument("--q-tuning-strategy", default=d.strategy, metavar="NAME|MODULE.FN",
                       help="Which samples/tokens to train on: eu_plane (Q-Tuning), or a baseline "
                            "under identical conditions: random, ppl_high, ppl_low, entropy_high, "
                            "entropy_low, infobatch; or module.path.function for your own rule "
                            "(contract in q_tuning.strategies).")
    group.add_argument("--q-tuning-seed", type=int, default=d.seed,
                       help="Seed of the random draws of the random and infobatch strategies.")
    group.add_argument("--q-tuning-infobatch-prune-ratio", type=_ranged_float(False),
                       default=d.infobatch_prune_ratio,
                       help="InfoBatch: probability of dropping a below-mean-loss sample, in "
                            "[0, 1).")
    group.add_argument("--q-tuning-infobatch-anneal", type=_ranged_float(False),
                       default=d.infobatch_anneal,
                       help="InfoBatch: share of the run's final steps trained on full data.")
    return parser
