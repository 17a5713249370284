"""The tokenized data set on disk: written once, loaded by later runs and the other ranks.

Public API:
    CACHE_VERSION
    cache_key(config, tokenizer) -> str
    cache_path(config, tokenizer) -> pathlib.Path
    save_cache(path, key, payload) -> None
    load_cache(path, key) -> payload | None

The key is a SHA-256 of everything the result depends on: the content of every data file (in
--data-path order), the tokenizer (its full serialisation: vocabulary, merges, normaliser, added
and special tokens), the chat template and --chat-template-kwargs, --data-format, --seq-length,
the transformers and tokenizers versions and CACHE_VERSION (this code's layout and rules). A
changed input gives another file name, so a stale entry is never found.

One file `<key>.qtdata`: a magic line, a JSON header line (the key, the payload's size and
SHA-256), then the payload (`torch.save` of plain tensors, lists and dicts, read back with
`weights_only=True`). It is written to a temporary file and renamed (`q_tuning._files`), and on
load the magic, key, size and hash are checked: a truncated, corrupt or foreign file gives None
(the caller rebuilds it and overwrites it), never a wrong data set.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pathlib
from typing import Any

import torch

from q_tuning._files import atomic_path
from q_tuning.sft.data.config import DataConfig
from q_tuning.sft.data.conversations import data_files

__all__ = ["CACHE_VERSION", "cache_key", "cache_path", "load_cache", "save_cache"]

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
_MAGIC = b"q_tuning tokenized data\n"


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(config: DataConfig, tokenizer) -> str:
    import tokenizers
    import transformers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; q_tuning needs one")
    parts = {
        "version": CACHE_VERSION,
        "files": [_file_digest(str(p)) for p in data_files(config.paths)],
        "tokenizer": hashlib.sha256(backend.to_str().encode()).hexdigest(),
        "special": sorted(map(str, tokenizer.special_tokens_map.items())),
        "template": tokenizer.chat_template,
        "kwargs": config.chat_template_kwargs,
        "format": config.data_format,
        "seq_length": config.seq_length,
        "libraries": [transformers.__version__, tokenizers.__version__],
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_path(config: DataConfig, tokenizer) -> pathlib.Path:
    if config.cache_dir is None:
        raise ValueError("no data cache folder configured")
    return pathlib.Path(config.cache_dir) / f"{cache_key(config, tokenizer)[:32]}.qtdata"


def save_cache(path: pathlib.Path, key: str, payload: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    header = {"key": key, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(_MAGIC)
        f.write(json.dumps(header).encode() + b"\n")
        f.write(data)


def load_cache(path: pathlib.Path, key: str) -> dict[str, Any] | None:
    """The payload, or None when the file is missing or not a whole, matching cache file."""
    try:
        with open(path, "rb") as f:
            if f.readline() != _MAGIC:
                return _invalid(path, "not a q_tuning data cache")
            header = json.loads(f.readline())
            data = f.read()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return _invalid(path, f"unreadable header ({err})")
    if not isinstance(header, dict) or header.get("key") != key:
        return _invalid(path, "written for other data or settings")
    if len(data) != header.get("size") or hashlib.sha256(data).hexdigest() != header["sha256"]:
        return _invalid(path, f"truncated or corrupt ({len(data)} of {header.get('size')} bytes)")
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as err:  # a payload torch cannot read is as bad as a truncated one
        return _invalid(path, f"unreadable payload ({err})")


def _invalid(path: pathlib.Path, why: str) -> None:
    logger.warning("data cache %s: %s; tokenizing again", path, why)
    return None
