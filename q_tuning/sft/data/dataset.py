"""SFT data: JSONL conversations -> (tokens, loss_mask) samples, and a resumable shuffled dataset.

Public API:
    ROLES
    DataError
    Conversation(source, messages)
    Sample(tokens, loss_mask, source, index, truncated)
    DataStats
    read_conversations(paths) -> (list[Conversation], skipped_no_assistant)
    SKIP_NO_ASSISTANT, SKIP_TOO_LONG, TRUNCATED
    tokenize_conversation(tokenizer, messages, source=...) -> (tokens, loss_mask)
    load_sft_samples(paths, tokenizer, seq_length, *, strict=False) -> (list[Sample], DataStats)
    SFTDataset(samples, seed=..., stats=None), SFTDataset.from_jsonl(paths, tokenizer, ...)

Reading the JSONL records and tokenizing them through the chat template (the input format and
the loss-mask convention) are in `q_tuning.sft.data.conversations`; its names are re-exported here.

Bad records, one rule each (`DataStats.summary` is logged at start-up and names the `file:line`
of the first few skipped or truncated records; `strict=True`, `--strict-data`, turns every skip
into a DataError naming them):
    malformed JSON, bytes that are not UTF-8, a record that is not an object, a missing or
    mistyped field, an unknown role, an assistant turn first,
    a chat template that fails on the record          rejected: DataError `file:line: ...`
    no assistant turn                                  skipped, counted
    no assistant token within --seq-length (the
    response is empty after truncation)                skipped, counted
    longer than --seq-length, with an assistant
    token within it                                    truncated to --seq-length, kept, counted
    no record left to train on                         DataError (with the summary)
A rejected record means the file is not what the run assumes (wrong format, encoding or schema),
so training on the rest would be training on something else; a skipped one is well-formed but
has nothing to learn from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from q_tuning.sft.data.conversations import (ROLES, Conversation, DataError, data_files,
                                          read_conversation_files, read_conversations,
                                          render_chat, tokenize_conversation)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = ["EXAMPLES", "ROLES", "SKIP_NO_ASSISTANT", "SKIP_TOO_LONG", "TRUNCATED", "Conversation",
           "DataError", "DataStats", "SFTDataset", "Sample", "load_sft_samples",
           "read_conversations", "render_chat", "tokenize_conversation"]


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    tokens: torch.Tensor  # (T,) int64
    loss_mask: torch.Tensor  # (T,) int64, 0/1; 1 = token t is a training target
    source: str  # "file:line" of the JSONL record
    index: int  # position in the dataset (stable across epochs and resumes)
    truncated: bool = False


SKIP_NO_ASSISTANT = "no assistant turn"
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

    @property
    def skipped(self) -> int:
        return self.skipped_no_assistant + self.skipped_too_long

    def note(self, kind: str, source: str) -> None:
        first = self.examples.setdefault(kind, [])
        if len(first) < EXAMPLES:
            first.append(source)

    def summary(self, seq_length: int | None = None) -> str:
        limit = f" --seq-length {seq_length}" if seq_length is not None else " seq_length"
        return (f"{self.samples} samples ({self.tokens} tokens, {self.loss_tokens} trained) from "
                f"{self.records} records in {len(self.files)} file(s); "
                f"{self.skipped_no_assistant} skipped (no assistant turn)"
                f"{self._where(SKIP_NO_ASSISTANT, self.skipped_no_assistant)}, "
                f"{self.truncated} truncated to{limit}{self._where(TRUNCATED, self.truncated)}, "
                f"{self.skipped_too_long} skipped (no assistant token within{limit})"
                f"{self._where(SKIP_TOO_LONG, self.skipped_too_long)}")

    def _where(self, kind: str, count: int) -> str:
        first = self.examples.get(kind, [])
        if not count or not first:
            return ""
        more = f" and {count - len(first)} more" if count > len(first) else ""
        return f" [{', '.join(first)}{more}]"


def load_sft_samples(paths: str | os.PathLike | Sequence[str | os.PathLike],
                     tokenizer: "PreTrainedTokenizerBase", seq_length: int, *,
                     strict: bool = False) -> tuple[list[Sample], DataStats]:
    """Read, tokenize and truncate to `seq_length` tokens; logs and returns the counts.

    The module docstring's rules: a sample longer than seq_length keeps its first seq_length
    tokens (counted as truncated); one with no target token left is dropped (counted as
    skipped_too_long); one without an assistant turn is dropped (skipped_no_assistant). With
    `strict`, any dropped record raises a DataError naming it (after reading everything, so the
    message counts them all).
    """
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 2:
        raise ValueError(f"--seq-length must be an integer >= 2, got {seq_length!r}")
    conversations, no_assistant = read_conversation_files(paths)
    stats = DataStats(files=tuple(str(p) for p in data_files(paths)),
                      skipped_no_assistant=len(no_assistant))
    for source in no_assistant:
        stats.note(SKIP_NO_ASSISTANT, source)
    stats.records = len(conversations) + len(no_assistant)
    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = [(src, SKIP_NO_ASSISTANT) for src in no_assistant]
    for conv in conversations:
        tokens, loss_mask = tokenize_conversation(tokenizer, conv.messages, source=conv.source)
        truncated = len(tokens) > seq_length
        if truncated:
            tokens, loss_mask = tokens[:seq_length], loss_mask[:seq_length]
            # mask[0] is never a target the trainer can use (it predicts tokens[1:])
            if not bool(loss_mask[1:].any()):
                stats.skipped_too_long += 1
                stats.note(SKIP_TOO_LONG, conv.source)
                skipped.append((conv.source, f"{SKIP_TOO_LONG} {seq_length}"))
                continue
            stats.truncated += 1
            stats.note(TRUNCATED, conv.source)
        samples.append(Sample(tokens, loss_mask, conv.source, len(samples), truncated))
        stats.tokens += len(tokens)
        stats.loss_tokens += int(loss_mask.sum())
    stats.samples = len(samples)
    if strict and skipped:
        skipped.sort(key=lambda item: _source_order(item[0], stats.files))
        first_source, reason = skipped[0]
        listed = "; ".join(f"{src} ({why})" for src, why in skipped[:EXAMPLES])
        more = f" and {len(skipped) - EXAMPLES} more" if len(skipped) > EXAMPLES else ""
        raise DataError(f"{first_source}: {reason} (--strict-data: {len(skipped)} record(s) "
                        f"would be skipped: {listed}{more})")
    logger.info("data: %s", stats.summary(seq_length))
    if not samples:
        raise DataError(f"no trainable sample in {', '.join(stats.files)}: "
                        f"{stats.summary(seq_length)}")
    return samples, stats


def _source_order(source: str, files: Sequence[str]) -> tuple[int, int]:
    """Sort key of a "file:line" source: the file's position in --data-path, then the line."""
    path, _, line = source.rpartition(":")
    return (files.index(path) if path in files else len(files), int(line))


