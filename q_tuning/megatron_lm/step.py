"""One Megatron-LM training step with Q-Tuning in front of it.

`QTuningStep.wrap(forward_backward_func)` returns the function `train_step` calls
(megatron/training/training.py, `train()` gets it from `get_forward_backward_func()` and
`train_step` calls it once per step, with keyword arguments, with `get_num_microbatches()`
micro-batches). Evaluation calls it with `forward_only=True`: those pass through untouched. A
training call:

1. takes its step number from Megatron-LM: `args.curr_iteration + 1` (`train()` sets the 0-based
   iteration before each `train_step`; our steps are 1-based). A step re-run by Megatron's rerun
   state machine therefore decides exactly as the first run did, and a run resumed with `--load`
   continues the numbering (the random and InfoBatch strategies draw from the step, InfoBatch
   anneals by it);
2. drains the step's micro-batches from each data iterator it was given (the ranks that read data:
   TP rank 0 of the first and last pipeline stage, every CP rank). The outer iterator stays the
   `RerunDataIterator` that `train_step` holds, so on a re-run (`rewind`) the same micro-batches
   come back;
3. converts them to samples (`batches.py`: a row, or a packed `--sft` segment) and gives every rank
   of the TP x PP group the readers' tokens and loss masks (`share_in_model_parallel_group`), as
   the pruner needs the same batch on every rank of a DP replica. Micro-batches it cannot read
   stop the run on every rank with the reason;
4. prunes with `QTuningPruner` (forward-only scoring through megatron-core's schedule, global
   selection over DP, Q2 token masks, DP rebalance), each sample cut after its last target for
   scoring (`trim_to_targets`: a plain row's padding is never scored) and restored after.
   A sample is a row's `s` inputs plus its last label (`s + 1` tokens, batches.py); when the
   last position trains, the scoring forward gives that last token position `s`, whose output
   predicts nothing. With learned absolute position embeddings shorter than `s + 1`
   (`--max-position-embeddings` = `--seq-length`, Megatron-LM's default GPT setting) that
   position's id is clamped to the last row of the table for the scoring forward only
   (`scoring_positions_clamped`): causal attention keeps it out of every other position, so the
   statistics of all `s` targets are exactly those of Megatron's own forward over its `s`
   positions. The step's Q-Tuning scalars go to Megatron-LM's own TensorBoard and W&B writers
   (`megatron_writers`), at Megatron's iteration;
5. rebuilds micro-batches in the drained format from the kept samples, pads with all-zero
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
- Loss: `--calculate-per-token-loss` (which `parse_args` turns on with --enable-q-tuning) is
  required: padding contributes no tokens and the step's loss is the mean over all kept tokens.
- Learning-rate schedule and consumed samples: `train_step` increments them by the full global
  batch, which is what was read from the data (the 'shrink' policy), so they stay true.

Configurations the adapter cannot honour raise `UnsupportedConfiguration` at start-up
(`check_supported`, called by the patched `parse_args` on every rank and again by `wrap`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import zlib
from typing import Any, Callable

import torch

from q_tuning.config import QTuningConfig, RunShape
from q_tuning.megatron_lm.batches import (UnsupportedBatch, micro_batches_to_samples,
                                          num_micro_batches, padded_masks, plan_rows, row_format,
                                          samples_to_rows, trim_to_targets, untrim)
from q_tuning.observe.tensorboard import IMAGE_EVERY_ENV, log_step, tb_image_every
from q_tuning.observe.writers import TensorBoardWriter, WandbWriter, Writers
from q_tuning.parallel import comm
from q_tuning.pruner import QTuningPruner

MARKER = "_q_tuning_patch"


class UnsupportedConfiguration(ValueError):
    """`--enable-q-tuning` with a Megatron-LM setting the adapter cannot honour (start-up)."""


def log_rank_0(message: str) -> None:
    """Print on global rank 0 (before torch.distributed is up: where torchrun's RANK is 0)."""
    if comm.is_global_rank_zero() and os.environ.get("RANK", "0") == "0":
        print(f"[Q-Tuning] {message}", flush=True)


class QTuningStep:
    """Per-process adapter state: the pruner (built at the first training step) and once-only
    messages. `log`: print the pruner's report and the step line (rank 0)."""

    def __init__(self, log: bool = True) -> None:
        self.pruner: QTuningPruner | None = None
        self.log = log
        self._said: set[str] = set()

    def say_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            log_rank_0(message)

    def wrap(self, forward_backward_func: Callable, args: Any = None) -> Callable:
        """The function to give `train_step`, or `forward_backward_func` itself when Q-Tuning is
        off. `args`: Megatron-LM's `get_args()`. Raises UnsupportedConfiguration."""
        if args is None:
            from megatron.training import get_args

            args = get_args()
        if not getattr(args, "enable_q_tuning", False):
            return forward_backward_func
        check_supported(args)
        check_per_token_loss(args)

        @functools.wraps(forward_backward_func)
        def q_tuning_forward_backward(*pos, **kwargs):
            if pos:
                raise TypeError(positional_call_message(len(pos)))
            if kwargs.get("forward_only", False):
                return forward_backward_func(**kwargs)
            return self.train_step(forward_backward_func, args, **kwargs)

        setattr(q_tuning_forward_backward, MARKER, True)
        return q_tuning_forward_backward

    def train_step(self, inner: Callable, args: Any, **kwargs) -> Any:
        """Steps 1-5 of the module doc, then `inner` on the rebuilt micro-batches."""
        step = megatron_step(args)
        chunks = _chunks(kwargs["model"])
        given, count_in = kwargs["data_iterator"], kwargs["num_microbatches"]
        drained = [None if it is None else [next(it) for _ in range(count_in)]
                   for it in (given if isinstance(given, list) else [given])]
        mine = next((d for d in drained if d is not None), None)
        fmt, samples, packed, fields = _read_and_share(mine, args, f"Q-Tuning step {step}: ")
        _check_model_per_token_loss(chunks)
        scored = trim_to_targets(samples if samples is not None else fields)
        with scoring_positions_clamped(chunks, args, step):
            kept, report = self._pruner(args).prune(chunks, scored, step=step)
        kept, decision = untrim(kept), self.pruner.last_decision
        log_step(megatron_writers(), report, decision, step)
        decision.local_loss_masks = padded_masks(decision.local_loss_masks, scored["row_tokens"])
        rows = plan_rows([t.numel() - 1 for t in kept["tokens"]], seq_length=args.seq_length,
                         packed=packed)
        count = _micro_batch_count(len(rows), args.micro_batch_size, chunks)
        if self.log:
            log_rank_0(f"step {step}: kept samples {kept_summary(self.pruner)}; micro-batches per "
                       f"data-parallel rank: {count_in} -> {count} (x {args.micro_batch_size} "
                       f"rows; {len(rows)} rows of kept samples on rank 0)")
        rebuilt = None if mine is None else samples_to_rows(kept, rows, fmt, count)
        return inner(**{**kwargs, "num_microbatches": count,
                        "data_iterator": _fresh(given, drained, rebuilt)})

    def _pruner(self, args: Any) -> QTuningPruner:
        if self.pruner is None:
            # Samples are rows plus the last label, so seq_length + 1 tokens (batches.py).
            run = RunShape(micro_batch_size=args.micro_batch_size, seq_length=args.seq_length + 1,
                           total_steps=getattr(args, "train_iters", None))
            self.pruner = QTuningPruner(QTuningConfig.from_args(args), run, log=self.log)
        return self.pruner


def megatron_writers() -> Writers:
    """The TensorBoard and W&B writers Megatron-LM set up (`--tensorboard-dir`, `--wandb-project`;
    `megatron.training.global_vars`, on its last rank only, core_v0.16.1 to core_v0.19.0): the
    step's Q-Tuning scalars go there at Megatron's iteration. Empty on the other ranks, and where
    Megatron-LM's training module is not loaded (no writer to look for). The EU-plane image goes
    to TensorBoard only when `$Q_TUNING_TB_IMAGE_EVERY` asks (it needs matplotlib, which
    Megatron-LM does not)."""
    global_vars = sys.modules.get("megatron.training.global_vars")
    if global_vars is None:
        return Writers()
    tensorboard, wandb = global_vars.get_tensorboard_writer(), global_vars.get_wandb_writer()
    images = tb_image_every() if os.environ.get(IMAGE_EVERY_ENV) else 0
    return Writers([None if tensorboard is None else TensorBoardWriter(tensorboard, images),
                    None if wandb is None else WandbWriter(wandb)])


# --- start-up checks -----------------------------------------------------------------------------

def unsupported_reason(args: Any) -> str | None:
    """Why this Megatron-LM configuration cannot be pruned, naming the setting and the fix; None
    when it can."""
    if getattr(args, "q_tuning_batch_policy", "shrink") != "shrink":
        return ("--q-tuning-batch-policy refill (Megatron-LM sizes its data iterator, consumed-"
                "samples counter and learning-rate schedule by the global batch): use "
                "--q-tuning-batch-policy shrink")
    if getattr(args, "mtp_num_layers", None):
        return ("--mtp-num-layers (multi-token prediction reads shifted tokens on the last stage, "
                "which the adapter does not rebuild): drop --mtp-num-layers")
    if getattr(args, "hybrid_context_parallel", False):
        return "--hybrid-context-parallel: drop it (plain --context-parallel-size works)"
    if not getattr(args, "sft", False) and (getattr(args, "reset_position_ids", False)
                                            or getattr(args, "reset_attention_mask", False)):
        return ("--reset-position-ids / --reset-attention-mask without --sft (a row holds several "
                "documents; Q-Tuning needs one sample per row): drop them, or use --sft packed "
                "segments")
    if getattr(args, "cuda_graph_impl", "none") not in (None, "none"):
        return ("--cuda-graph-impl (captured graphs need a fixed micro-batch count): use "
                "--cuda-graph-impl none")
    if getattr(args, "ddp_average_in_collective", False):
        return ("--ddp-average-in-collective (Megatron-LM refuses it with "
                "--calculate-per-token-loss, which Q-Tuning needs so that a pruned step's loss is "
                "the mean over its kept tokens): drop --ddp-average-in-collective")
    return None


def check_supported(args: Any) -> None:
    """Raise UnsupportedConfiguration when `args` (with --enable-q-tuning) cannot be pruned. Every
    rank parses the same flags, so every rank raises."""
    reason = unsupported_reason(args)
    if reason:
        raise UnsupportedConfiguration(f"[Q-Tuning] --enable-q-tuning does not work with {reason}")


def check_per_token_loss(args: Any) -> None:
    """Raise UnsupportedConfiguration unless `--calculate-per-token-loss` is on."""
    if not getattr(args, "calculate_per_token_loss", False):
        raise UnsupportedConfiguration(
            "[Q-Tuning] --enable-q-tuning needs --calculate-per-token-loss (the patched "
            "parse_args turns it on; here it is off): without it each micro-batch's loss is its "
            "own token mean divided by the micro-batch count and pruning re-weights the kept "
            "tokens. Keep it on.")


def positional_call_message(count: int) -> str:
    return (f"[Q-Tuning] Megatron-LM's forward-backward function was called with {count} "
            "positional argument(s); with --enable-q-tuning it must be called with keyword "
            "arguments only (forward_step_func=, data_iterator=, model=, num_microbatches=, ..., "
            "as megatron.training.training.train_step of Megatron-LM core_v0.16.1 does). Pass "
            "them by keyword.")


def megatron_step(args: Any) -> int:
    """This training step's 1-based number: Megatron-LM's 0-based `args.curr_iteration` + 1."""
    iteration = getattr(args, "curr_iteration", None)
    if iteration is None:
        raise RuntimeError("[Q-Tuning] takes the step number from Megatron-LM's "
                           "args.curr_iteration, which megatron.training.training.train() sets "
                           "before each train_step; it is not set. A training loop of your own "
                           "must set it to the 0-based iteration before each step.")
    return int(iteration) + 1


def _check_model_per_token_loss(chunks: list) -> None:
    """The model config must compute the per-token loss (same on every rank: no hang)."""
    from megatron.core.utils import get_model_config

    if not get_model_config(chunks[0]).calculate_per_token_loss:
        raise UnsupportedConfiguration(
            "[Q-Tuning] the model's config has calculate_per_token_loss off although "
            "--calculate-per-token-loss is on (a model provider that builds its own "
            "TransformerConfig?): set config.calculate_per_token_loss = True")


# --- learned absolute positions ------------------------------------------------------------------

def rows_outgrow_positions(args: Any) -> bool:
    """Whether the scoring rows (`seq_length + 1` tokens) reach past a learned position table."""
    return getattr(args, "position_embedding_type", None) == "learned_absolute" and \
        (getattr(args, "max_position_embeddings", None) or 0) < args.seq_length + 1


@contextlib.contextmanager
def scoring_positions_clamped(chunks: list, args: Any, step: int):
    """While scoring: position ids past the learned table are clamped to its last row (module
    doc, step 4). No-op unless `rows_outgrow_positions`. Every rank agrees that the first stage
    has megatron-core's learned position table before the scoring forward starts."""
    tables = []
    if rows_outgrow_positions(args):
        tables = [t for c in chunks for t in position_tables(c)]
        missing = any(_is_first_stage(c) and not position_tables(c) for c in chunks)
        comm.agree_on_errors(
            "--position-embedding-type learned_absolute with --max-position-embeddings "
            f"{args.max_position_embeddings} < --seq-length + 1 = {args.seq_length + 1}, and the "
            "first pipeline stage has no megatron-core LanguageModelEmbedding position table to "
            "clamp for scoring: raise --max-position-embeddings to --seq-length + 1, or use "
            "rope" if missing else None, f"Q-Tuning step {step}: ")
    handles = [t.register_forward_pre_hook(_clamp_to_table) for t in tables]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _clamp_to_table(table: torch.nn.Embedding, inputs: tuple) -> tuple:
    return (inputs[0].clamp(max=table.num_embeddings - 1), *inputs[1:])


def position_tables(chunk: torch.nn.Module) -> list[torch.nn.Embedding]:
    """The learned position tables of megatron-core's `LanguageModelEmbedding`s in `chunk`."""
    from megatron.core.models.common.embeddings.language_model_embedding import \
        LanguageModelEmbedding

    return [m.position_embeddings for m in chunk.modules()
            if isinstance(m, LanguageModelEmbedding) and m.add_position_embedding]


def _is_first_stage(chunk: torch.nn.Module) -> bool:
    from megatron.core.utils import get_attr_wrapped_model

    return bool(get_attr_wrapped_model(chunk, "pre_process"))


# --- reading, sharing, rebuilding ----------------------------------------------------------------

def _chunks(model: Any) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


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


def _read_and_share(mine: list[dict] | None, args: Any, prefix: str):
    """(format, samples, packed, pruner fields): this rank's reading of its micro-batches (format
    and samples None where it read none) and what every rank of its TP x PP group shares. A
    problem anywhere raises the same ValueError on every rank."""
    fmt, samples, problem = _read(mine, args) if mine is not None else (None, None, None)
    shared = share_in_model_parallel_group(
        None if mine is None else (problem, fmt is not None and fmt.packed,
                                   None if samples is None else
                                   {k: samples[k] for k in ("tokens", "loss_masks")}))
    if shared is None:
        problem = ("no rank of this tensor x pipeline group read a batch (expected TP rank 0 of "
                   "the first pipeline stage to hold the training data iterator, as "
                   "megatron.training does)")
    elif shared[0] is not None:
        problem = (f"cannot read this step's micro-batches ({shared[0]}); the adapter reads "
                   "Megatron-LM's GPT micro-batches (docs/megatron_lm.md, 'Limits')")
    comm.agree_on_errors(problem, prefix)
    return fmt, samples, shared[1], shared[2]


def kept_summary(pruner: QTuningPruner) -> str:
    """The step's kept samples (global indices, DP-rank-major): the list up to 64 samples, else
    the count and a CRC32 of the keep mask."""
    keep = pruner.last_decision.selection.keep.cpu()
    kept = keep.nonzero().flatten().tolist()
    if keep.numel() <= 64:
        return f"{kept} of {keep.numel()}"
    return f"{len(kept)} of {keep.numel()} (crc32 {zlib.crc32(bytes(keep.tolist())):08x})"


def _micro_batch_count(num_rows: int, micro_batch_size: int, chunks: list) -> int:
    """The same count on every DP rank (the max); with interleaving, whole micro-batch groups
    (megatron-core's interleaved schedule needs count % group == 0 or >= PP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_model_config

    count = comm.max_over_group(num_micro_batches(num_rows, micro_batch_size),
                                ps.get_data_parallel_group())
    if len(chunks) > 1:
        group = get_model_config(chunks[0]).microbatch_group_size_per_vp_stage or \
            ps.get_pipeline_model_parallel_world_size()
        count = -(-count // group) * group
    return count


def share_in_model_parallel_group(payload: Any) -> Any:
    """Every rank of this rank's TP x PP group gets the payload of the first rank (in group order)
    that has one (not None); None if no rank has."""
    from megatron.core import parallel_state as ps

    return comm.share_first_held(payload, ps.get_model_parallel_group())


def _rerun_iterator(micro_batches: list[dict]):
    from megatron.core.rerun_state_machine import RerunDataIterator

    return RerunDataIterator(iter(micro_batches))


def _fresh(given: Any, drained: list, rebuilt: list[dict] | None) -> Any:
    """New `RerunDataIterator`s over `rebuilt`, shaped like what `train_step` passed (a list per
    model chunk, or one), where it passed one."""
    fresh = [None if d is None else _rerun_iterator(rebuilt) for d in drained]
    return fresh if isinstance(given, list) else fresh[0]
