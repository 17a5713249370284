"""Rank workers for tests/distributed/test_pruner.py (module level: spawned ranks import them)."""

from __future__ import annotations

import torch

from q_tuning import QTuningConfig, QTuningPruner, RunShape
from tests.harness.fixtures import MODEL, dp_share, global_batch, kept_token_nll, wrap_ddp  # noqa: F401
from tests.harness.megatron import (build_tiny_gpt, causal_attention_mask, full_state_dict,
                                    parallel_world, unwrap)

def _dp():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def _decision(pruner) -> dict:
    d = pruner.last_decision
    return {"keep": d.selection.keep.tolist(), "quadrant": d.selection.quadrant.tolist(),
            "ppl": d.sample_ppl.tolist(), "ent": d.sample_entropy.tolist(),
            "level": d.selection.level}


def prune_worker(rank, world_size, tp, pp, cp, vpp, config: dict, batch: dict,
                 run: dict | None = None, prune_kwargs: dict | None = None):
    with parallel_world(tp=tp, pp=pp, cp=cp, vpp=vpp):
        chunks = build_tiny_gpt(**MODEL)
        dp_rank, dp_size = _dp()
        pruner = QTuningPruner(QTuningConfig(**config), RunShape(**(run or {})), log=False)
        new_batch, report = pruner.prune(chunks, dp_share(batch, dp_rank, dp_size),
                                         **(prune_kwargs or {}))
        return {**_decision(pruner), "report": report.to_json(), "dp_rank": dp_rank,
                "new": {int(u): m.tolist() for u, m in zip(new_batch["uid"], new_batch["loss_masks"])},
                "new_tokens": [t.tolist() for t in new_batch["tokens"]]}


def reference_worker(rank, world_size, batch: dict):
    """Plain per-sample forward of the same model, float64 softmax over the full vocabulary."""
    with parallel_world():
        (model,) = build_tiny_gpt(**MODEL)
        model.eval()
        out = []
        with torch.no_grad():
            for tok in batch["tokens"]:
                n = tok.numel()
                logits = model(tok[None], torch.arange(n)[None], causal_attention_mask(1, n))
                logp = torch.log_softmax(logits[0, :-1].double(), dim=-1)  # predicts tokens 1..n-1
                nll = torch.zeros(n, dtype=torch.float64)
                ent = torch.zeros(n, dtype=torch.float64)
                nll[1:] = -logp.gather(1, tok[1:, None])[:, 0]
                ent[1:] = -(logp.exp() * logp).sum(-1)
                out.append((nll, ent))
        return out


def train_step_worker(rank, world_size, tp, pp, cp, vpp, config: dict, batch: dict,
                      micro_batch_size: int):
    """One pruned step: prune, then forward-backward on the new batch with DDP and the per-token
    loss. Returns the full gradients, the kept masks, and every training forward's input rows."""
    from q_tuning.passes.training import forward_backward

    with parallel_world(tp=tp, pp=pp, cp=cp, vpp=vpp):
        chunks = wrap_ddp(build_tiny_gpt(**MODEL))
        dp_rank, dp_size = _dp()
        pruner = QTuningPruner(QTuningConfig(**config), log=False)
        new_batch, report = pruner.prune(chunks, dp_share(batch, dp_rank, dp_size))
        seen_rows: list[list[int]] = []
        hooks = [unwrap(c).register_forward_pre_hook(
            lambda mod, args: seen_rows.extend(args[0].tolist())) for c in chunks]
        for c in chunks:
            c.zero_grad_buffer()
        forward_backward(chunks, new_batch, micro_batch_size=micro_batch_size)
        for h in hooks:
            h.remove()
        grads = full_state_dict(chunks, grads=True)
        return {"grads": grads, "seen_rows": seen_rows, "report": report.to_json(),
                "dp_rank": dp_rank,
                "new": {int(u): m.tolist() for u, m in zip(new_batch["uid"], new_batch["loss_masks"])}}


