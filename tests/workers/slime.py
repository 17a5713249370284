"""Rank workers for tests/integrations/slime/test_slime.py (module level, for spawned ranks)."""

from __future__ import annotations

from q_tuning import QTuningConfig, QTuningPruner, RunShape
from tests.harness.fixtures import MODEL, global_batch, kept_token_nll
from tests.harness import slime_standin as SL
from tests.harness.megatron import (build_tiny_gpt, destroy_parallel, full_state_dict,
                                    init_parallel, use_thd_cp_attention)

ROW = 64  # the stand-in's packed row per CP rank (>= --max-tokens-per-gpu of the tests)


def slime_data(n: int = 16, seed: int = 3) -> dict:
    """A global SFT rollout in slime's layout (loss masks over the response only), from the
    pruner tests' batch; `ours` keeps the same samples in our convention."""
    ours = global_batch(n, seed=seed)
    data = {"tokens": [], "response_lengths": [], "loss_masks": [], "sample_indices": [],
            "rollout_ids": []}
    for i, (tok, mask) in enumerate(zip(ours["tokens"], ours["loss_masks"])):
        prompt = int(mask.nonzero()[0])
        data["tokens"].append(tok.tolist())
        data["response_lengths"].append(tok.numel() - prompt)
        data["loss_masks"].append(mask[prompt:].tolist())
        data["sample_indices"].append(i)
        data["rollout_ids"].append(i)
    return {"slime": data, "ours": ours}


def _ddp(chunks, per_token: bool):
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig, finalize_model_grads)

    wrapped = []
    for i, chunk in enumerate(chunks):
        chunk.config.calculate_per_token_loss = per_token
        chunk.config.finalize_model_grads_func = finalize_model_grads
        wrapped.append(DistributedDataParallel(
            config=chunk.config, ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=False),
            module=chunk, disable_bucketing=i > 0))
    return wrapped


def actor_worker(rank, world_size, tp, pp, cp, argv: list, data: dict,
                 use_set_model: bool = False):
    """One rollout through the stand-in actor with slime's flags `argv` (the hook route when they
    name it). Returns the schedule, the samples trained and forwarded, grads and the decision.
    Under CP the model's attention takes THD rows, as transformer-engine's does in slime."""
    from megatron.core import parallel_state as ps

    import q_tuning.slime as qs
    from q_tuning.slime import hook

    init_parallel(tp=tp, pp=pp, cp=cp)
    tracked = SL.record_tracking()
    try:
        args = SL.parse_args(argv=argv)
        model = (use_thd_cp_attention(build_tiny_gpt(**MODEL, thd_attention=True)) if cp > 1
                 else build_tiny_gpt(**MODEL))
        chunks = _ddp(model, args.calculate_per_token_loss)
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        rollout = SL.split_rollout(data, args, dp_size, dp_rank, cp_size=cp)
        before = {"sample_indices": list(rollout["sample_indices"]),
                  "num_microbatches": list(rollout["num_microbatches"])}
        schedule_lists = [rollout[k] for k in ("micro_batch_indices", "num_microbatches",
                                               "global_batch_sizes")]
        actor = SL.StandinActor(args, chunks, ROW * cp)
        qs.set_model(chunks if use_set_model else None)
        actor.train_actor(0, rollout)
        state = next(iter(hook._STATES.values()), None)
        decision = None
        if state is not None and state.pruner.last_decision is not None:
            d = state.pruner.last_decision
            decision = {"keep": d.selection.keep.tolist(), "ppl": d.sample_ppl.tolist(),
                        "quadrant": d.selection.quadrant.tolist()}
        return {
            "dp_rank": dp_rank, "cp_rank": ps.get_context_parallel_rank(), "before": before,
            "tp_rank": ps.get_tensor_model_parallel_rank(),
            "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "decision": decision,
            "summary": getattr(state, "last_summary", None),
            "report": None if state is None else state.last_report,
            "tracked": tracked,
            "same_lists": all(rollout[k] is lst for k, lst in zip(
                ("micro_batch_indices", "num_microbatches", "global_batch_sizes"),
                schedule_lists)),
            "num_microbatches": list(rollout["num_microbatches"]),
            "global_batch_sizes": list(rollout["global_batch_sizes"]),
            "micro_batch_indices": [list(b) for b in rollout["micro_batch_indices"]],
            "samples": [{"id": int(s), "tokens": t.tolist(), "mask": m.tolist(), "resp": int(r),
                         "total": int(tl), "denom": float(d)}
                        for s, t, m, r, tl, d in zip(
                            rollout["sample_indices"], rollout["tokens"], rollout["loss_masks"],
                            rollout["response_lengths"], rollout["total_lengths"],
                            rollout["rollout_mask_sums"])],
            "seen": actor.seen,
            "user_hook_saw": getattr(args, "user_hook_saw", None),
            "grads": full_state_dict(chunks, grads=True),
        }
    finally:
        hook._STATES.clear()
        destroy_parallel()


def pruner_worker(rank, world_size, settings: dict, run: dict, ours: dict):
    """QTuningPruner itself on the same model and samples (our convention), one process."""
    init_parallel()
    try:
        chunks = build_tiny_gpt(**MODEL)
        pruner = QTuningPruner(QTuningConfig(**settings), RunShape(**run), log=False)
        batch = {"tokens": ours["tokens"], "loss_masks": ours["loss_masks"],
                 "uid": list(range(len(ours["tokens"])))}
        new, _ = pruner.prune(chunks, batch)
        d = pruner.last_decision
        return {"keep": d.selection.keep.tolist(), "ppl": d.sample_ppl.tolist(),
                "quadrant": d.selection.quadrant.tolist(),
                "masks": {int(u): m.tolist() for u, m in zip(new["uid"], new["loss_masks"])}}
    finally:
        destroy_parallel()


def reference_grads_worker(rank, world_size, ours: dict, kept_masks: dict, per_token: bool):
    """Gradient of the kept-token mean (per_token) or of the mean over kept samples of their
    kept-token means, on one process with a plain forward."""
    init_parallel()
    try:
        (model,) = build_tiny_gpt(**MODEL)
        model.train()
        pieces = kept_token_nll(model, ours["tokens"], kept_masks)
        losses, counts = [p[0] for p in pieces], [p[2] for p in pieces]
        if per_token:
            loss = sum(losses) / sum(counts)
        else:
            loss = sum(l / c for l, c in zip(losses, counts)) / len(losses)
        loss.backward()
        return full_state_dict([model], grads=True)
    finally:
        destroy_parallel()


def user_hook(args, rollout_id, rollout_data):
    """A user's postprocess hook, chained after Q-Tuning's: records what it was given."""
    args.user_hook_saw = {"samples": len(rollout_data["tokens"]),
                          "num_microbatches": list(rollout_data["num_microbatches"]),
                          "kept_ids": sorted({int(i) for i in rollout_data["sample_indices"]})}
