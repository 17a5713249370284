"""A user's own selection rule for `--q-tuning-strategy examples.custom_strategy.q2_only`.

Contract (q_tuning.strategies): the function receives a `StrategyInputs` describing the whole
global batch (identical on every rank) and returns either a bool tensor `[N]` of kept samples, or
a `StrategyDecision` that also says how each kept sample's tokens are pruned and how its loss is
weighted. Draw random numbers only from `inputs.generator`, so every rank decides the same.

This example keeps only the "confidently wrong" corner, Q2 of the EU plane at the configured keep
ratio, and prunes those samples' tokens the Q-Tuning way; run it from the repository root (so that
`examples` is importable), e.g.

    python -m q_tuning.sft.train --preset smollm2-gsm \\
        --q-tuning-strategy examples.custom_strategy.q2_only
"""

from __future__ import annotations

import torch

from q_tuning import select_samples
from q_tuning.strategies import StrategyDecision, StrategyInputs, TokenPruning


def q2_only(inputs: StrategyInputs) -> StrategyDecision:
    selection = select_samples(inputs.ppl, inputs.entropy, inputs.keep_ratio,
                               inputs.bisect_max_iter, step=inputs.step,
                               num_tokens=inputs.num_tokens)
    keep = selection.keep & (selection.quadrant == 2)
    if not bool(keep.any()):  # never an empty step: fall back to the Q-Tuning set
        keep = selection.keep
    return StrategyDecision(
        keep=keep,
        token_pruning=torch.where(keep & (selection.quadrant == 2), int(TokenPruning.SCORED), 0),
        loss_weight=torch.ones_like(inputs.ppl),
        selection=selection)
