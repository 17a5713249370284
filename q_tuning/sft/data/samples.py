"""Tokenized conversations -> training samples: truncation to --seq-length, the skip counts, and
the --strict-data error.

Public API:
    Sample(tokens, loss_mask, source, index, truncated)
    DataStats
    SKIP_NO_ASSISTANT, SKIP_BAD_RECORD, SKIP_TOO_LONG, TRUNCATED, EXAMPLES
    assemble(read, tokenized, seq_length) -> (list[Sample], DataStats, skipped)
    strict_error(skipped, files) -> DataError

The rules are listed in `q_tuning.sft.data.dataset`'s docstring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from q_tuning.sft.data.reader import ReadResult
from q_tuning.sft.data.conversations import DataError

__all__ = ["EXAMPLES", "SKIP_BAD_RECORD", "SKIP_NO_ASSISTANT", "SKIP_TOO_LONG", "TRUNCATED",
           "DataStats", "Sample", "assemble", "strict_error"]


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    tokens: torch.Tensor  # (T,) int64
    loss_mask: torch.Tensor  # (T,) int64, 0/1; 1 = token t is a training target
    source: str  # "file:line" of the JSONL record
    index: int  # position in the dataset (stable across epochs and resumes)
    truncated: bool = False


SKIP_NO_ASSISTANT = "no assistant turn"
SKIP_BAD_RECORD = "fits no format or breaks its format"
SKIP_TOO_LONG = "no assistant token within --seq-length"
TRUNCATED = "truncated to --seq-length"
EXAMPLES = 5  # file:line examples kept per kind


@dataclasses.dataclass(slots=True)
class DataStats:
    files: tuple[str, ...] = ()
    records: int = 0  # non-blank JSONL lines
    samples: int = 0  # kept
    skipped_no_assistant: int = 0
    truncated: int = 0  # kept, but cut to seq_length
    skipped_too_long: int = 0  # no target token within seq_length: dropped
    tokens: int = 0  # over kept samples, after truncation
    loss_tokens: int = 0
    # kind (SKIP_NO_ASSISTANT, SKIP_TOO_LONG, TRUNCATED) -> the first EXAMPLES "file:line"
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    skipped_bad_record: int = 0  # fits no format or breaks its file's format
    # file -> {format: records read in it}
    formats: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return self.skipped_no_assistant + self.skipped_too_long + self.skipped_bad_record

    def note(self, kind: str, source: str) -> None:
        first = self.examples.setdefault(kind, [])
        if len(first) < EXAMPLES:
            first.append(source)

    def summary(self, seq_length: int | None = None) -> str:
        limit = f" --seq-length {seq_length}" if seq_length is not None else " seq_length"
        formats = "; ".join(f"{f}: " + (", ".join(f"{n} {fmt}" for fmt, n in counts.items())
                                          or "no record in a known format")
                            for f, counts in self.formats.items())
        return (f"{self.samples} samples ({self.tokens} tokens, {self.loss_tokens} trained) from "
                f"{self.records} records in {len(self.files)} file(s)"
                f"{f' ({formats})' if formats else ''}; "
                f"{self.skipped_no_assistant} skipped (no assistant turn)"
                f"{self._where(SKIP_NO_ASSISTANT, self.skipped_no_assistant)}, "
                f"{self.skipped_bad_record} skipped ({SKIP_BAD_RECORD})"
                f"{self._where(SKIP_BAD_RECORD, self.skipped_bad_record)}, "
                f"{self.truncated} truncated to{limit}{self._where(TRUNCATED, self.truncated)}, "
                f"{self.skipped_too_long} skipped (no assistant token within{limit})"
                f"{self._where(SKIP_TOO_LONG, self.skipped_too_long)}")

    def _where(self, kind: str, count: int) -> str:
        first = self.examples.get(kind, [])
        if not count or not first:
            return ""
        more = f" and {count - len(first)} more" if count > len(first) else ""
        return f" [{', '.join(first)}{more}]"


Tokenized = tuple[np.ndarray, np.ndarray]  # (tokens, loss_mask) of one conversation


def assemble(read: ReadResult, tokenized: Sequence[Tokenized], seq_length: int
             ) -> tuple[list[Sample], DataStats, list[tuple[str, str]]]:
    """Samples in record order, the counts, and ("file:line", why) of every skipped record.

    A sample longer than seq_length keeps its first seq_length tokens (counted as truncated); one
    with no target token left is dropped (skipped_too_long).
    """
    stats = DataStats(files=tuple(f for f, _ in read.formats), records=read.records,
                      skipped_no_assistant=len(read.no_assistant),
                      skipped_bad_record=len(read.bad), formats=dict(read.formats))
    skipped = [(src, SKIP_NO_ASSISTANT) for src in read.no_assistant]
    for source in read.no_assistant:
        stats.note(SKIP_NO_ASSISTANT, source)
    for source, why in read.bad:
        stats.note(SKIP_BAD_RECORD, source)
        skipped.append((source, why))
    samples: list[Sample] = []
    for conv, (ids, mask) in zip(read.conversations, tokenized):
        truncated = len(ids) > seq_length
        if truncated:
            ids, mask = ids[:seq_length], mask[:seq_length]
            # mask[0] is never a target the trainer can use (it predicts tokens[1:])
            if not mask[1:].any():
                stats.skipped_too_long += 1
                stats.note(SKIP_TOO_LONG, conv.source)
                skipped.append((conv.source, f"{SKIP_TOO_LONG} {seq_length}"))
                continue
            stats.truncated += 1
            stats.note(TRUNCATED, conv.source)
        samples.append(Sample(torch.from_numpy(ids.astype(np.int64)),
                              torch.from_numpy(mask.astype(np.int64)), conv.source,
                              len(samples), truncated))
        stats.tokens += len(ids)
        stats.loss_tokens += int(mask.sum())
    stats.samples = len(samples)
    return samples, stats, skipped


def strict_error(skipped: list[tuple[str, str]], files: Sequence[str]) -> DataError:
    """One DataError for --strict-data: the first skipped record, then the first few."""
    skipped = sorted(skipped, key=lambda item: _source_order(item[0], files))
    first_source, reason = skipped[0]
    listed = "; ".join(f"{src} ({why})" for src, why in skipped[:EXAMPLES])
    more = f" and {len(skipped) - EXAMPLES} more" if len(skipped) > EXAMPLES else ""
    return DataError(f"{first_source}: {reason} (--strict-data: {len(skipped)} record(s) "
                     f"would be skipped: {listed}{more})")


def _source_order(source: str, files: Sequence[str]) -> tuple[int, int]:
    """Sort key of a "file:line" source: the file's position in --data-path, then the line."""
    path, _, line = source.rpartition(":")
    return (files.index(path) if path in files else len(files), int(line))
