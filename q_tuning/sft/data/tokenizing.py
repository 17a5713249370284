"""Tokenize many conversations in worker processes, in record order, with a progress bar.

Public API:
    tokenize_all(tokenizer, conversations, *, template_kwargs=None, workers=1, progress=True)
        -> list[(tokens: np.int32 array, loss_mask: np.uint8 array)]

Workers are forked (the tokenizer is inherited, not pickled) where the platform can fork, else
spawned with the tokenizer pickled; results come back in input order (`imap`), so the output does
not depend on the number of workers. The bar (tqdm, on stderr) shows the count, the rate and the
time left.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from q_tuning.sft.data.masks import tokenize_conversation
from q_tuning.sft.data.conversations import Conversation

__all__ = ["tokenize_all"]

_WORKER: dict[str, Any] = {}  # this worker's tokenizer and template arguments


def _init_worker(tokenizer, template_kwargs: Mapping[str, Any]) -> None:
    _WORKER.update(tokenizer=tokenizer, template_kwargs=dict(template_kwargs))


def _tokenize_one(conversation: Conversation) -> tuple[np.ndarray, np.ndarray]:
    kwargs = {**_WORKER["template_kwargs"], **conversation.template_kwargs}
    tokens, mask = tokenize_conversation(_WORKER["tokenizer"], conversation.messages,
                                         source=conversation.source, tools=conversation.tools,
                                         template_kwargs=kwargs)
    return tokens.numpy().astype(np.int32), mask.numpy().astype(np.uint8)


def tokenize_all(tokenizer, conversations: Sequence[Conversation], *,
                 template_kwargs: Mapping[str, Any] | None = None, workers: int = 1,
                 progress: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, loss_mask) of every conversation, in order; a DataError of any record stops it."""
    kwargs = dict(template_kwargs or {})
    workers = max(1, min(workers, len(conversations)))
    bar = tqdm(total=len(conversations), desc="tokenizing", unit="conv", disable=not progress,
               mininterval=1.0, smoothing=0.1, dynamic_ncols=True)
    out = []
    with bar:
        if workers == 1:
            _init_worker(tokenizer, kwargs)
            for conversation in conversations:
                out.append(_tokenize_one(conversation))
                bar.update()
            _WORKER.clear()
            return out
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        chunk = max(1, min(64, len(conversations) // (workers * 16)))
        with context.Pool(workers, initializer=_init_worker,
                          initargs=(tokenizer, kwargs)) as pool:
            for result in pool.imap(_tokenize_one, conversations, chunksize=chunk):
                out.append(result)
                bar.update()
    return out