# ----------------------------------------------------------------------------- dataset

class SFTDataset:
    """Samples in a deterministic per-epoch order, with a resumable position.

    Order: epoch e visits the samples in `permutation(e)`, a torch.randperm drawn from a
    generator seeded by a hash of (seed, e), so it depends on nothing but the seed and epoch.
    Position (epoch, index): the next sample is permutation(epoch)[index]; `state_dict()` /
    `load_state_dict()` save and restore it (with the seed and dataset size, checked on load).

    Two ways to draw, both advancing the same position:
    - `next_global_batch(n)`: n samples of one epoch. drop_last per epoch: when fewer than n
      samples remain in the epoch they are skipped and the batch starts the next epoch, so each
      epoch gives len(self) // n batches and a global batch never spans two epochs.
    - `next_samples(n)`: the next n samples, continuing into the next epoch if this one ends
      (for the 'refill' batch policy, which tops a pruned batch up with fresh samples).
    """

    def __init__(self, samples: Sequence[Sample], *, seed: int, stats: DataStats | None = None):
        if not samples:
            raise ValueError("SFTDataset needs at least one sample")
        self.samples = list(samples)
        self.seed = int(seed)
        self.stats = stats
        self._epoch = 0
        self._index = 0
        self._perm_epoch: int | None = None
        self._perm: list[int] = []

    @classmethod
    def from_jsonl(cls, paths: str | os.PathLike | Sequence[str | os.PathLike],
                   tokenizer: "PreTrainedTokenizerBase", *, seq_length: int,
                   seed: int, strict: bool = False) -> "SFTDataset":
        samples, stats = load_sft_samples(paths, tokenizer, seq_length, strict=strict)
        return cls(samples, seed=seed, stats=stats)

    def digest(self) -> str:
        """A short hash of what the samples are (source, length, target count, in order), for
        checking that every rank read the same data."""
        h = hashlib.sha256()
        for s in self.samples:
            h.update(f"{s.source}|{len(s.tokens)}|{int(s.loss_mask.sum())}\n".encode())
        return h.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def index(self) -> int:
        return self._index

    def permutation(self, epoch: int) -> list[int]:
        """Sample indices in the order epoch `epoch` visits them."""
        if epoch != self._perm_epoch:
            digest = hashlib.sha256(f"q_tuning.data:{self.seed}:{epoch}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            self._perm = torch.randperm(len(self.samples), generator=generator).tolist()
            self._perm_epoch = epoch
        return self._perm

    def batches_per_epoch(self, global_batch_size: int) -> int:
        self._check_batch_size(global_batch_size)
        return len(self.samples) // global_batch_size

    def next_global_batch(self, global_batch_size: int) -> list[Sample]:
        self._check_batch_size(global_batch_size)
        if self._index + global_batch_size > len(self.samples):  # drop_last
            self._epoch, self._index = self._epoch + 1, 0
        return self.next_samples(global_batch_size)

    def next_samples(self, n: int) -> list[Sample]:
        if n < 0:
            raise ValueError(f"next_samples: n must be >= 0, got {n}")
        out = []
        while len(out) < n:
            perm = self.permutation(self._epoch)
            take = min(n - len(out), len(perm) - self._index)
            out.extend(self.samples[i] for i in perm[self._index:self._index + take])
            self._index += take
            if self._index == len(perm):
                self._epoch, self._index = self._epoch + 1, 0
        return out

    def global_batches(self, global_batch_size: int) -> Iterator[list[Sample]]:
        """Endless iterator of `next_global_batch(global_batch_size)`; the caller stops it."""
        self._check_batch_size(global_batch_size)
        while True:
            yield self.next_global_batch(global_batch_size)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "index": self._index, "seed": self.seed,
                "num_samples": len(self.samples)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"the checkpoint's data order was drawn with --seed {state['seed']}, "
                             f"this run has --seed {self.seed}; resume with the same seed")
        num_samples = state.get("num_samples", len(self.samples))
        if int(num_samples) != len(self.samples):
            raise ValueError(f"the checkpoint was trained on {num_samples} samples, --data-path "
                             f"now gives {len(self.samples)}; resume with the same data and "
                             "--seq-length")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= len(self.samples):
            raise ValueError(f"invalid data position epoch={epoch} index={index} "
                             f"for {len(self.samples)} samples")
        self._epoch, self._index = epoch, index

    def _check_batch_size(self, global_batch_size: int) -> None:
        if not 1 <= global_batch_size <= len(self.samples):
            raise ValueError(f"--global-batch-size {global_batch_size} must be in "
                             f"[1, {len(self.samples)}] (the number of training samples)")
