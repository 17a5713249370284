"""`postprocess(args, rollout_id, rollout_data)`: Q-Tuning as slime's
`--rollout-data-postprocess-path` hook.

slime (THUDM/slime since bd217a63f) calls the hook on every actor rank, in
`MegatronTrainRayActor.train_actor`, after this DP rank's rollout data is ready and before
`train()`; the data iterator and `train()` read `micro_batch_indices`, `num_microbatches` and
`global_batch_sizes` from the very list objects in `rollout_data` (schedule built by
`build_dp_schedule` since 2f4bd0d88), and the per-sample lists through the same dict. So the hook:

1. checks the settings (`check_args`: refusals, `QTuningConfig.from_args`), once per args object;
2. finds the actor's model chunks (`find_model`);
3. translates this rank's samples to the pruner's batch and calls `QTuningPruner.prune` (scoring
   under TP/PP/CP, DP gather, one global decision, Q2 token pruning, DP rebalance);
4. trims every kept sample after its last loss target (exact under causal attention);
5. rewrites the per-sample lists and the schedule in place: the same number of micro-batches on
   every DP rank (first-fit under `--max-tokens-per-gpu` x CP, or `--micro-batch-size` chunks),
   and, for slime's per-sample-mean loss, the denominators (`rollout_mask_sums`) from the pruned
   masks;
6. logs the rollout's Q-Tuning scalars to slime's tracking (W&B / TensorBoard: `tracking.py`);
7. runs the user's own postprocess hook, if one was chained (`q_tuning_postprocess_chain`).

Global rank 0 logs each rollout: the pruner's `[Q-Tuning]` lines, then `[Q-Tuning] slime rollout
N: training K/M samples, forwarding A/B tokens, C micro-batches per DP rank` (A/B over the step).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Sequence

import torch

from q_tuning.config import SETTINGS, QTuningConfig, RunShape
from q_tuning.parallel import comm
from q_tuning.passes.microbatch import takes_packed_seq_params
from q_tuning.slime import schedule as S
from q_tuning.slime.tracking import log_rollout

HOOK_PATH = "q_tuning.slime.postprocess"
CHAIN_KEY = "q_tuning_postprocess_chain"  # args attribute: the user's hook, run after ours
EXTRA_KEYS = (CHAIN_KEY,)

_MODEL: list | None = None  # set_model(): the launcher/harness route
_STATES: dict[int, "_State"] = {}


class QTuningSlimeError(RuntimeError):
    """A setting or a slime version Q-Tuning cannot run with; the message names the setting."""


def set_model(model_chunks: Sequence[torch.nn.Module] | None) -> None:
    """Give the hook the actor's model chunks explicitly (otherwise found from the caller)."""
    global _MODEL
    _MODEL = None if model_chunks is None else list(model_chunks)


def _is_chunk_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(c, torch.nn.Module) for c in value)


def find_model(max_depth: int = 8) -> list:
    """The actor's model chunks: `set_model`'s, else the `self.model` of the caller frame that
    called the hook (slime: `MegatronTrainRayActor.train_actor`, whose `self.model` is the list of
    DDP-wrapped chunks of this rank)."""
    if _MODEL is not None:
        return _MODEL
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        if owner is not None and _is_chunk_list(getattr(owner, "model", None)):
            return list(owner.model)
        frame = frame.f_back
    raise QTuningSlimeError(
        "q_tuning.slime.postprocess cannot find the actor's model: no caller up the stack has a "
        "`self.model` list of modules (slime's MegatronTrainRayActor.train_actor has one). Call "
        "q_tuning.slime.set_model(model_chunks) before training if your slime calls the hook "
        "from elsewhere")


# --- settings ------------------------------------------------------------------------------------

