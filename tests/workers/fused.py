"""Rank workers for tests/distributed/test_fused_stats.py (module level, for spawned ranks)."""

from __future__ import annotations

import copy
import logging

import torch
import torch.distributed as dist

from q_tuning import QTuningConfig, QTuningPruner
from q_tuning.fused_stats import fused_nll_entropy
from q_tuning.passes import scoring
from tests.harness.fixtures import MODEL, dp_share
from tests.harness.megatron import build_tiny_gpt, parallel_world, unwrap


# --- pure tensor-parallel case --------------------------------------------------------------------

def sharded_fused(rank, world_size, seed: int, n: int, hidden: int, vocab: int, dtype: str,
                  bias: bool, chunk_tokens, chunk_vocab):
    """Every rank: the same full hidden/weight/targets from `seed`; this rank's vocabulary shard."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen)
    w = (torch.randn(vocab, hidden, generator=gen) * 3 / hidden ** 0.5).to(getattr(torch, dtype))
    b = (torch.randn(vocab, generator=gen) * 0.5).to(w.dtype) if bias else None
    t = torch.randint(0, vocab, (n,), generator=gen)
    v_local = vocab // world_size
    part = slice(rank * v_local, (rank + 1) * v_local)
    return fused_nll_entropy(h, w[part], t, None if b is None else b[part], dist.group.WORLD,
                             chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)


# --- the scoring pass on real megatron-core models ------------------------------------------------

class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _add_output_bias(chunks, seed: int) -> None:
    """Give the last stage's output layer a (seeded, TP-sharded) bias, as a model with
    `add_bias_linear` heads would have; GPTModel itself builds it without one."""
    from megatron.core import parallel_state as ps

    for chunk in chunks:
        layer = getattr(unwrap(chunk), "output_layer", None)
        if layer is None:
            continue
        full = torch.randn(MODEL["vocab"], generator=torch.Generator().manual_seed(seed)) * 0.3
        v_local = MODEL["vocab"] // ps.get_tensor_model_parallel_world_size()
        start = ps.get_tensor_model_parallel_rank() * v_local
        layer.bias = torch.nn.Parameter(full[start:start + v_local].to(layer.config.params_dtype))


def _allow_torch_norm_under_sequence_parallel() -> None:
    """megatron's WrappedTorchNorm (the local spec's norm without Apex) refuses sequence
    parallelism, because its weight gradients would need a reduction over the sequence shards.
    Normalisation itself is token-local, so for these no-grad scoring passes a torch norm on a
    sequence shard is exact: build it as if sequence parallelism were off (this process only)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    original = WrappedTorchNorm.__new__

    def new(cls, config, *args, **kwargs):
        config = copy.copy(config)
        config.sequence_parallel = False
        return original(cls, config, *args, **kwargs)

    WrappedTorchNorm.__new__ = new


class _WrappedOutputLayer(torch.nn.Module):
    """Stands for an adapter around the output layer (e.g. LoRA): not a ColumnParallelLinear."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.weight = inner.weight

    def forward(self, input_, weight=None, runtime_gather_output=None):
        return self.inner(input_, weight=weight, runtime_gather_output=runtime_gather_output)


def _scores(chunks, batch, method, **kwargs) -> dict:
    s = scoring.score_samples(chunks, batch["tokens"], batch["loss_masks"], method=method,
                              **kwargs)
    return {"nll": s.nll, "entropy": s.entropy, "target_mask": s.target_mask,
            "method": s.method, "peak": s.peak_memory_bytes, "rows": s.rows_per_micro_batch}


def _pruned(chunks, batch, method, config: dict) -> dict:
    """One pruner step with the given scoring method (whether or not the pruner passes it on)."""
    import q_tuning.pruner as pruner_mod

    original = pruner_mod.score_samples

    def with_method(*args, **kwargs):
        kwargs["method"] = method
        return original(*args, **kwargs)

    pruner_mod.score_samples = with_method
    try:
        pruner = QTuningPruner(QTuningConfig(**config, scoring_method=method), log=False)
        new_batch, report = pruner.prune(chunks, batch)
    finally:
        pruner_mod.score_samples = original
    sel = pruner.last_decision.selection
    return {"keep": sel.keep.tolist(), "quadrant": sel.quadrant.tolist(),
            "new": {int(u): m.tolist() for u, m in zip(new_batch["uid"], new_batch["loss_masks"])},
            "kept_tokens": report.kept_tokens}


def compare_worker(rank, world_size, tp, pp, cp, vpp, tied: bool, batch: dict, config: dict,
                   options: dict | None = None):
    """Score this rank's DP share with both methods (and prune with both), on one model.

    options: dtype ("float32"/"bfloat16"), sequence_parallel, bias (add an output bias),
    wrap_output_layer (fallback case), prune (default True), block ((logits, vocabulary entries)
    per fused block; default small, so that the tiny vocabulary still spans several blocks).
    """
    import q_tuning.fused_stats as fused_stats

    options = options or {}
    block = options.get("block", (5 * 40, 40))  # this process only
    fused_stats._BLOCK["cpu"] = block
    records = _Records()
    logging.getLogger("q_tuning").addHandler(records)
    try:
        with parallel_world(tp=tp, pp=pp, cp=cp, vpp=vpp):
            return _compare(tied, batch, config, options, records)
    finally:
        logging.getLogger("q_tuning").removeHandler(records)


def _compare(tied: bool, batch: dict, config: dict, options: dict, records) -> dict:
    """The body of `compare_worker`, inside its parallel world."""
    model = dict(MODEL, tied=tied, dtype=getattr(torch, options.get("dtype", "float32")))
    if options.get("sequence_parallel"):
        model["sequence_parallel"] = True
        _allow_torch_norm_under_sequence_parallel()
    chunks = build_tiny_gpt(**model)
    if options.get("bias"):
        _add_output_bias(chunks, seed=5)
    if options.get("wrap_output_layer"):
        for c in chunks:
            if getattr(unwrap(c), "output_layer", None) is not None:
                unwrap(c).output_layer = _WrappedOutputLayer(unwrap(c).output_layer)
    from megatron.core import parallel_state as ps

    share = dp_share(batch, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    projected: list[int] = []
    original = scoring.fused_nll_entropy
    scoring.fused_nll_entropy = lambda h, *a, **k: (projected.append(h.shape[0]),
                                                    original(h, *a, **k))[1]
    try:
        fused = _scores(chunks, share, "fused", rows_per_micro_batch=3)
    finally:
        scoring.fused_nll_entropy = original
    fused_default_rows = _scores(chunks, share, "fused")
    logits = _scores(chunks, share, "logits", rows_per_micro_batch=3)
    out = {"fused": fused, "fused_default_rows": fused_default_rows, "logits": logits,
           "projected_rows": projected, "warnings": records.messages,
           "is_last_stage": ps.is_pipeline_last_stage(ignore_virtual=True),
           "tp_rank": ps.get_tensor_model_parallel_rank(),
           "output_layer_restored": all(
               "forward" not in vars(unwrap(c).output_layer) for c in chunks
               if getattr(unwrap(c), "output_layer", None) is not None)}
    if options.get("prune", True):
        out["pruned"] = {m: _pruned(chunks, share, m, config) for m in ("fused", "logits")}
    return out
