"""One Megatron-LM training step with Q-Tuning in front of it.

`QTuningStep.wrap(forward_backward_func)` returns the function `train_step` calls
(megatron/training/training.py, `train()` gets it from `get_forward_backward_func()` and
`train_step` calls it once per step with `get_num_microbatches()` micro-batches). Evaluation calls
it with `forward_only=True`: those pass through untouched. A training call:

1. drains the step's micro-batches from each data iterator it was given (the ranks that read data:
   TP rank 0 of the first and last pipeline stage, every CP rank). The outer iterator stays the
   `RerunDataIterator` that `train_step` holds, so on a re-run (`rewind`) the same micro-batches
   come back, are scored again and give the same decision;
2. converts them to samples (`batches.py`: a row, or a packed `--sft` segment) and gives every rank
   of the TP x PP group the readers' tokens and loss masks (`share_in_model_parallel_group`), as
   the pruner needs the same batch on every rank of a DP replica;
3. prunes with `QTuningPruner` (forward-only scoring through megatron-core's schedule, global
   selection over DP, Q2 token masks, DP rebalance);
4. rebuilds micro-batches in the drained format from the kept samples, pads with all-zero
   loss-mask rows/micro-batches to the same count on every DP rank (rounded up to the virtual
   pipeline group size), and calls the real function with fresh `RerunDataIterator`s over them and
   the true `num_microbatches`.

Composability, axis by axis:
- TP: only TP rank 0 reads; `get_batch` broadcasts the rebuilt micro-batches to the other TP ranks
  as usual (shapes stay `[micro_batch_size, seq_length]`).
- PP: first and last stage read the same samples; middle stages only take part in scoring and get
  the micro-batch count, which is a function of the shared samples.
- CP: every CP rank reads the full rows; `get_batch` slices them as usual.
- DP: the pruner selects on the global batch and rebalances; the micro-batch count is the DP max.
- Loss: with `--calculate-per-token-loss` (which `parse_args` turns on with --enable-q-tuning),
  padding contributes no tokens and the step's loss is the mean over all kept tokens; without it
  Megatron divides each micro-batch's token mean by the micro-batch count, so pruning re-weights
  tokens (warned once).
- Learning-rate schedule and consumed samples: `train_step` increments them by the full global
  batch, which is what was read from the data (the 'shrink' policy), so they stay true.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import torch
import torch.distributed as dist

from q_tuning.config import QTuningConfig
from q_tuning.megatron_lm.batches import (UnsupportedBatch, micro_batches_to_samples,
                                          num_micro_batches, plan_rows, row_format,
                                          samples_to_rows)
from q_tuning.parallel import comm
from q_tuning.pruner import QTuningPruner

MARKER = "_q_tuning_patch"


def log_rank_0(message: str) -> None:
    """Print on global rank 0 (before torch.distributed is up: where torchrun's RANK is 0)."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
    else:
        rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"[Q-Tuning] {message}", flush=True)


class QTuningStep:
    """Per-process adapter state: the pruner (built at the first training step) and once-only
    warnings."""

    def __init__(self) -> None:
        self.pruner: QTuningPruner | None = None
        self._said: set[str] = set()

    def say_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            log_rank_0(message)

    def wrap(self, forward_backward_func: Callable, args: Any = None) -> Callable:
        """The function to give `train_step`, or `forward_backward_func` itself when Q-Tuning is
        off or the configuration is unsupported (said once). `args`: Megatron-LM's `get_args()`."""
        if args is None:
            from megatron.training import get_args

            args = get_args()
        if not getattr(args, "enable_q_tuning", False):
            return forward_backward_func
        reason = unsupported_reason(args)
        if reason:
            self.say_once("unsupported", f"not supported with {reason}; training runs WITHOUT "
                          "Q-Tuning (unchanged Megatron-LM)")
            return forward_backward_func

        @functools.wraps(forward_backward_func)
        def q_tuning_forward_backward(*pos, **kwargs):
            if pos or kwargs.get("forward_only", False):
                return forward_backward_func(*pos, **kwargs)
            return self.train_step(forward_backward_func, args, **kwargs)

        setattr(q_tuning_forward_backward, MARKER, True)
        return q_tuning_forward_backward

    def train_step(self, inner: Callable, args: Any, **kwargs) -> Any:
        """Steps 1-4 of the module doc, then `inner` on the rebuilt micro-batches."""
        from megatron.core.utils import get_model_config

        model = kwargs["model"]
        chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        given = kwargs["data_iterator"]
        count_in = kwargs["num_microbatches"]
        drained = [None if it is None else [next(it) for _ in range(count_in)]
                   for it in (given if isinstance(given, list) else [given])]
        mine = next((d for d in drained if d is not None), None)
        fmt, samples, problem = _read(mine, args) if mine is not None else (None, None, None)
        shared = share_in_model_parallel_group(
            None if mine is None else (problem, fmt is not None and fmt.packed,
                                       None if samples is None else
                                       {k: samples[k] for k in ("tokens", "loss_masks")}))
        if shared is None:
            raise RuntimeError("Q-Tuning: no rank of this tensor x pipeline group read a batch "
                               "(expected TP rank 0 of the first pipeline stage to hold the "
                               "training data iterator, as megatron.training does)")
        problem, packed, pruner_fields = shared
        if _max_int(int(problem is not None), None):  # the whole world agrees
            self.say_once("batch", f"cannot read this step's micro-batches "
                          f"({problem or 'see another rank'}); such steps run unpruned")
            return inner(**{**kwargs, "data_iterator": _fresh(given, drained, None)})

        if not get_model_config(chunks[0]).calculate_per_token_loss:
            self.say_once("per-token-off", "warning: --calculate-per-token-loss is off, so each "
                          "micro-batch's loss is its own token mean divided by the micro-batch "
                          "count: pruning re-weights the kept tokens")
        kept, _report = self._pruner(args).prune(
            chunks, samples if samples is not None else pruner_fields)
        rows = plan_rows([t.numel() - 1 for t in kept["tokens"]], seq_length=args.seq_length,
                         packed=packed)
        count = _micro_batch_count(len(rows), args.micro_batch_size, chunks)
        log_rank_0(f"micro-batches per data-parallel rank: {count_in} -> {count} "
                   f"(x {args.micro_batch_size} rows; {len(rows)} rows of kept samples on rank 0)")
        rebuilt = None if mine is None else samples_to_rows(kept, rows, fmt, count)
        return inner(**{**kwargs, "num_microbatches": count,
                        "data_iterator": _fresh(given, drained, rebuilt)})

    def _pruner(self, args: Any) -> QTuningPruner:
        if self.pruner is None:
            # Samples are rows plus the last label, so seq_length + 1 tokens (batches.py).
            self.pruner = QTuningPruner(QTuningConfig.from_args(args),
                                        micro_batch_size=args.micro_batch_size,
                                        seq_length=args.seq_length + 1,
                                        total_steps=getattr(args, "train_iters", None))
        return self.pruner


