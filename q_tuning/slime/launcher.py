"""`python -m q_tuning.slime SCRIPT <slime flags> [--enable-q-tuning --q-tuning-...]`

Runs slime's own training script (train.py, train_async.py, or yours) unchanged, with runpy, after
wrapping `slime.utils.arguments.parse_args` so that:
- `--enable-q-tuning` and every `--q-tuning-*` flag are registered with slime's parser (through
  its `add_custom_arguments` parameter, composed with the caller's own), so they parse, validate
  at parse time and show in the script's `--help`;
- with `--enable-q-tuning`: `--rollout-data-postprocess-path` becomes `q_tuning.slime.postprocess`
  and a user hook given there is kept in `args.q_tuning_postprocess_chain` (run after ours; args
  travel to slime's Ray actors with it); `check_args` runs in the driver, so a refused setting
  stops the job before any Ray actor starts; the settings used are printed once;
- without `--enable-q-tuning` the returned args are slime's own (plus the flags' defaults).

The script must take `parse_args` from `slime.utils.arguments` (slime's train.py and
train_async.py do: `from slime.utils.arguments import parse_args`, bound when the script runs,
i.e. after the wrap).
"""

from __future__ import annotations

import argparse
import functools
import os
import runpy
import sys
from typing import Any, Callable, Sequence

from q_tuning.config import add_q_tuning_args
from q_tuning.slime.hook import CHAIN_KEY, HOOK_PATH, check_args, describe

USAGE = ("python -m q_tuning.slime SCRIPT [slime flags] [--enable-q-tuning --q-tuning-...]\n\n"
         "Runs slime's SCRIPT (e.g. train.py) unchanged, with Q-Tuning's flags registered with "
         "slime's parser and q_tuning.slime.postprocess installed as "
         "--rollout-data-postprocess-path (a hook of yours given there runs after it). Without "
         "--enable-q-tuning nothing changes. See docs/slime.md.")

_ORIGINAL_ATTR = "_q_tuning_original_parse_args"


def help_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m q_tuning.slime", usage=USAGE,
                                     add_help=True)
    add_q_tuning_args(parser)
    return parser


def with_q_tuning_args(add_custom_arguments: Callable | None) -> Callable:
    """slime's `add_custom_arguments` hook: the caller's own (if any), then ours."""

    def add(parser):
        if add_custom_arguments is not None:
            parser = add_custom_arguments(parser) or parser
        if not any("--enable-q-tuning" in a.option_strings for a in parser._actions):
            add_q_tuning_args(parser)
        return parser

    return add


def configure(args: Any) -> Any:
    """Install the hook (chaining the user's) and validate; a no-op without --enable-q-tuning."""
    if not getattr(args, "enable_q_tuning", False):
        return args
    user = getattr(args, "rollout_data_postprocess_path", None)
    if user and user != HOOK_PATH:
        if getattr(args, CHAIN_KEY, None) not in (None, user):
            raise ValueError(f"{CHAIN_KEY} is set to {getattr(args, CHAIN_KEY)} and "
                             f"--rollout-data-postprocess-path to {user}: give one of them")
        setattr(args, CHAIN_KEY, user)
    args.rollout_data_postprocess_path = HOOK_PATH
    config = check_args(args)
    if int(os.environ.get("RANK", "0")) == 0:
        chain = getattr(args, CHAIN_KEY, None)
        print(describe(config) + (f" then {chain}" if chain else ""), flush=True)
    return args


def wrap_parse_args(parse_args: Callable) -> Callable:
    """slime's `parse_args(add_custom_arguments=None)`, with our flags and `configure`."""
    if getattr(parse_args, _ORIGINAL_ATTR, None) is not None:
        return parse_args

    @functools.wraps(parse_args)
    def wrapped(add_custom_arguments=None, *a, **kw):
        return configure(parse_args(with_q_tuning_args(add_custom_arguments), *a, **kw))

    setattr(wrapped, _ORIGINAL_ATTR, parse_args)
    return wrapped


def install(arguments_module: Any = None) -> Any:
    """Wrap `parse_args` of slime's `slime.utils.arguments` (or of `arguments_module`)."""
    if arguments_module is None:
        import slime.utils.arguments as arguments_module  # slime is imported only here
    arguments_module.parse_args = wrap_parse_args(arguments_module.parse_args)
    return arguments_module


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        help_parser().print_help()
        return 0
    script, rest = argv[0], argv[1:]
    if not os.path.isfile(script):
        print(f"python -m q_tuning.slime: {script}: no such script\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        install()
    except ImportError as e:
        print(f"python -m q_tuning.slime: slime is not importable ({e}); install slime, or use "
              "the hook route (docs/slime.md)", file=sys.stderr)
        return 2
    sys.argv = [script, *rest]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    return 0