def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def check_args(args: Any) -> QTuningConfig:
    """The validated settings, or QTuningSlimeError / ValueError naming the setting. Depends on
    `args` only, so every rank raises the same error without a collective."""
    if not getattr(args, "enable_q_tuning", False):
        raise QTuningSlimeError(
            "q_tuning.slime.postprocess is installed (--rollout-data-postprocess-path) but Q-Tuning "
            "is not enabled: `enable_q_tuning` is not set on args. slime silently ignores unknown "
            "command-line flags, so --enable-q-tuning / --q-tuning-* given on slime's command line "
            "never arrive. Put them in the YAML of --custom-config-path (enable_q_tuning: true, "
            "q_tuning_sample_keep_ratio: 0.5, ...), or launch with `python -m q_tuning.slime "
            "train.py ... --enable-q-tuning`")
    known = {"q_tuning_" + s.field for s in SETTINGS} | set(EXTRA_KEYS)
    unknown = sorted(k for k in vars(args) if k.startswith("q_tuning_") and k not in known)
    if unknown:
        raise QTuningSlimeError(f"unknown Q-Tuning setting(s) {', '.join(unknown)}; known: "
                                f"{', '.join(sorted(known))}")
    try:
        config = QTuningConfig.from_args(args)
    except (TypeError, ValueError) as e:
        raise ValueError(f"Q-Tuning in slime: {e}") from None
    loss_type = getattr(args, "loss_type", "sft_loss")
    if loss_type != "sft_loss":
        raise QTuningSlimeError(
            f"--loss-type {loss_type}: Q-Tuning in slime supports --loss-type sft_loss only (its "
            "scores are the model's NLL and entropy of fixed targets; RL losses weight samples by "
            "advantages the pruning would bias)")
    for name in ("use_routing_replay", "use_rollout_routing_replay"):
        if getattr(args, name, False):
            raise QTuningSlimeError(
                f"{_flag(name)}: routing replay records expert choices per micro-batch of the "
                "unpruned schedule, which the hook rewrites; refused")
    if config.batch_policy != "shrink":
        raise QTuningSlimeError(
            f"--q-tuning-batch-policy {config.batch_policy}: slime hands the hook one fixed "
            "rollout; it cannot score further samples to refill it. Use shrink")
    steps = _steps_per_rollout(args)
    if steps is not None and steps != 1:
        raise QTuningSlimeError(
            f"--global-batch-size {getattr(args, 'global_batch_size', None)} with "
            f"--rollout-batch-size {getattr(args, 'rollout_batch_size', None)} x "
            f"--n-samples-per-prompt {getattr(args, 'n_samples_per_prompt', 1)}: each rollout "
            f"spans {steps} optimizer steps (--num-steps-per-rollout), but the hook runs once per "
            "rollout, before the first step, so it would score later steps with stale weights. "
            "Set --global-batch-size = --rollout-batch-size x --n-samples-per-prompt")
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    if vpp is not None and vpp > 1:
        raise QTuningSlimeError(
            f"--virtual-pipeline-model-parallel-size {vpp} (or "
            "--num-layers-per-virtual-pipeline-stage): the rewritten schedule does not yet align "
            "micro-batch counts to the virtual-stage group size; refused")
    return config