def unsupported_reason(args: Any) -> str | None:
    """Why this Megatron-LM configuration cannot be pruned, or None."""
    if getattr(args, "q_tuning_batch_policy", "shrink") != "shrink":
        return ("--q-tuning-batch-policy refill (Megatron-LM's data iterator and learning-rate "
                "schedule are sized by the global batch; use shrink)")
    if getattr(args, "mtp_num_layers", None):
        return "--mtp-num-layers (multi-token prediction reads shifted tokens on the last stage)"
    if getattr(args, "hybrid_context_parallel", False):
        return "--hybrid-context-parallel"
    if not getattr(args, "sft", False) and (getattr(args, "reset_position_ids", False)
                                            or getattr(args, "reset_attention_mask", False)):
        return ("--reset-position-ids / --reset-attention-mask (a row holds several documents; "
                "Q-Tuning needs one sample per row, or --sft packed segments)")
    if getattr(args, "cuda_graph_impl", "none") not in (None, "none"):
        return "--cuda-graph-impl (captured graphs need a fixed micro-batch count)"
    if getattr(args, "position_embedding_type", None) == "learned_absolute" and \
            (args.max_position_embeddings or 0) < args.seq_length + 1:
        return (f"--position-embedding-type learned_absolute and --max-position-embeddings "
                f"{args.max_position_embeddings} < --seq-length + 1 = {args.seq_length + 1} "
                "(scoring a row's last target needs one more position; raise "
                "--max-position-embeddings or use rope)")
    return None


def _read(micro_batches: list[dict], args: Any):
    """(format, samples, None) of the drained micro-batches, or (format?, None, the problem)."""
    fmt = None
    try:
        fmt = row_format(micro_batches)
        if (fmt.micro_batch_size, fmt.seq_length) != (args.micro_batch_size, args.seq_length):
            raise UnsupportedBatch(f"micro-batches of {fmt.micro_batch_size} x {fmt.seq_length}, "
                                   f"not --micro-batch-size {args.micro_batch_size} x "
                                   f"--seq-length {args.seq_length}")
        return fmt, micro_batches_to_samples(micro_batches), None
    except UnsupportedBatch as e:
        return fmt, None, str(e)


def _micro_batch_count(num_rows: int, micro_batch_size: int, chunks: list) -> int:
    """The same count on every DP rank (the max); with interleaving, whole micro-batch groups
    (megatron-core's interleaved schedule needs count % group == 0 or >= PP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_model_config

    count = _max_int(num_micro_batches(num_rows, micro_batch_size), ps.get_data_parallel_group())
    if len(chunks) > 1:
        group = get_model_config(chunks[0]).microbatch_group_size_per_vp_stage or \
            ps.get_pipeline_model_parallel_world_size()
        count = -(-count // group) * group
    return count


def share_in_model_parallel_group(payload: Any) -> Any:
    """Every rank of this rank's TP x PP group gets the payload of the first rank (in group order)
    that has one (not None); None if no rank has."""
    from megatron.core import parallel_state as ps

    group = ps.get_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return payload
    holders = comm.all_gather_objects(payload is not None, group)
    if not any(holders):
        return None
    src = dist.get_global_rank(group, holders.index(True))
    box = [payload]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def _max_int(value: int, group) -> int:
    """MAX of an int over `group` (None: the world), on the device the group's backend needs."""
    if dist.get_world_size(group) == 1:
        return value
    device = torch.cuda.current_device() if dist.get_backend(group) == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def _rerun_iterator(micro_batches: list[dict]):
    from megatron.core.rerun_state_machine import RerunDataIterator

    return RerunDataIterator(iter(micro_batches))


def _fresh(given: Any, drained: list, rebuilt: list[dict] | None) -> Any:
    """New `RerunDataIterator`s, shaped like what `train_step` passed (a list per model chunk, or
    one), where it passed one: over `rebuilt`, or over the drained micro-batches unchanged."""
    fresh = [None if d is None else _rerun_iterator(d if rebuilt is None else rebuilt)
             for d in drained]
    return fresh if isinstance(given, list) else fresh[0]
