"""The data settings of a run, validated in one place (at parse time for the trainer's flags).

Public API:
    DataConfig(paths, seq_length, data_format, strict, chat_template, chat_template_kwargs,
               tokenizer_workers, cache_dir)
    DataConfig.from_args(args) -> DataConfig
    DataConfig.options() -> dict               (keyword arguments of load_sft_samples)
    add_data_format_args(group) -> None        (the flags below, into an argparse group)
    template_kwargs_arg(text) -> dict          (argparse type of --chat-template-kwargs)
    apply_chat_template_override(tokenizer, path) -> None
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

from q_tuning.config import positive_int
from q_tuning.sft.data.formats import DATA_FORMATS
from q_tuning.sft.hf.assets import default_cache_dir

__all__ = ["DataConfig", "add_data_format_args", "apply_chat_template_override",
           "template_kwargs_arg"]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    paths: tuple[str, ...]
    seq_length: int
    data_format: str = "auto"
    strict: bool = False
    chat_template: str | None = None  # a Jinja file replacing the tokenizer's template
    chat_template_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    tokenizer_workers: int = 1
    cache_dir: str | None = None  # None: no cache (tokenize on every start)

    def __post_init__(self):
        if isinstance(self.paths, (str, pathlib.PurePath)):
            object.__setattr__(self, "paths", (str(self.paths),))
        object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
        seq = self.seq_length
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 2:
            raise ValueError(f"--seq-length must be an integer >= 2, got {seq!r}")
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"--data-format {self.data_format!r}: expected one of "
                             f"{', '.join(DATA_FORMATS)}")
        if not isinstance(self.chat_template_kwargs, Mapping):
            raise ValueError("--chat-template-kwargs must be a JSON object")
        workers = self.tokenizer_workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"--tokenizer-workers must be an integer >= 1, got {workers!r}")
        if self.chat_template is not None and not pathlib.Path(self.chat_template).is_file():
            raise ValueError(f"--chat-template {self.chat_template}: no such file")

    def options(self) -> dict[str, Any]:
        """The fields other than paths, seq_length and strict, as keyword arguments of
        `q_tuning.sft.data.dataset.load_sft_samples`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("paths", "seq_length", "strict")}

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DataConfig":
        return cls(paths=tuple(args.data_path or ()), seq_length=args.seq_length,
                   data_format=args.data_format, strict=args.strict_data,
                   chat_template=args.chat_template,
                   chat_template_kwargs=args.chat_template_kwargs or {},
                   tokenizer_workers=args.tokenizer_workers,
                   cache_dir=None if args.no_data_cache else _cache_dir(args))


def _cache_dir(args: argparse.Namespace) -> str:
    if args.data_cache_path:
        return args.data_cache_path
    output_dir = getattr(args, "output_dir", None)
    return str(pathlib.Path(output_dir) / "data_cache" if output_dir
               else default_cache_dir() / "data")


def add_data_format_args(group) -> None:
    """--data-format, --chat-template, --chat-template-kwargs, --tokenizer-workers,
    --data-cache-path (Megatron-LM's name), --no-data-cache."""
    group.add_argument("--data-format", choices=DATA_FORMATS, default="auto",
                       help="record format; auto: each record's keys tell (docs/data.md has the "
                            "table)")
    group.add_argument("--chat-template", default=None, metavar="PATH",
                       help="Jinja chat template file replacing the tokenizer's (used for the "
                            "data and saved with --export-hf)")
    group.add_argument("--chat-template-kwargs", type=template_kwargs_arg, default=None,
                       metavar="JSON",
                       help="JSON object of extra chat template arguments, e.g. "
                            "'{\"enable_thinking\": false}'; a record's own "
                            "'chat_template_kwargs' override them")
    group.add_argument("--tokenizer-workers", type=positive_int, default=1,
                       help="processes that tokenize the data on the first run")
    group.add_argument("--data-cache-path", default=None,
                       help="folder of the tokenized-data cache (default: <--output-dir>/"
                            "data_cache, without --output-dir $Q_TUNING_CACHE_DIR/data or "
                            "~/.cache/q_tuning/data); later runs with the same data, tokenizer, "
                            "template and --seq-length load it")
    group.add_argument("--no-data-cache", action="store_true",
                       help="tokenize on every start, on every rank, and write no cache")


def template_kwargs_arg(text: str) -> dict:
    """--chat-template-kwargs: a JSON object, e.g. '{"enable_thinking": false}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg} at column {e.colno}): {text!r}"
                                         ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def apply_chat_template_override(tokenizer, path: str | None) -> None:
    """--chat-template: the file's Jinja text becomes the tokenizer's chat template (for training
    and for everything the run renders later)."""
    if path is not None:
        tokenizer.chat_template = pathlib.Path(path).read_text(encoding="utf-8")
