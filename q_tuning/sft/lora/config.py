"""The LoRA settings: the `--lora-*` flags and the one validated `LoRAConfig` they make.

Public API:
    TARGET_MODULES                the megatron linear layers an adapter can wrap
    LoRAConfig                    rank, alpha, dropout, target modules (checked in __post_init__)
    add_lora_args(parser)         the `--lora-*` flags in their own group
    check_lora_args(args)         ValueError naming the flag for a combination LoRA cannot run
    is_adapter_parameter(name)    whether a model parameter is an adapter's

Names and meaning follow Megatron-Bridge's `LoRA` (dim = rank, alpha, dropout, target_modules
with megatron names) and HF peft (`r`, `lora_alpha`, `lora_dropout`): the adapted layer computes
W x + (alpha / rank) * B A dropout(x), A [rank, in] and B [out, rank]. Torch is not imported
here, so the flags parse cheaply.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional

__all__ = ["ADAPTER_ATTR", "TARGET_MODULES", "LoRAConfig", "add_lora_args", "check_lora_args",
           "is_adapter_parameter"]

# megatron name -> parallel kind (column: output rows split over TP; row: input columns split)
TARGET_MODULES = {"linear_qkv": "column", "linear_proj": "row",
                  "linear_fc1": "column", "linear_fc2": "row"}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class LoRAConfig:
    """One run's adapters; `alpha` None means 2 x rank (LLaMA-Factory's default, the recipe the
    Q-Tuning paper trains with: rank 8, alpha 16)."""

    rank: int
    alpha: Optional[float] = None
    dropout: float = 0.0
    target_modules: tuple[str, ...] = tuple(TARGET_MODULES)

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"--lora-rank must be an integer >= 1 (0 turns LoRA off), got "
                             f"{self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"--lora-alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [m for m in self.target_modules if m not in TARGET_MODULES]
        if unknown or not self.target_modules:
            raise ValueError(f"--lora-target-modules: unknown {unknown or 'empty list'}; "
                             f"choose from {', '.join(TARGET_MODULES)}")
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError(f"--lora-target-modules lists a module twice: "
                             f"{list(self.target_modules)}")

    @property
    def scale(self) -> float:
        """alpha / rank, the factor on B A."""
        return self.effective_alpha / self.rank

    @property
    def effective_alpha(self) -> float:
        return float(2 * self.rank if self.alpha is None else self.alpha)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Optional["LoRAConfig"]:
        """The run's config, or None when --lora-rank is 0 (full fine-tuning)."""
        if args.lora_rank == 0:
            return None
        return cls(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                   target_modules=tuple(args.lora_target_modules))


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: LoRA off), got {text}")
    return value


def add_lora_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("LoRA (low-rank adapters; the base weights stay frozen)")
    g.add_argument("--lora-rank", type=_non_negative_int, default=0,
                   help="adapter rank R (Megatron-Bridge's dim); 0: full fine-tuning")
    g.add_argument("--lora-alpha", type=float, default=None,
                   help="scale alpha/R on B A; default 2 x R (LLaMA-Factory's default, the "
                        "paper's recipe: R 8, alpha 16)")
    g.add_argument("--lora-dropout", type=float, default=0.0,
                   help="dropout on the adapter's input (training only, as peft)")
    g.add_argument("--lora-target-modules", nargs="+", default=list(TARGET_MODULES),
                   metavar="MODULE", help=f"megatron linear layers to adapt: "
                                          f"{', '.join(TARGET_MODULES)}")
    g.add_argument("--export-lora", default=None, metavar="DIR",
                   help="write the trained adapters as an HF peft adapter (adapter_config.json, "
                        "adapter_model.safetensors) here at the end")


def check_lora_args(args: argparse.Namespace) -> None:
    """ValueError naming the flag for settings LoRA cannot honour (called at parse time)."""
    config = LoRAConfig.from_args(args) if args.lora_rank else None
    if config is None:
        for flag, value, default in (("--lora-alpha", args.lora_alpha, None),
                                     ("--lora-dropout", args.lora_dropout, 0.0),
                                     ("--export-lora", args.export_lora, None)):
            if value != default:
                raise ValueError(f"{flag} needs --lora-rank >= 1")
        if list(args.lora_target_modules) != list(TARGET_MODULES):
            raise ValueError("--lora-target-modules needs --lora-rank >= 1")
        return
    if args.sequence_parallel:
        raise ValueError("--lora-rank with --sequence-parallel: LoRA runs on megatron's local "
                         "layer spec, whose norm has no sequence parallelism")
    if args.context_parallel_size > 1:
        raise ValueError("--lora-rank with --context-parallel-size > 1: LoRA runs on megatron's "
                         "local layers, whose attention has no context parallelism")


ADAPTER_ATTR = "adapter"  # the adapted layer's child module: `<layer>.adapter.linear_{in,out}`


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter name (in a model chunk) is a LoRA adapter's (A or B)."""
    return f".{ADAPTER_ATTR}.linear_" in name
