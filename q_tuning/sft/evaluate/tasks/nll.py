"""`q-tuning-eval --task nll`: held-out NLL of reference responses.

Each row (`prompt`, `response`) is tokenized exactly as the trainer tokenizes a training
conversation (one user turn, one assistant turn, the chat template; `data.tokenize_conversation`)
and scored over exactly the trainer's loss tokens: the response and the end-of-turn token
(`evaluate.reference_nll`). Reported: the token-weighted mean NLL over all rows
(`nll_per_token`, the headline) and the mean over rows of each row's mean (`nll_per_sample_mean`);
per row, the NLL sum and the number of loss tokens.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["evaluate_nll"]


def evaluate_nll(model, tokenizer, rows: Sequence[dict], *, batch_size: int
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from q_tuning.sft.evaluate.cli import reference_nll

    nll = reference_nll(model, tokenizer, rows, batch_size=batch_size)
    records = [{"id": row.get("id"), "nll_sum": r.sum, "loss_tokens": r.count,
                "nll": r.sum / max(r.count, 1)} for row, r in zip(rows, nll)]
    tokens = sum(r.count for r in nll)
    summary = {"task": "nll", "num_samples": len(rows), "loss_tokens": tokens,
               "nll_per_token": sum(r.sum for r in nll) / max(tokens, 1),
               "nll_per_sample_mean": sum(r["nll"] for r in records) / len(records),
               "per_item": {"nll_sum": [r.sum for r in nll],
                            "loss_tokens": [r.count for r in nll]}}
    return summary, records