def reference_grads_worker(rank, world_size, batch: dict, kept_masks: dict):
    """Gradient of the mean token loss over exactly the kept tokens of the kept samples."""
    with parallel_world():
        (model,) = build_tiny_gpt(**MODEL)
        model.train()
        pieces = kept_token_nll(model, batch["tokens"], kept_masks)
        total = sum(p[0] for p in pieces)
        count = sum(p[1] for p in pieces)  # mask values are loss weights; count the tokens
        (total / count).backward()
        return full_state_dict([model], grads=True)


def bad_input_worker(rank, world_size, case: str, run: dict | None = None):
    """Every rank must raise the same ValueError (no hang), whichever rank holds the bad input."""
    with parallel_world():
        chunks = build_tiny_gpt(**MODEL)
        batch = dp_share(global_batch(8), rank, world_size)
        if case == "empty":
            batch = {"tokens": [], "loss_masks": []}
        elif case == "no_loss_tokens":
            batch["loss_masks"] = [torch.zeros_like(m) for m in batch["loss_masks"]]
        elif case == "too_long" and rank == 1:
            batch["tokens"][0] = torch.zeros(50, dtype=torch.long)
            batch["loss_masks"][0] = torch.ones(50, dtype=torch.long)
        elif case == "mismatched" and rank == 0:
            batch["loss_masks"][1] = batch["loss_masks"][1][:-1]
        elif case == "some_unplaceable":
            batch["loss_masks"][0] = torch.zeros_like(batch["loss_masks"][0])
        pruner = QTuningPruner(QTuningConfig(sample_keep_ratio=0.5), RunShape(**(run or {})),
                               log=False)
        try:
            _, report = pruner.prune(chunks, batch)
        except ValueError as e:
            return {"error": str(e)}
        return {"report": report.to_json()}


def hook_clearing_last_token(args, rollout_id, rollout_data):
    """Clears the last loss token of every sample: the gradient step must honour it."""
    hook_clearing_last_token.seen = {k: len(v) for k, v in rollout_data.items()}
    for m in rollout_data["loss_masks"]:
        m[-1] = 0


def hook_failing_on_rank_one(args, rollout_id, rollout_data):
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise RuntimeError(f"bad data at step {rollout_id}")


def hook_worker(rank, world_size, hook_name: str):
    with parallel_world():
        chunks = build_tiny_gpt(**MODEL)
        dp_rank, dp_size = _dp()
        hook = globals()[hook_name]
        pruner = QTuningPruner(QTuningConfig(**{"sample_keep_ratio": 0.5}), log=False,
                               hooks=[hook])
        local = dp_share(global_batch(12), dp_rank, dp_size)
        try:
            new_batch, report = pruner.prune(chunks, local, rollout_id=7)
        except ValueError as e:
            return {"error": str(e)}
        return {"seen": getattr(hook, "seen", None), "n_local": len(local["tokens"]),
                "new_last_bits": [int(m[-1]) for m in new_batch["loss_masks"]],
                "kept_tokens": report.kept_tokens}


def strategy_worker(rank, world_size, config: dict, batch: dict):
    """Prune with a strategy; also counts the model forwards the pruner itself runs."""
    with parallel_world():
        chunks = build_tiny_gpt(**MODEL)
        dp_rank, dp_size = _dp()
        forwards = []
        hooks = [unwrap(c).register_forward_pre_hook(lambda mod, args: forwards.append(1))
                 for c in chunks]
        pruner = QTuningPruner(QTuningConfig(**config), log=False)
        try:
            new_batch, report = pruner.prune(chunks, dp_share(batch, dp_rank, dp_size))
        except ValueError as e:
            return {"error": str(e)}
        for h in hooks:
            h.remove()
        return {**_decision(pruner), "report": report.to_json(), "forwards": len(forwards),
                "new": {int(u): m.tolist() for u, m in zip(new_batch["uid"], new_batch["loss_masks"])}}


def rank_dependent_strategy(inputs):
    """A broken user rule: different decisions on different ranks."""
    import torch.distributed as dist

    keep = torch.zeros(inputs.ppl.shape, dtype=torch.bool)
    keep[dist.get_rank()] = True
    return keep
