"""Pieces the benchmark scripts share (run them from the repository root; tests never time)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def on_path() -> None:
    """Put the repository root on sys.path so that `q_tuning` and `tests.harness` import."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)


def dispatch(args: argparse.Namespace, child: Callable[[], None], sweep: Callable[[], None],
             compare: Callable[[], None]) -> None:
    """The memory-measuring child process (`--child`), a `--sweep`, or the side-by-side run."""
    if args.child:
        child()
    elif args.sweep:
        sweep()
    else:
        compare()


def print_table_header(*columns: str) -> None:
    """A markdown table's header and separator lines."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
