"""Rank workers for tests/distributed/test_packing.py (module level: spawned ranks import them)."""

from __future__ import annotations

from tests.harness.fixtures import MODEL, kept_token_nll, wrap_ddp
from tests.harness.megatron import build_tiny_gpt, full_state_dict, parallel_world

SEQ_LEN = 256  # the longest test sample fits RoPE's table


def layout_grads_worker(rank, world_size, batch: dict, micro_batch_size: int,
                        max_tokens_per_row: int | None, padding_reference=None):
    """`forward_backward` on `batch` (length-bucketed or packed by `plan_rows`); returns the full
    gradients and the rows per micro-batch that the step ran."""
    from q_tuning.passes.training import forward_backward, training_micro_batches

    with parallel_world():
        chunks = wrap_ddp(build_tiny_gpt(**MODEL, seq_len=SEQ_LEN))
        layout = {"micro_batch_size": micro_batch_size, "max_tokens_per_row": max_tokens_per_row,
                  "padding_reference": padding_reference}
        micro_batches, _ = training_micro_batches(batch, chunks, **layout)
        for c in chunks:
            c.zero_grad_buffer()
        forward_backward(chunks, batch, **layout)
        return {"grads": full_state_dict(chunks, grads=True),
                "shapes": [tuple(mb["tokens"].shape) for mb in micro_batches]}


def one_sample_reference_worker(rank, world_size, batch: dict):
    """Gradient of the mean token loss over every loss token, one plain forward per sample."""
    with parallel_world():
        (model,) = build_tiny_gpt(**MODEL, seq_len=SEQ_LEN)
        model.train()
        masks = {i: m.tolist() for i, m in enumerate(batch["loss_masks"])}
        pieces = kept_token_nll(model, dict(enumerate(batch["tokens"])), masks)
        (sum(p[0] for p in pieces) / sum(p[1] for p in pieces)).backward()
        return full_state_dict([model], grads=True)
