"""Rank workers for tests/distributed/test_thd.py: packed rows through the THD path (a test
attention taking megatron's PackedSeqParams, as transformer-engine's does) vs the block-diagonal
mask path."""

from __future__ import annotations

from q_tuning.passes.scoring import score_samples
from q_tuning.passes.training import forward_backward
from tests.harness.fixtures import MODEL, global_batch, wrap_ddp
from tests.harness.megatron import build_tiny_gpt, full_state_dict, parallel_world, unwrap

BUDGET = 64  # tokens per packed row: several samples of 5-29 tokens per row


def compare_worker(rank, world_size, tp: int):
    """Scores and one step's loss and gradients, THD vs mask path, same weights and batch."""
    with parallel_world(tp=tp):
        batch = global_batch(10)
        out = {}
        for name, thd in (("mask", False), ("thd", True)):
            chunks = wrap_ddp(build_tiny_gpt(**MODEL, thd_attention=thd))
            calls = []
            hooks = [m.register_forward_pre_hook(
                lambda mod, args, kwargs: calls.append(kwargs.get("packed_seq_params") is not None),
                with_kwargs=True)
                for m in unwrap(chunks[0]).modules() if type(m).__name__.endswith("Attention")
                and hasattr(m, "softmax_scale")]
            scores = score_samples(chunks, batch["tokens"], batch["loss_masks"],
                                   max_tokens_per_row=BUDGET)
            for c in chunks:
                c.zero_grad_buffer()
            losses = forward_backward(chunks, batch, max_tokens_per_row=BUDGET)
            for h in hooks:
                h.remove()
            out[name] = {"nll": scores.nll, "entropy": scores.entropy,
                         "loss": [tuple(float(x) for x in o["lm loss"]) for o in losses],
                         "grads": full_state_dict(chunks, grads=True), "thd_calls": calls}
        unpacked = score_samples(wrap_ddp(build_tiny_gpt(**MODEL)), batch["tokens"],
                                 batch["loss_masks"])
        out["unpacked"] = {"nll": unpacked.nll, "entropy": unpacked.entropy}
        return out


def cp_refusal_worker(rank, world_size):
    with parallel_world(cp=2):
        chunks = build_tiny_gpt(**MODEL, thd_attention=True, cp_attention=False)
        batch = global_batch(6)
        try:
            score_samples(chunks, batch["tokens"], batch["loss_masks"], max_tokens_per_row=BUDGET)
        except ValueError as e:
            return str(e)
        return None
