"""q_tuning: Q-Tuning for megatron-core / Megatron-LM supervised fine-tuning.

Public API:
    token_nll_entropy(logits, targets, tp_group=None) -> (nll, entropy)
    select_samples(ppl, entropy, keep_ratio, bisect_max_iter=10) -> SampleSelection
    token_keep_mask(token_nll, loss_mask, keep_ratio, neighbor_lambda) -> bool mask
    add_q_tuning_args(parser) -> parser
    QTuningConfig, RunShape
    QTuningPruner(config, run).prune(model, batch) -> (new_batch, StepReport)
    QTuningPruner.from_args(args)            from Megatron/slime-style parsed flags
    StepReport, format_report(report)

Layers: pure tensor functions (token_stats, selection, token_pruning) -> QTuningPruner
(distributed plumbing in q_tuning.parallel) -> integrations (q_tuning.sft.train, q_tuning.megatron_lm),
each calling only the layer below.
"""

from q_tuning.config import QTuningConfig, RunShape, add_q_tuning_args
from q_tuning.pruner import QTuningPruner
from q_tuning.report import StepReport, format_report
from q_tuning.selection import (SampleSelection, keep_count, sample_ppl_entropy,
                                sample_ppl_entropy_from_tokens, select_samples)
from q_tuning.token_pruning import segment_token_keep_mask, token_keep_mask
from q_tuning.token_stats import token_nll_entropy

__all__ = [
    "QTuningConfig",
    "QTuningPruner",
    "RunShape",
    "SampleSelection",
    "StepReport",
    "add_q_tuning_args",
    "format_report",
    "keep_count",
    "sample_ppl_entropy",
    "sample_ppl_entropy_from_tokens",
    "segment_token_keep_mask",
    "select_samples",
    "token_keep_mask",
    "token_nll_entropy",
]
