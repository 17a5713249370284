"""Shared test fixtures: the small model spec, a global batch of varied samples, its per-DP-rank
share, and megatron-core DDP wrapping. Public, so test workers and the harness import them from
here, never from one another."""

from __future__ import annotations

import torch

__all__ = ["MODEL", "dp_share", "global_batch", "kept_token_nll", "wrap_ddp"]

MODEL = dict(vocab=96, layers=4, hidden=32, heads=4, seed=11)


def global_batch(n: int = 12, seed: int = 3, vocab: int = MODEL["vocab"], min_len: int = 5,
                 max_len: int = 29) -> dict:
    """Samples of varied length: a prompt (mask 0) then a response (mask 1), every third one with
    a second prompt turn inside the response (a gap in the mask)."""
    g = torch.Generator().manual_seed(seed)
    tokens, masks = [], []
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        tok = torch.randint(0, vocab, (length,), generator=g)
        mask = torch.zeros(length, dtype=torch.long)
        prompt = int(torch.randint(1, max(2, length // 2), (1,), generator=g))
        mask[prompt:] = 1
        if i % 3 == 0 and length - prompt > 6:
            mask[prompt + 2:prompt + 4] = 0
        tokens.append(tok)
        masks.append(mask)
    return {"tokens": tokens, "loss_masks": masks, "uid": list(range(n))}


def dp_share(batch: dict, dp_rank: int, dp_size: int) -> dict:
    n = len(batch["tokens"])
    bounds = [n * r // dp_size for r in range(dp_size + 1)]
    return {k: v[bounds[dp_rank]:bounds[dp_rank + 1]] for k, v in batch.items()}


def wrap_ddp(chunks):
    """megatron-core DDP around each model chunk, with the per-token loss our step uses."""
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig, finalize_model_grads)

    wrapped = []
    for i, chunk in enumerate(chunks):
        chunk.config.calculate_per_token_loss = True
        chunk.config.finalize_model_grads_func = finalize_model_grads
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                   overlap_grad_reduce=False)
        wrapped.append(DistributedDataParallel(config=chunk.config, ddp_config=ddp_config,
                                               module=chunk, disable_bucketing=i > 0))
    return wrapped


def kept_token_nll(model, tokens: dict, kept_masks: dict) -> list[tuple[torch.Tensor, int, float]]:
    """The slow reference loss pieces: for each kept sample, a plain one-sample forward and its
    (masked NLL sum, kept-token count, loss-weight sum). Mask values are loss weights."""
    from tests.harness.megatron import causal_attention_mask

    pieces = []
    for uid, mask in kept_masks.items():
        tok = tokens[uid]
        n = tok.numel()
        logits = model(tok[None], torch.arange(n)[None], causal_attention_mask(1, n))
        nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), tok[1:], reduction="none")
        m = torch.tensor(mask[1:], dtype=torch.float32)
        pieces.append(((nll * m).sum(), int((m != 0).sum()), float(m.sum())))
    return pieces
