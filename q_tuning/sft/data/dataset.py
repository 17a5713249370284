"""SFT data: JSONL conversations -> (tokens, loss_mask) samples, and a resumable shuffled dataset.

Public API:
    ROLES
    DataError
    Conversation(source, messages, tools, template_kwargs)
    Sample(tokens, loss_mask, source, index, truncated)
    DataStats
    DataConfig
    read_conversations(paths, data_format="auto") -> (list[Conversation], skipped)
    SKIP_NO_ASSISTANT, SKIP_BAD_RECORD, SKIP_TOO_LONG, TRUNCATED
    tokenize_conversation(tokenizer, messages, source=..., tools=..., template_kwargs=...)
        -> (tokens, loss_mask)
    load_sft_samples(paths, tokenizer, seq_length, *, strict=False, **options)
        -> (list[Sample], DataStats)
    SFTDataset(samples, seed=..., stats=None), SFTDataset.from_jsonl(paths, tokenizer, ...)

The pieces live in `q_tuning.sft.data`: the record formats (`formats`, `reader`), the loss masks
from the rendering of the whole conversation (`masks`), tokenizing in workers (`tokenizing`), the
on-disk cache (`cache`, `loading`); docs/data.md describes them for users.

Bad records, one rule each (`DataStats.summary` is logged at start-up and names the `file:line`
of the first few skipped or truncated records; `strict=True`, `--strict-data`, turns every skip
into a DataError naming them):
    malformed JSON, bytes that are not UTF-8, a content
    part that is not text, a chat template that fails
    on the record                                      rejected: DataError `file:line: ...`
    a record that fits no format, or breaks its
    format (a missing or mistyped field, an unknown
    role, an assistant turn first)                     skipped, counted (with the reason)
    no assistant turn                                  skipped, counted
    no assistant token within --seq-length (the
    response is empty after truncation)                skipped, counted
    longer than --seq-length, with an assistant
    token within it                                    truncated to --seq-length, kept, counted
    no record left to train on                         DataError (with the summary)
A rejected record means the file is damaged or holds what this trainer cannot represent, so
training on the rest would be training on something else; a skipped one has nothing to learn
from, or is not in a format it can be read in (listed with the reason).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from q_tuning.sft.data.config import DataConfig
from q_tuning.sft.data.conversations import ROLES, Conversation, DataError, render_chat
from q_tuning.sft.data.loading import load_samples
from q_tuning.sft.data.masks import tokenize_conversation
from q_tuning.sft.data.reader import read_conversations
from q_tuning.sft.data.samples import (EXAMPLES, SKIP_BAD_RECORD, SKIP_NO_ASSISTANT,
                                       SKIP_TOO_LONG, TRUNCATED, DataStats, Sample)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["EXAMPLES", "ROLES", "SKIP_BAD_RECORD", "SKIP_NO_ASSISTANT", "SKIP_TOO_LONG",
           "TRUNCATED", "Conversation", "DataConfig", "DataError", "DataStats", "SFTDataset",
           "Sample", "load_sft_samples", "read_conversations", "render_chat",
           "tokenize_conversation"]

Paths = str | os.PathLike | Sequence[str | os.PathLike]


def load_sft_samples(paths: Paths, tokenizer: "PreTrainedTokenizerBase", seq_length: int, *,
                     strict: bool = False, **options) -> tuple[list[Sample], DataStats]:
    """Read, tokenize and truncate to `seq_length` tokens; logs and returns the counts.

    `options` are the other `DataConfig` fields (data_format, chat_template,
    chat_template_kwargs, tokenizer_workers, cache_dir: None by default, so nothing is cached).
    The module docstring's rules: with `strict`, any skipped record raises a DataError naming it
    (after reading everything, so the message counts them all).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    config = DataConfig(tuple(str(p) for p in paths), seq_length, strict=strict, **options)
    return load_samples(config, tokenizer)


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
    def from_jsonl(cls, paths: Paths, tokenizer: "PreTrainedTokenizerBase", *, seq_length: int,
                   seed: int, strict: bool = False, **options) -> "SFTDataset":
        """`load_sft_samples` (options: the other DataConfig fields) in a dataset."""
        samples, stats = load_sft_samples(paths, tokenizer, seq_length, strict=strict, **options)
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
