"""Q-Tuning for unmodified Megatron-LM scripts (`pretrain_gpt.py`, its `--sft` mode, forks of it).

Public API:
    python -m q_tuning.megatron_lm SCRIPT [SCRIPT FLAGS...]   (under torchrun)
        Runs SCRIPT as `__main__` after `install()`: its own flags plus ours
        (`--enable-q-tuning --q-tuning-sample-keep-ratio 0.25 ...`), nothing to edit.
    install() -> None
        For scripts you edit: call it before `pretrain(...)`. Idempotent, never applied on import.
    installed() -> bool
    add_q_tuning_args(parser) -> parser
        Megatron-LM's `extra_args_provider` signature; `install()` adds the flags by itself, so
        passing it to `pretrain(..., extra_args_provider=add_q_tuning_args)` is optional.

Tested with Megatron-LM tag `core_v0.16.1` (megatron-core 0.16.1). Megatron-LM has no per-step
hook, so `install()` replaces two symbols (a marker attribute and `__wrapped__` on each, one log
line each):
- `megatron.training.initialize.parse_args` (and `megatron.training.arguments.parse_args`): adds
  the Q-Tuning flags to whatever `extra_args_provider` the script passes, and with
  `--enable-q-tuning` turns on `--calculate-per-token-loss` (the loss of a pruned step is then the
  mean over its kept tokens; see step.py);
- `megatron.training.training.get_forward_backward_func`: `train()` takes from it the function
  `train_step` calls once per step; with `--enable-q-tuning` that function prunes each training
  step's batch before running it (`step.QTuningStep`). Evaluation passes through untouched.
Without `--enable-q-tuning` both patches hand back Megatron-LM's own objects: the run is unchanged.
With it, a configuration the adapter cannot honour (`step.unsupported_reason`) stops the run at
start-up on every rank (`step.UnsupportedConfiguration`, naming the setting and the fix); it never
trains without Q-Tuning.
"""

from __future__ import annotations

import functools
import os
import runpy
import sys
from typing import Any, Callable

from q_tuning.config import add_q_tuning_args
from q_tuning.megatron_lm.step import (MARKER, QTuningStep, UnsupportedConfiguration,
                                       check_supported, log_rank_0)

__all__ = ["UnsupportedConfiguration", "add_q_tuning_args", "install", "installed", "main"]

TESTED_MEGATRON_CORE = ("0.16.1",)
_STEP = QTuningStep()


def installed() -> bool:
    """Whether `install()` has patched Megatron-LM in this process."""
    training = sys.modules.get("megatron.training.training")
    patched = getattr(training, "get_forward_backward_func", None)
    return bool(getattr(patched, MARKER, False))


def install() -> None:
    """Patch Megatron-LM's argument parser and training step for Q-Tuning (see module doc).

    Call it once per process before `pretrain(...)` (again is a no-op). Raises ImportError when
    Megatron-LM's `megatron.training` cannot be imported, RuntimeError when a symbol it patches is
    missing (naming the symbol and the megatron-core version found).
    """
    arguments, initialize, training = _megatron_training_modules()
    version = _megatron_version()
    if installed():
        return
    if version not in TESTED_MEGATRON_CORE:
        log_rank_0(f"note: tested with Megatron-LM core_v{TESTED_MEGATRON_CORE[0]}; found "
                   f"megatron-core {version}")
    parse_args = _wrap_parse_args(_symbol(initialize, "parse_args", version))
    for module in (arguments, initialize):
        setattr(module, "parse_args", parse_args)
    log_rank_0("patched megatron.training.initialize.parse_args: adds the --q-tuning-* flags")
    training.get_forward_backward_func = _wrap_get_forward_backward_func(
        _symbol(training, "get_forward_backward_func", version))
    log_rank_0("patched megatron.training.training.get_forward_backward_func: prunes each "
               "training step when --enable-q-tuning is set")


def main(argv: list[str] | None = None) -> None:
    """`python -m q_tuning.megatron_lm SCRIPT [FLAGS...]`: install, then run SCRIPT as __main__."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: torchrun [TORCHRUN FLAGS] -m q_tuning.megatron_lm SCRIPT.py [SCRIPT FLAGS] "
              "--enable-q-tuning [--q-tuning-* FLAGS]\n"
              "Runs an unmodified Megatron-LM training script (e.g. pretrain_gpt.py) with "
              "Q-Tuning.")
        raise SystemExit(0 if argv else 2)
    script = os.path.abspath(argv[0])
    if not os.path.isfile(script):
        raise SystemExit(f"q_tuning.megatron_lm: no script {argv[0]!r}")
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(script))  # as `python SCRIPT` does: its checkout first
    install()
    runpy.run_path(script, run_name="__main__")


# --- the patches ---------------------------------------------------------------------------------

def _wrap_parse_args(original: Callable) -> Callable:
    @functools.wraps(original)
    def parse_args(extra_args_provider=None, ignore_unknown_args=False):
        def provider(parser):
            if extra_args_provider is not None:
                parser = extra_args_provider(parser)
            if "--enable-q-tuning" not in parser._option_string_actions:  # user passed ours too
                parser = add_q_tuning_args(parser)
            return parser

        args = original(provider, ignore_unknown_args)
        if getattr(args, "enable_q_tuning", False):
            check_supported(args)  # every rank parses: every rank stops, before any training
            _enable_per_token_loss(args)
        return args

    setattr(parse_args, MARKER, True)
    return parse_args


def _enable_per_token_loss(args: Any) -> None:
    if args.calculate_per_token_loss:
        return
    args.calculate_per_token_loss = True
    _STEP.say_once("per-token", "--enable-q-tuning turns on --calculate-per-token-loss: each "
                   "step's loss is the mean over all its kept tokens")


def _wrap_get_forward_backward_func(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_forward_backward_func(*args, **kwargs):
        return _STEP.wrap(original(*args, **kwargs))

    setattr(get_forward_backward_func, MARKER, True)
    return get_forward_backward_func


# --- finding Megatron-LM -------------------------------------------------------------------------

def _megatron_training_modules():
    try:
        from megatron.training import arguments, initialize, training
    except ImportError as e:
        raise ImportError(
            "q_tuning.megatron_lm needs Megatron-LM's megatron.training (tested: tag core_v"
            f"{TESTED_MEGATRON_CORE[0]}), which is not on PyPI: run from a Megatron-LM checkout "
            f"or put it on PYTHONPATH ({e})") from e
    return arguments, initialize, training


def _megatron_version() -> str:
    try:
        from megatron.core.package_info import __version__
    except ImportError:
        return "unknown"
    return __version__


def _symbol(module: Any, name: str, version: str) -> Callable:
    value = getattr(module, name, None)
    if not callable(value):
        raise RuntimeError(f"q_tuning.megatron_lm expected {module.__name__}.{name} (Megatron-LM "
                           f"core_v{TESTED_MEGATRON_CORE[0]}); not found with megatron-core "
                           f"{version}")
    return value
