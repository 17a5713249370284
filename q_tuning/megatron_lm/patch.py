"""`install()`: the two patches that put Q-Tuning into Megatron-LM's own training loop.

Megatron-LM has no per-step hook, so `install()` replaces two functions (a marker attribute and
`__wrapped__` on each, one log line each). The hook points are found by what the running
Megatron-LM has, not by its version number:
- `parse_args`, owned by `megatron.training.arguments` in every tested version. Modules that hold
  it by name are patched too where they have it: `megatron.training.initialize` up to core_v0.16.x
  (its `initialize_megatron` parses), not core_v0.19.0 (`pretrain_gpt.py` calls
  `arguments.parse_and_validate_args`, which calls `parse_args` by module-global name). The wrapper
  adds the Q-Tuning flags to whatever `extra_args_provider` the script passes and, with
  `--enable-q-tuning`, turns on `--calculate-per-token-loss` before Megatron validates the args;
- `megatron.training.training.get_forward_backward_func`: `train()` takes from it the function
  `train_step` calls once per step; with `--enable-q-tuning` that function prunes each training
  step's batch before running it (`step.QTuningStep`). Evaluation passes through untouched.
A missing hook point is a start-up error naming the symbol and the versions tested, never a run
without Q-Tuning.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import runpy
import sys
from typing import Any, Callable

from q_tuning.config import add_q_tuning_args
from q_tuning.megatron_lm.step import MARKER, QTuningStep, check_supported, log_rank_0


@dataclasses.dataclass(frozen=True)
class KnownVersion:
    """A Megatron-LM version the adapter is tested with and the megatron-core it carries."""
    megatron_lm: str
    megatron_core: str


TESTED = (
    KnownVersion("core_v0.16.1", "0.16.1"),
    KnownVersion("1dcf0dafa884 (slime's pin)", "0.16.0rc0"),
    KnownVersion("core_v0.19.0", "0.19.1"),
)
ARGUMENTS, INITIALIZE, TRAINING = (f"megatron.training.{m}"
                                   for m in ("arguments", "initialize", "training"))
# Modules that may hold `parse_args` by name (patched where they do): Megatron-LM <= core_v0.16.x.
PARSE_ARGS_HOLDERS = (INITIALIZE,)
STEP = QTuningStep()


def tested_versions() -> str:
    return ", ".join(f"{t.megatron_lm} (megatron-core {t.megatron_core})" for t in TESTED)


def installed() -> bool:
    """Whether `install()` has patched Megatron-LM in this process."""
    training = sys.modules.get(TRAINING)
    patched = getattr(training, "get_forward_backward_func", None)
    return bool(getattr(patched, MARKER, False))


def install() -> None:
    """Patch Megatron-LM's argument parser and training step for Q-Tuning (see module doc).

    Call it once per process before `pretrain(...)` (again is a no-op). Raises ImportError when
    Megatron-LM's `megatron.training` cannot be imported, RuntimeError when a hook point is missing
    (naming the symbol, the megatron-core version found and the versions tested).
    """
    modules = _megatron_training_modules()
    if installed():
        return
    version = megatron_core_version()
    if version not in {t.megatron_core for t in TESTED}:
        log_rank_0(f"note: tested with Megatron-LM {tested_versions()}; found megatron-core "
                   f"{version}")
    original_parse = hook_point(modules[ARGUMENTS], "parse_args", version)
    original_step = hook_point(modules[TRAINING], "get_forward_backward_func", version)
    parse_args = _wrap_parse_args(original_parse)
    patched = [ARGUMENTS] + [name for name in PARSE_ARGS_HOLDERS
                             if getattr(modules[name], "parse_args", None) is original_parse]
    for name in patched:
        setattr(modules[name], "parse_args", parse_args)
    log_rank_0(f"patched {' and '.join(f'{m}.parse_args' for m in patched)}: adds the "
               "--q-tuning-* flags")
    modules[TRAINING].get_forward_backward_func = _wrap_get_forward_backward_func(original_step)
    log_rank_0(f"patched {TRAINING}.get_forward_backward_func: prunes each training step when "
               "--enable-q-tuning is set")


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
    STEP.say_once("per-token", "--enable-q-tuning turns on --calculate-per-token-loss: each "
                  "step's loss is the mean over all its kept tokens")


def _wrap_get_forward_backward_func(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_forward_backward_func(*args, **kwargs):
        return STEP.wrap(original(*args, **kwargs))

    setattr(get_forward_backward_func, MARKER, True)
    return get_forward_backward_func


# --- finding Megatron-LM -------------------------------------------------------------------------

def _megatron_training_modules() -> dict[str, Any]:
    try:
        from megatron.training import arguments, initialize, training
    except ImportError as e:
        raise ImportError(
            f"q_tuning.megatron_lm needs Megatron-LM's megatron.training (tested: "
            f"{tested_versions()}), which is not on PyPI: run from a Megatron-LM checkout or put "
            f"it on PYTHONPATH ({e})") from e
    return {ARGUMENTS: arguments, INITIALIZE: initialize, TRAINING: training}


def megatron_core_version() -> str:
    try:
        from megatron.core.package_info import __version__
    except ImportError:
        return "unknown"
    return __version__


def hook_point(module: Any, name: str, version: str) -> Callable:
    """`module.name`, or a RuntimeError naming it, the version found and the versions tested."""
    value = getattr(module, name, None)
    if not callable(value):
        raise RuntimeError(f"q_tuning.megatron_lm expected {module.__name__}.{name}; not found "
                           f"with megatron-core {version} (tested: Megatron-LM "
                           f"{tested_versions()}). Q-Tuning cannot hook into this Megatron-LM.")
    return value
