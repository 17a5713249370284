"""Numbers from environment variables, checked with an error that names the variable.

Public API:
    env_number(name, default, *, parse=int, minimum=0, strict=False)
"""

from __future__ import annotations

import math
import os
from typing import Callable, TypeVar

__all__ = ["env_number"]

N = TypeVar("N", int, float)


def env_number(name: str, default: N, *, parse: Callable[[str], N] = int, minimum: N = 0,
               strict: bool = False) -> N:
    """`$name` parsed with `parse` (`default` when unset or empty); ValueError naming the
    variable unless it is a finite number >= `minimum` (> `minimum` when `strict`)."""
    text = os.environ.get(name, "")
    if not text.strip():
        return default
    try:
        value = parse(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < minimum \
            or (strict and value == minimum):
        kind = "an integer" if parse is int else "a number"
        raise ValueError(f"environment variable {name} must be {kind} "
                         f"{'>' if strict else '>='} {minimum}, got {text!r}")
    return value
