"""Files written whole or not at all: a temporary file beside the target, renamed into place."""

from __future__ import annotations

import contextlib
import os
import pathlib
import uuid
from typing import Iterable, Iterator, Union


@contextlib.contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[pathlib.Path]:
    """A temporary path beside `path` (its folder created) to write to; renamed to `path` when
    the block ends, removed if it raises, so readers never see a half-written file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Union[str, os.PathLike], text: Union[str, Iterable[str]]) -> None:
    """Write `text` (a string, or strings one after another) to `path` atomically, UTF-8."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        if isinstance(text, str):
            f.write(text)
        else:
            f.writelines(text)
