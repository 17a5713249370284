"""Data settings + tokenizer -> training samples: read, tokenize (in workers, with a progress bar),
truncate, count; through the on-disk cache when one is configured.

Public API:
    load_samples(config, tokenizer, *, progress=None) -> (list[Sample], DataStats)
    prepare_cache(config, tokenizer, *, progress=None) -> pathlib.Path
    prepare_on_node_leaders(config, tokenizer) -> None      (collective)

`prepare_on_node_leaders` is how a distributed run tokenizes once: the lowest rank of each host
builds the cache (or finds it valid) while the others wait, then every rank calls `load_samples`,
which reads it. A --strict-data error and the "no trainable sample" error are raised by
`load_samples` on every rank alike, from the cached skip list.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import numpy as np
import torch

from q_tuning.parallel import comm
from q_tuning.sft.data.cache import cache_key, cache_path, load_cache, save_cache
from q_tuning.sft.data.config import DataConfig, apply_chat_template_override
from q_tuning.sft.data.reader import read_conversation_files
from q_tuning.sft.data.samples import (EXAMPLES, SKIP_NO_ASSISTANT, SKIP_TOO_LONG, DataStats,
                                       Sample, assemble, strict_error)
from q_tuning.sft.data.tokenizing import tokenize_all
from q_tuning.sft.data.conversations import DataError

__all__ = ["load_samples", "prepare_cache", "prepare_on_node_leaders"]

logger = logging.getLogger(__name__)

Built = tuple[list[Sample], DataStats, list[tuple[str, str]]]


def load_samples(config: DataConfig, tokenizer, *, progress: bool | None = None
                 ) -> tuple[list[Sample], DataStats]:
    """The run's samples and counts (logged); DataError under --strict-data for any skipped
    record, and when no sample is left. `progress` None: a bar on global rank 0 only."""
    apply_chat_template_override(tokenizer, config.chat_template)
    built = None
    if config.cache_dir is not None:
        path, key = cache_path(config, tokenizer), cache_key(config, tokenizer)
        payload = load_cache(path, key)
        if payload is not None:
            built = _from_payload(payload)
            logger.info("data: loaded the tokenized data from %s", path)
        else:
            built = _build(config, tokenizer, progress)
            save_cache(path, key, _to_payload(built))
            logger.info("data: tokenized data cached in %s", path)
    samples, stats, skipped = built or _build(config, tokenizer, progress)
    if config.strict and skipped:
        raise strict_error(skipped, stats.files)
    logger.info("data: %s", stats.summary(config.seq_length))
    unread = [item for item in skipped
              if not item[1].startswith((SKIP_NO_ASSISTANT, SKIP_TOO_LONG))]
    for source, why in unread[:EXAMPLES]:
        logger.warning("data: %s skipped: %s", source, why)
    if not samples:
        raise DataError(f"no trainable sample in {', '.join(stats.files)}: "
                        f"{stats.summary(config.seq_length)}")
    return samples, stats


def prepare_cache(config: DataConfig, tokenizer, *, progress: bool | None = None
                  ) -> pathlib.Path:
    """Make sure the cache file of `config` exists and is valid; its path."""
    apply_chat_template_override(tokenizer, config.chat_template)
    path, key = cache_path(config, tokenizer), cache_key(config, tokenizer)
    if load_cache(path, key) is None:
        save_cache(path, key, _to_payload(_build(config, tokenizer, progress)))
        logger.info("data: tokenized data cached in %s", path)
    return path


def prepare_on_node_leaders(config: DataConfig, tokenizer) -> None:
    """Collective over the default group: the lowest rank of each host prepares the cache, with
    a progress bar; every rank returns once all hosts are done, or raises the same error."""
    failure = None
    if config.cache_dir is not None and comm.is_node_leader():
        try:
            prepare_cache(config, tokenizer, progress=True)
        except (ValueError, OSError) as err:  # DataError, a missing file, an unwritable cache
            failure = err
    agreed = comm.errors_on_ranks(None if failure is None else str(failure))
    if agreed is not None:
        if comm.world_size() == 1:
            raise failure
        raise DataError(agreed)


def _build(config: DataConfig, tokenizer, progress: bool | None) -> Built:
    read = read_conversation_files(config.paths, config.data_format)
    show = comm.is_global_rank_zero() if progress is None else progress
    tokenized = tokenize_all(tokenizer, read.conversations,
                             template_kwargs=config.chat_template_kwargs,
                             workers=config.tokenizer_workers, progress=show)
    return assemble(read, tokenized, config.seq_length)


def _to_payload(built: Built) -> dict:
    samples, stats, skipped = built
    lengths = [len(s.tokens) for s in samples]
    return {
        "tokens": torch.cat([s.tokens for s in samples]).to(torch.int32) if samples
        else torch.zeros(0, dtype=torch.int32),
        "loss_mask": torch.cat([s.loss_mask for s in samples]).to(torch.uint8) if samples
        else torch.zeros(0, dtype=torch.uint8),
        "lengths": torch.tensor(lengths, dtype=torch.int64),
        "sources": [s.source for s in samples],
        "truncated": [s.truncated for s in samples],
        "stats": dataclasses.asdict(stats),
        "skipped": [list(item) for item in skipped],
    }


def _from_payload(payload: dict) -> Built:
    tokens = payload["tokens"].to(torch.int64)
    masks = payload["loss_mask"].to(torch.int64)
    offsets = np.concatenate([[0], np.cumsum(payload["lengths"].numpy())])
    samples = [Sample(tokens[a:b].clone(), masks[a:b].clone(), source, i, truncated)
               for i, (a, b, source, truncated) in enumerate(zip(
                   offsets[:-1], offsets[1:], payload["sources"], payload["truncated"]))]
    stats = DataStats(**{**payload["stats"], "files": tuple(payload["stats"]["files"])})
    return samples, stats, [tuple(item) for item in payload["skipped"]]