def _steps_per_rollout(args: Any) -> int | None:
    gbs, rbs = getattr(args, "global_batch_size", None), getattr(args, "rollout_batch_size", None)
    if not gbs or not rbs:
        return None
    return max(1, rbs * (getattr(args, "n_samples_per_prompt", None) or 1) // gbs)


def describe(config: QTuningConfig) -> str:
    return "[Q-Tuning] slime postprocess settings: " + " ".join(
        f"{s.flag}={getattr(config, s.field)}" for s in SETTINGS)


class _State:
    def __init__(self, args: Any) -> None:
        from q_tuning.pruner import QTuningPruner

        self.config = check_args(args)
        self.chain = _load_chain(args)
        run = RunShape.from_args(args)
        # slime does not enforce --seq-length (THD rows) and lets an oversized sample sit alone
        # in its micro-batch: the hook checks neither (rows are sized per call, see _row_budget).
        self.run = RunShape(micro_batch_size=run.micro_batch_size, seq_length=None,
                            max_tokens_per_row=None, total_steps=getattr(args, "train_iters", None))
        self.pruner = QTuningPruner(self.config, self.run, hook_args=args)
        if comm.is_global_rank_zero():
            print(describe(self.config) + (f" then {getattr(args, CHAIN_KEY)}"
                                           if self.chain else ""), flush=True)


def _load_chain(args: Any) -> Callable | None:
    path = getattr(args, CHAIN_KEY, None)
    if not path:
        return None
    if path == HOOK_PATH:
        raise QTuningSlimeError(f"{CHAIN_KEY} is {HOOK_PATH} itself")
    module, _, attr = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise QTuningSlimeError(f"--rollout-data-postprocess-path {path} (chained after "
                                f"Q-Tuning): cannot import it ({e})") from None


def _state_for(args: Any) -> _State:
    state = _STATES.get(id(args))
    if state is None or state.args_ref is not args:
        state = _State(args)
        state.args_ref = args
        _STATES.clear()
        _STATES[id(args)] = state
    return state


# --- the hook ------------------------------------------------------------------------------------

def postprocess(args: Any, rollout_id: int, rollout_data: dict) -> None:
    """slime's `--rollout-data-postprocess-path` hook (signature since slime bd217a63f)."""
    state = _state_for(args)
    for key in S.SCHEDULE_KEYS[:2]:
        if key not in rollout_data:
            raise QTuningSlimeError(
                f"rollout_data has no '{key}': this slime builds the micro-batch schedule on the "
                "training side; Q-Tuning needs slime with build_dp_schedule (commit 2f4bd0d88, "
                "v0.3.0 or later)")
    if len(rollout_data["num_microbatches"]) != 1:
        raise QTuningSlimeError(
            f"rollout {rollout_id} spans {len(rollout_data['num_microbatches'])} optimizer steps; "
            "set --global-batch-size = --rollout-batch-size x --n-samples-per-prompt "
            "(see check_args)")
    model = find_model()
    prune_rollout(state, model, args, rollout_id, rollout_data)
    log_rollout(args, rollout_id, state.last_report)
    if state.chain is not None:
        state.chain(args, rollout_id, rollout_data)


def prune_rollout(state: _State, model: list, args: Any, rollout_id: int,
                  rollout_data: dict) -> dict:
    """Steps 3-5 of the module docstring on this rank; returns a small summary."""
    from megatron.core import parallel_state as ps

    dp_group = ps.get_data_parallel_group()
    cp_size = ps.get_context_parallel_world_size()
    keys = S.per_sample_keys(rollout_data)
    batch, restore = S.to_batch(rollout_data, keys)
    forwarded_before = sum(int(t.numel()) for t in batch["tokens"])
    dynamic = bool(getattr(args, "use_dynamic_batch_size", False))
    budget = (getattr(args, "max_tokens_per_gpu", None) or 0) * cp_size if dynamic else None
    # The pruner's packed scoring rows: slime's budget, or the longest sample. Not under CP with
    # THD attention (transformer-engine's, slime's on GPU): packed THD rows would need per-sample
    # zigzag splitting, which the pruner refuses (microbatch.check_thd_context_parallel), so
    # there each sample is scored in its own row; the scores and the decision are the same.
    if budget and not (cp_size > 1 and takes_packed_seq_params(model[0])):
        longest = max((t.numel() for t in batch["tokens"]), default=1)
        state.pruner.run = RunShape(micro_batch_size=state.run.micro_batch_size,
                                    max_tokens_per_row=max(budget, longest),
                                    total_steps=state.run.total_steps)
    new_batch, report = state.pruner.prune(model, batch, rollout_id=rollout_id,
                                           step=rollout_id + 1)
    trim = not any(k in rollout_data for k in S.PER_RESPONSE_TOKEN_KEYS)
    samples = [S.to_slime_sample({k: v[i] for k, v in new_batch.items()}, trim=trim)
               for i in range(len(new_batch["tokens"]))]
    lengths = [int(s["tokens"].numel()) for s in samples]
    bins = S.local_bins(lengths, dynamic=dynamic, max_tokens=budget,
                        micro_batch_size=getattr(args, "micro_batch_size", None))
    count = comm.max_over_group(len(bins), dp_group)
    bins, missing = S.equalize(bins, count, lengths)
    shortest = min(range(len(samples)), key=lambda i: (lengths[i], i))
    fillers = [S.filler_sample(samples[shortest]) for _ in range(missing)]
    ordered, indices = S.reorder(samples, bins, fillers)
    if "rollout_mask_sums" in keys:
        _pruned_denominators(ordered, rollout_data, dp_group)
    S.write_back(rollout_data, keys, ordered, restore)
    rollout_data["micro_batch_indices"][:] = indices
    rollout_data["num_microbatches"][:] = [count]
    forwarded = sum(int(s["tokens"].numel()) for s in ordered)
    # the whole step's forwarded tokens (every DP rank), for the log line
    before_all, after_all = (sum(v) for v in zip(*comm.all_gather_objects(
        (forwarded_before, forwarded), dp_group)))
    summary = {"kept_samples": report.kept_samples, "total_samples": report.total_samples,
               "kept_tokens": report.kept_tokens, "total_tokens": report.total_tokens,
               "num_microbatches": count, "fillers": missing,
               "forwarded_tokens_before": forwarded_before, "forwarded_tokens": forwarded,
               "step_forwarded_tokens_before": before_all, "step_forwarded_tokens": after_all}
    if comm.is_global_rank_zero():
        print(f"[Q-Tuning] slime rollout {rollout_id}: training {report.kept_samples}/"
              f"{report.total_samples} samples, forwarding {after_all}/{before_all} tokens, "
              f"{count} micro-batches per DP rank"
              + (f" ({missing} filler)" if missing else ""), flush=True)
    state.last_summary = summary
    state.last_report = report
    return summary


def _pruned_denominators(samples: list[dict], rollout_data: dict, dp_group) -> None:
    """slime's per-sample-mean loss divides each sample's masked sum by `rollout_mask_sums[i]`
    (its rollout's loss tokens) and the step's sum by `global_batch_sizes[step]` (rollouts in the
    step; also the LR scheduler's increment, so it is left unchanged). Here the denominators become
    the pruned masks' per-rollout totals (over every DP rank), scaled by kept rollouts / step
    rollouts: the step then optimises the mean over the kept rollouts of their token means, with
    the LR schedule of the unpruned run. Fillers (no loss token) contribute 0 whatever their
    denominator."""
    rollout_ids = [s.get("rollout_ids", s.get("sample_indices", None)) for s in samples]
    real = [i for i, s in enumerate(samples) if int(s["loss_masks"].count_nonzero()) > 0]
    if any(rollout_ids[i] is None for i in real):  # no ids: every sample is its own rollout
        rollout_ids = [("local", comm.rank_in(dp_group), i) for i in range(len(samples))]
    local = [(rollout_ids[i], int(samples[i]["loss_masks"].sum())) for i in real]
    totals: dict = {}
    for part in comm.all_gather_objects(local, dp_group):
        for rid, tokens in part:
            totals[rid] = totals.get(rid, 0) + tokens
    step_rollouts = rollout_data.get("global_batch_sizes") or [len(totals)]
    scale = len(totals) / max(int(step_rollouts[0]), 1)
    for i, s in enumerate(samples):
        value = float(totals.get(rollout_ids[i], 1)) * scale if i in real else 1.0
        s["rollout_mask_sums"] = torch.tensor(value, dtype=torch.float32)
