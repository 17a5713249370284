"""Q-Tuning configuration: one table of settings, the validated dataclass it defines, and the
Megatron-style flags it generates.

Public API:
    QTuningConfig                 every `--q-tuning-*` setting, validated in `__post_init__`
    RunShape                      run-time facts the pruner needs (batch shape, planned steps)
    add_q_tuning_args(parser)     Megatron-LM's `extra_args_provider` signature
    SETTINGS                      the table: flag, help, check and choices of every setting
    positive_int                  argparse type for integer flags >= 1

Each entry of `SETTINGS` is the single source of its setting: the argparse type (which parses
the text and runs the same check, so a bad value fails at parse time, exit status 2, naming the
flag), the choices shown in `--help`, and the dataclass check (which names the flag too, for
configurations built in Python). Torch is not imported here: parsing flags stays cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
from typing import Any, Callable

BATCH_POLICIES = ("shrink", "refill")
SCORING_METHODS = ("fused", "logits")
SELECTION_RULES = ("paper", "exact")  # SPEC section 7 (paper) and section 3 (exact)
TOKEN_BUDGETS = ("per-sample", "global")
ENTROPY_SCOPES = ("response", "sequence")
# q_tuning.strategies.STRATEGIES, repeated here so the flags parse without importing torch code
# (tests/unit/test_config.py checks that the two agree).
STRATEGY_NAMES = ("eu_plane", "random", "ppl_high", "ppl_low", "entropy_high", "entropy_low",
                  "infobatch")


# --- checks: value -> value, or ValueError saying what is expected ---------------------------------

def _interval(low: float, high: float, *, low_open: bool = False, high_open: bool = False
              ) -> Callable[[Any], float]:
    text = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
                or not ((low < value) if low_open else (low <= value)) \
                or not ((value < high) if high_open else (value <= high)):
            raise ValueError(f"must be in {text}, got {value!r}")
        return float(value)

    return check


def _at_least_one(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be an integer >= 1, got {value!r}")
    return value


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else check(value)


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer, got {value!r}")
    return value


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    return check


def _strategy(value: Any) -> str:
    """A built-in name, or `module.path.function` that imports (checked now, not after the model
    has loaded)."""
    if value in STRATEGY_NAMES:
        return value
    module_name, _, attr = str(value).rpartition(".")
    if not isinstance(value, str) or not module_name or not attr:
        raise ValueError(f"unknown strategy {value!r}; use one of {', '.join(STRATEGY_NAMES)} "
                         "or a function as module.path.function")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{value}: cannot import it ({e})") from None
    if not callable(fn):
        raise ValueError(f"{value}: {type(fn).__name__} is not callable")
    return value


@dataclasses.dataclass(frozen=True)
class Setting:
    """One `--q-tuning-*` setting: its flag, help text, check and (for string settings) choices."""

    field: str
    help: str
    check: Callable[[Any], Any]
    parse: Callable[[str], Any] = float  # text -> value, before the check
    choices: tuple[str, ...] | None = None
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--q-tuning-" + self.field.replace("_", "-")

    def validate(self, value: Any) -> Any:
        """The checked value; ValueError naming the flag otherwise."""
        try:
            return self.check(value)
        except ValueError as e:
            raise ValueError(f"{self.flag} {e}") from None

    def argparse_type(self, text: str) -> Any:
        try:
            value = self.parse(text)
        except ValueError:
            kind = "a number" if self.parse is float else "an integer"
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        try:
            return self.check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None


SETTINGS: tuple[Setting, ...] = (
    Setting("sample_keep_ratio", "Fraction of the global batch's samples kept, in (0, 1].",
            _interval(0, 1, low_open=True)),
    Setting("token_keep_ratio", "Fraction of response tokens kept in Q2 samples, in (0, 1].",
            _interval(0, 1, low_open=True)),
    Setting("neighbor_lambda", "Weight of the neighbours' perplexity in the token score, in "
            "[0, 1].", _interval(0, 1)),
    Setting("bisect_max_iter", "Bisection steps on the quantile level (integer >= 1).",
            _at_least_one, int),
    Setting("selection", "paper: the official code's rule (corners below level 0.49, then the "
            "most off-diagonal samples); exact: exactly k from the corners, the level may pass "
            "0.5.", _one_of(SELECTION_RULES), str, SELECTION_RULES),
    Setting("token_budget", "per-sample: each Q2 sample keeps its token keep ratio; global: the "
            "step trains on sample ratio x token ratio of the global batch's loss tokens (Q4 "
            "whole, Q2 tokens ranked across samples).", _one_of(TOKEN_BUDGETS), str,
            TOKEN_BUDGETS),
    Setting("entropy_scope", "response: a sample's entropy over its loss tokens; sequence: over "
            "every target position, prompt included (the official code).",
            _one_of(ENTROPY_SCOPES), str, ENTROPY_SCOPES),
    Setting("batch_policy", "shrink: train on the kept part of each scored batch; refill: score "
            "until a full batch of kept samples is collected.", _one_of(BATCH_POLICIES), str,
            BATCH_POLICIES),
    Setting("scoring_micro_batch_size", "Micro-batch size of the no-grad scoring forward "
            "(default: derived from the training micro-batch size).",
            _optional(_at_least_one), int),
    Setting("scoring_method", "fused: per-token statistics from the final hidden states through "
            "the output weight, response positions only, never forming the logits; logits: from "
            "the model's logits (reference).", _one_of(SCORING_METHODS), str, SCORING_METHODS),
    Setting("strategy", "Which samples/tokens to train on: eu_plane (Q-Tuning), or a baseline "
            "under identical conditions: random, ppl_high, ppl_low, entropy_high, entropy_low, "
            "infobatch; or module.path.function for your own rule (contract in "
            "q_tuning.strategies).", _strategy, str, metavar="NAME|MODULE.FN"),
    Setting("seed", "Seed of the random draws of the random and infobatch strategies.",
            _integer, int),
    Setting("infobatch_prune_ratio", "InfoBatch: probability of dropping a below-mean-loss "
            "sample, in [0, 1).", _interval(0, 1, high_open=True)),
    Setting("infobatch_anneal", "InfoBatch: share of the run's final steps trained on full data, "
            "in [0, 1].", _interval(0, 1)),
)


@dataclasses.dataclass(kw_only=True, slots=True)
class QTuningConfig:
    """The `--q-tuning-*` settings (SPEC section 6 and 7, the batch policy of section 5, scoring
    and baselines). Every field is checked by its `SETTINGS` entry."""

    sample_keep_ratio: float = 0.5
    token_keep_ratio: float = 0.7
    neighbor_lambda: float = 0.5
    bisect_max_iter: int = 10
    selection: str = "paper"
    token_budget: str = "per-sample"
    entropy_scope: str = "response"
    batch_policy: str = "shrink"
    # Scoring stores no activations, so it may use larger micro-batches than training.
    scoring_micro_batch_size: int | None = None
    scoring_method: str = "fused"
    strategy: str = "eu_plane"
    seed: int = 1234
    infobatch_prune_ratio: float = 0.5
    infobatch_anneal: float = 0.125

    def __post_init__(self) -> None:
        for setting in SETTINGS:
            object.__setattr__(self, setting.field, setting.validate(getattr(self, setting.field)))

    @classmethod
    def from_args(cls, args: Any) -> "QTuningConfig":
        """From a parsed Megatron-style `args` namespace (`q_tuning_<field>` attributes; absent
        ones keep their defaults)."""
        return cls(**{s.field: getattr(args, "q_tuning_" + s.field)
                      for s in SETTINGS if hasattr(args, "q_tuning_" + s.field)})


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunShape:
    """Run-time facts the pruner needs, given by the entry point that knows them."""

    micro_batch_size: int = 1  # training micro-batch size (sizes the scoring micro-batches)
    seq_length: int | None = None  # longest sample accepted
    max_tokens_per_row: int | None = None  # packed rows (--max-tokens-per-gpu), else None
    total_steps: int | None = None  # the run's planned steps (InfoBatch anneals over the last)

    @classmethod
    def from_args(cls, args: Any, *, total_steps: int | None = None) -> "RunShape":
        """From Megatron/slime flags: --micro-batch-size, --seq-length, --train-iters and
        --max-tokens-per-gpu (with --use-dynamic-batch-size)."""
        dynamic = getattr(args, "use_dynamic_batch_size", False)
        return cls(micro_batch_size=getattr(args, "micro_batch_size", None) or 1,
                   seq_length=getattr(args, "seq_length", None),
                   max_tokens_per_row=getattr(args, "max_tokens_per_gpu", None) if dynamic
                   else None,
                   total_steps=total_steps or getattr(args, "train_iters", None))


class CommandLineParser(argparse.ArgumentParser):
    """argparse for our entry points: a bad flag is one line on stderr (`prog: error: ...`) and
    exit status 2, not the whole usage block above it (`--help` still prints that)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    """argparse type for flags that take an integer >= 1."""
    try:
        return _at_least_one(int(text))
    except ValueError as e:
        message = str(e) if "must be" in str(e) else f"expected an integer >= 1, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def add_q_tuning_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `--enable-q-tuning` and the `SETTINGS` flags in their own argument group; usable as
    Megatron-LM's `extra_args_provider`. Bad values fail at parse time naming the flag."""
    defaults = QTuningConfig()
    group = parser.add_argument_group(title="q-tuning", description="Q-Tuning joint sample and "
                                      "token pruning (arXiv 2509.23873)")
    group.add_argument("--enable-q-tuning", action="store_true",
                       help="Score every step's batch on the Error-Uncertainty plane and train only "
                            "on the kept samples/tokens.")
    for s in SETTINGS:
        group.add_argument(s.flag, type=s.argparse_type, default=getattr(defaults, s.field),
                           choices=s.choices, metavar=s.metavar, help=s.help)
    return parser
