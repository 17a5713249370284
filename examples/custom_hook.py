"""Example rollout-data postprocess hooks for q-tuning-train (the contract: docs/hooks.md).

    PYTHONPATH=examples q-tuning-train ... --enable-q-tuning \\
        --rollout-data-postprocess-path custom_hook.cap_token_nll custom_hook.log_quadrant_lengths

`cap_token_nll` edits the loss masks in place: a kept token whose NLL is above
`$CAP_TOKEN_NLL` nats (default 12, i.e. the model gave it probability < 6e-6) is taken out of the
loss, on the theory that such a token is more likely a typo or a broken label than something to
learn. `log_quadrant_lengths` only reads: on global rank 0 it prints the mean response length per
quadrant of the whole global batch, gathered with `gather_rollout_stats` (a collective: safe,
because every rank calls every hook at every step).
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch
import torch.distributed as dist

from q_tuning.observe import gather_rollout_stats


def cap_token_nll(args, rollout_id, rollout_data):
    """Clear the loss-mask bit of kept tokens with NLL above the cap; at least one token of each
    sample stays (its lowest-NLL target), so no kept sample silently drops out."""
    cap = float(os.environ.get("CAP_TOKEN_NLL", "12"))
    for mask, nll, kept in zip(rollout_data["loss_masks"], rollout_data["token_nlls"],
                               rollout_data["kept"]):
        if not kept:
            continue
        target = mask.bool()
        target[0] = False  # position 0 is never a target (nothing predicts it)
        over = target & (nll > cap)
        if bool(over.any()) and bool((target & ~over).any()):
            mask[over] = 0  # in place: the gradient step trains on the edited mask


def log_quadrant_lengths(args, rollout_id, rollout_data):
    stats = gather_rollout_stats(rollout_data)  # every rank must call it
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    lengths = defaultdict(list)
    for quadrant, length in zip(stats["quadrants"], stats["response_lengths"]):
        lengths[quadrant].append(length)
    means = {f"Q{q}" if q else "unplaceable": round(float(torch.tensor(v).float().mean()), 1)
             for q, v in sorted(lengths.items())}
    print(f"[step {rollout_id}] mean response length per quadrant: {means}", flush=True)
