"""The no-grad scoring forward through megatron-core's own pipeline schedules.

Two ways to get the per-token statistics of the response positions (`method`):
- "fused" (default): for the scoring call, the last stage's output layer returns its input (the
  final hidden states after the final norm) instead of logits; the response positions' hidden
  states are then projected through the output weight shard block by block
  (`fused_nll_entropy`), so no `[tokens, vocab]` logits exist and prompt positions are never
  projected.
- "logits": the model's logits `[b, s, V/tp]`, then `token_nll_entropy` on the response
  positions. The reference, and the fallback.

Fallback rule: where the fused path cannot be trusted to give the model's own logits (the chunk is
not megatron-core's `GPTModel` or its post-processing is overridden, the output layer is not a
plain `ColumnParallelLinear` (e.g. a LoRA wrapper), multi-token prediction is on, or the output
layer was not called during the forward), that chunk is scored with the logits path instead:
logged once per reason and process, never an error.

Composability, axis by axis:
- TP: the vocabulary is sharded (logits `[b, s, V/tp]`, or the weight shard `[V/tp, h]` in the
  fused path); the statistics combine the shards with all-reduces of `[tokens]`-sized tensors,
  never gathering the vocabulary. With sequence parallelism the fused path all-gathers the
  sequence-sharded hidden states over TP first (`[s/tp, b, h]` -> `[s, b, h]`), as the output
  layer itself would.
- PP (1F1B and interleaved): the schedule runs the stages; only the chunk with the output layer
  (last stage) computes statistics, which are broadcast to the other stages.
- CP: each rank holds the zigzag chunks r and 2cp-1-r (megatron-core's
  `get_batch_on_this_cp_rank`); it scores the positions it holds and a sum over the CP group
  reassembles the unsplit result. The statistics are token-local, so both paths need nothing else.
- DP: each DP replica scores its own samples; the selection gathers across DP (pruner.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from functools import partial
from typing import Iterator, Sequence

import torch

from q_tuning.config import SCORING_METHODS
from q_tuning.fused_stats import fused_nll_entropy, fused_workspace_bytes
from q_tuning.lse_stats import check_targets
from q_tuning.parallel import comm
from q_tuning.passes.microbatch import (build_micro_batches, check_thd_context_parallel,
                                          model_inputs, plan_rows, round_up,
                                          slice_for_context_parallel, takes_packed_seq_params)
from q_tuning.token_stats import token_nll_entropy, token_stats_workspace_bytes

logger = logging.getLogger(__name__)

# Cap of the default scoring micro-batch size, as a multiple of the training one: beyond a few
# times the training size the forward is as efficient as it gets, and the memory estimate behind
# the default (`default_scoring_micro_batch_size`) is rough.
MAX_SCORING_MICRO_BATCH_MULTIPLE = 8


@dataclasses.dataclass
class TokenScores:
    """Per-token statistics of this DP replica's samples, identical on all its ranks."""

    nll: torch.Tensor  # [n, L] float32, nll of token j given tokens < j; 0 where not a target
    entropy: torch.Tensor  # [n, L] float32
    target_mask: torch.Tensor  # [n, L] bool, loss-mask targets that were scored (j >= 1)
    method: str = "fused"  # what scored the output stage: "fused", or "logits" (chosen or fallback)
    # Peak memory of the scoring pass in bytes, max over the pipeline stages. On CUDA, when the
    # pass sets a new process-wide peak: measured, `torch.cuda.max_memory_allocated` after the
    # pass minus what was allocated at its start (the forward's activations included); the
    # counter is never reset. Otherwise (CPU, or a pass below an earlier peak): computed from
    # tensor sizes, the largest
    # over micro-batches of what the statistics step holds (the model output it receives, its
    # response rows and the statistics workspace); the decoder's own transient memory is not in it.
    peak_memory_bytes: int = 0
    peak_memory_measured: bool = False  # True: the CUDA measurement; False: the size estimate
    rows_per_micro_batch: int = 0  # scoring micro-batch size used (rows; packed rows count 1)


@dataclasses.dataclass(frozen=True)
class ParallelGroups:
    tp: object
    pp: object
    cp: object
    dp: object
    tp_size: int
    pp_size: int
    cp_size: int
    is_last_stage: bool

    @classmethod
    def from_parallel_state(cls) -> "ParallelGroups":
        from megatron.core import parallel_state as ps

        return cls(tp=ps.get_tensor_model_parallel_group(), pp=ps.get_pipeline_model_parallel_group(),
                   cp=ps.get_context_parallel_group(), dp=ps.get_data_parallel_group(),
                   tp_size=ps.get_tensor_model_parallel_world_size(),
                   pp_size=ps.get_pipeline_model_parallel_world_size(),
                   cp_size=ps.get_context_parallel_world_size(),
                   is_last_stage=ps.is_pipeline_last_stage(ignore_virtual=True))


def target_masks(loss_masks: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """`[n, length]` bool of scorable targets: the loss mask without position 0 (nothing predicts
    the first token)."""
    out = torch.zeros(len(loss_masks), length, dtype=torch.bool)
    for i, m in enumerate(loss_masks):
        out[i, 1:m.numel()] = m[1:].bool()
    return out


@contextlib.contextmanager
def eval_mode(chunks: Sequence[torch.nn.Module]):
    """Scoring uses the current weights without dropout; training mode is restored after."""
    was = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        yield
    finally:
        for c, mode in zip(chunks, was):
            c.train(mode)


# --- the fused path: hidden states out of the output layer ----------------------------------------

@dataclasses.dataclass
class OutputHead:
    """What the output layer would have multiplied the hidden states with."""

    weight: torch.Tensor  # [V/tp, h]
    bias: torch.Tensor | None  # [V/tp]


class _HiddenStatesTap:
    """For one forward call, `layer` (the model's ColumnParallelLinear output layer) returns its
    input, the final hidden states `[s, b, h]`, instead of logits, and records the weight and bias
    it was given; `GPTModel` then hands them on as `[b, s, h]`. Restored on exit, even on error.
    """

    def __init__(self, layer: torch.nn.Module):
        self.layer = layer
        self.head: OutputHead | None = None

    def __enter__(self) -> "_HiddenStatesTap":
        self._shadowed = self.layer.__dict__.get("forward")  # an instance-level forward, if any
        self.layer.forward = self._forward
        return self

    def __exit__(self, *exc) -> None:
        if self._shadowed is None:
            del self.layer.forward
        else:
            self.layer.forward = self._shadowed

    def _forward(self, input_, weight=None, runtime_gather_output=None):
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        layer = self.layer
        weight = layer.weight if weight is None else weight  # tied: GPTModel passes the embedding
        bias = None if layer.skip_bias_add else layer.bias  # GPTModel drops a skipped bias too
        if layer.sequence_parallel:  # [s/tp, b, h] -> [s, b, h], as the layer would gather it
            input_ = gather_from_sequence_parallel_region(input_, group=layer.tp_group)
        self.head = OutputHead(weight=weight, bias=bias)
        return input_, None


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module") and not hasattr(chunk, "output_layer") \
            and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def _fused_unsupported(model: torch.nn.Module) -> str | None:
    """Why the fused path cannot score this (post-processing) chunk, or None if it can."""
    import megatron.core
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import ColumnParallelLinear

    version = getattr(megatron.core, "__version__", "?")
    own_postprocess = getattr(GPTModel, "_postprocess", None)
    if not isinstance(model, GPTModel) or getattr(type(model), "_postprocess", None) \
            is not own_postprocess:
        return (f"{type(model).__name__} is not megatron.core.models.gpt.GPTModel with its own "
                f"post-processing (megatron-core {version})")
    layer = getattr(model, "output_layer", None)
    if not isinstance(layer, ColumnParallelLinear) or \
            type(layer).forward is not ColumnParallelLinear.forward:
        return (f"output_layer is {type(layer).__name__}, not a plain "
                f"megatron.core.tensor_parallel.ColumnParallelLinear (megatron-core {version})")
    if getattr(model.config, "mtp_num_layers", None):
        return "multi-token prediction is on (the output layer runs more than once)"
    if layer.weight is None and not model.share_embeddings_and_output_weights:
        return "the output layer has no weight"
    return None


_LOGGED: set[str] = set()


def _fall_back(reason: str, groups: "ParallelGroups") -> None:
    """Log the fallback once per reason and process, on one rank of the output stage (TP, CP and
    DP rank 0): one line per run."""
    if reason in _LOGGED:
        return
    _LOGGED.add(reason)
    if all(comm.rank_in(g) == 0 for g in (groups.tp, groups.cp, groups.dp)):
        logger.warning("Q-Tuning scoring: fused output-layer statistics unavailable (%s); "
                       "scoring with the logits path", reason)


# --- per micro-batch ------------------------------------------------------------------------------

@dataclasses.dataclass
class ScoringRun:
    """State shared by the forward steps and statistics of one `score_samples` call."""

    groups: ParallelGroups
    method: str
    used: set = dataclasses.field(default_factory=set)  # methods that scored a micro-batch
    peak_bytes: int = 0  # largest statistics-step footprint (see TokenScores.peak_memory_bytes)
    validate_targets: bool = True  # False: `score_samples` checked every token id once


@dataclasses.dataclass
class ScoredPositions:
    """One micro-batch's loss-mask positions, found on the host before it moves to the model's
    device (so no device read decides the selection): their indices in the flattened `[b * s]`
    model output (on the device), and the sample and token each one predicts (host)."""

    flat: torch.Tensor  # [n] long, model device
    sample: torch.Tensor  # [n] long, host
    target: torch.Tensor  # [n] long, host

    @classmethod
    def of(cls, mb: dict, device: torch.device) -> "ScoredPositions":
        flat = (mb["loss_mask"] > 0).flatten().nonzero().squeeze(1)
        return cls(flat=flat.to(device, non_blocking=True),
                   sample=mb["sample_index"].flatten()[flat],
                   target=mb["target_index"].flatten()[flat])


def _scoring_forward_step(run: ScoringRun, data_iterator: Iterator[dict],
                          model: torch.nn.Module):
    mb = next(data_iterator)
    device = next(model.parameters()).device
    positions = ScoredPositions.of(mb, device)
    mb = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in mb.items()}
    inputs, kwargs = model_inputs(mb)
    inner = _unwrap(model)
    statistics = partial(token_statistics, run, positions, mb["labels"])
    if run.method != "fused" or not getattr(inner, "post_process", True):
        return model(*inputs, **kwargs), partial(statistics, None)
    reason = _fused_unsupported(inner)
    if reason is not None:
        _fall_back(reason, run.groups)
        return model(*inputs, **kwargs), partial(statistics, None)
    with _HiddenStatesTap(inner.output_layer) as tap:
        output = model(*inputs, **kwargs)  # [b, s, h] hidden states if the tap ran, else logits
    if tap.head is None:
        _fall_back(f"{type(inner).__name__}.forward did not call its output_layer", run.groups)
    return output, partial(statistics, tap.head)


def token_statistics(run: ScoringRun, positions: ScoredPositions, labels: torch.Tensor,
                     head: OutputHead | None, output: torch.Tensor, non_loss_data: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`([2, n] nll and entropy on the model's device, sample, target)` of the loss-mask
    positions only: prompt positions never enter the softmax (nor, on the fused path, the output
    layer). `output` is `[b, s, h]` hidden states with `head`, else `[b, s, V/tp]` logits. Nothing
    here reads the device: the values are copied to the host once per pass (`score_samples`)."""
    rows = output.reshape(-1, output.shape[-1]).index_select(0, positions.flat)  # [n, h|V/tp]
    targets = labels.reshape(-1).index_select(0, positions.flat)  # [n]
    check = run.validate_targets
    if head is None:
        nll, ent = token_nll_entropy(rows, targets, run.groups.tp, validate_targets=check)
        workspace = token_stats_workspace_bytes(rows.shape[0], rows.shape[-1], rows.device,
                                                dtype=rows.dtype)
    else:
        nll, ent = fused_nll_entropy(rows, head.weight, targets, head.bias, run.groups.tp,
                                     validate_targets=check)
        workspace = fused_workspace_bytes(rows.shape[0], head.weight.shape[0], head.weight.dtype,
                                          head.weight.device)
    run.used.add("logits" if head is None else "fused")
    footprint = (output.numel() + rows.numel()) * output.element_size() + workspace
    run.peak_bytes = max(run.peak_bytes, footprint)
    return torch.stack([nll, ent]), positions.sample, positions.target


# --- the default scoring micro-batch size ---------------------------------------------------------

def default_scoring_micro_batch_size(num_rows: int, training_micro_batch_size: int, config,
                                     vocab_size: int, *, tp_size: int = 1, pp_size: int = 1,
                                     count_multiple: int = 1, method: str = "fused") -> int:
    """Rows per scoring micro-batch when the user did not set one.

    Memory bound: the scoring forward runs between training steps (no training activations are
    alive) and without autograd, so a stage holds one layer's transient activations at a time, not
    the activations of all its layers that the training step keeps for backward. Per token, with
    `A = 34 h / tp` bytes per layer (megatron's activation estimate, 16-bit, order of magnitude
    only), `L = num_layers / pp` layers per stage and the last stage's output part
    (training: `V/tp` logits in 16 bit plus the loss's float32 copy and its gradient, 10 bytes each;
    scoring: `4 h` for the fused path, `V/tp x 10` for the logits path):

        multiple = floor((L A + 10 V/tp) / (A + output_scoring)),  clamped to [1, 8]

    so a scoring micro-batch of `multiple x training_micro_batch_size` rows needs no more memory
    than a training micro-batch did. The same on every rank of a pipeline (config values only).

    Then the rows are spread evenly: `m = ceil(num_rows / max_rows)` micro-batches, at least `pp`
    when there are that many rows (so the pipeline fills), rounded up to `count_multiple`
    (interleaved schedules), and `ceil(num_rows / m)` rows each, so that no micro-batch is mostly
    padding.
    """
    hidden, layers = config.hidden_size, max(1, config.num_layers // pp_size)
    per_layer = 34 * hidden / tp_size
    train_out = 10 * vocab_size / tp_size
    score_out = 4 * hidden if method == "fused" else train_out
    multiple = math.floor((layers * per_layer + train_out) / (per_layer + score_out))
    multiple = min(max(multiple, 1), MAX_SCORING_MICRO_BATCH_MULTIPLE)
    max_rows = max(1, training_micro_batch_size) * multiple
    if num_rows == 0:
        return max_rows
    count = math.ceil(num_rows / max_rows)
    if pp_size > 1:
        count = max(count, min(pp_size, num_rows))
    count = round_up(count, count_multiple)
    return math.ceil(num_rows / count)


# --- the pass -------------------------------------------------------------------------------------

def score_samples(model_chunks: Sequence[torch.nn.Module], tokens: Sequence[torch.Tensor],
                  loss_masks: Sequence[torch.Tensor], *, rows_per_micro_batch: int | None = None,
                  training_micro_batch_size: int = 1, max_tokens_per_row: int | None = None,
                  method: str = "fused", groups: ParallelGroups | None = None,
                  tokens_checked: bool = False) -> TokenScores:
    """Score this DP replica's samples with one forward-only pass of megatron-core's schedule.

    `rows_per_micro_batch` None: `default_scoring_micro_batch_size` from
    `training_micro_batch_size`. `method`: "fused" or "logits" (module docstring).
    `tokens_checked`: the caller already checked every token id against the vocabulary (the
    pruner's validation does), so the pass skips its own check and that host read.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    if method not in SCORING_METHODS:
        raise ValueError(f"scoring method must be one of {SCORING_METHODS}, got {method!r}")
    groups = groups or ParallelGroups.from_parallel_state()
    config = get_model_config(model_chunks[0])
    multiple = 2 * groups.cp_size if groups.cp_size > 1 else 1
    if getattr(config, "sequence_parallel", False):
        multiple *= groups.tp_size
    count_multiple = 1
    if len(model_chunks) > 1:  # interleaved: whole groups of micro-batches per virtual stage
        count_multiple = getattr(config, "microbatch_group_size_per_vp_stage", None) \
            or groups.pp_size
    if rows_per_micro_batch is None and max_tokens_per_row is None:
        rows_per_micro_batch = default_scoring_micro_batch_size(
            len(tokens), training_micro_batch_size, config,
            getattr(_unwrap(model_chunks[0]), "vocab_size", 0), tp_size=groups.tp_size,
            pp_size=groups.pp_size, count_multiple=count_multiple, method=method)
    thd = takes_packed_seq_params(model_chunks[0])
    check_thd_context_parallel(thd, groups.cp_size, max_tokens_per_row)
    # Without pipeline parallelism no p2p buffer fixes the shape: rows sorted by length, cut into
    # length buckets, each micro-batch padded to its own longest row (as the training step).
    layout = plan_rows([t.numel() for t in tokens], rows_per_micro_batch=rows_per_micro_batch,
                       max_tokens_per_row=max_tokens_per_row, length_multiple=multiple,
                       uniform_length=groups.pp_size > 1)
    count = layout.num_micro_batches
    if count:
        count = round_up(count, count_multiple)
    micro_batches = [slice_for_context_parallel(mb, groups.cp)
                     for mb in build_micro_batches(tokens, loss_masks, layout,
                                                   num_micro_batches=count, thd=thd)]
    length = max((t.numel() for t in tokens), default=0)
    scores = torch.zeros(2, len(tokens), length, dtype=torch.float32)  # (nll|entropy, n, L)
    # Every token id checked once per pass (one host read, or none when the caller checked), not
    # in each micro-batch's statistics.
    vocab = getattr(_unwrap(model_chunks[0]), "vocab_size", None)
    if vocab and tokens and not tokens_checked:
        check_targets(torch.cat([t.reshape(-1) for t in tokens]), vocab)
    run = ScoringRun(groups=groups, method=method, validate_targets=not vocab)
    device = next(model_chunks[0].parameters()).device
    cuda = device.type == "cuda"
    if cuda:  # the process-wide peak counter is read, never reset (Megatron and users report it)
        peak_before = torch.cuda.max_memory_allocated(device)
        start_bytes = torch.cuda.memory_allocated(device)
    if count:
        forward_backward = get_forward_backward_func()
        with torch.no_grad(), eval_mode(model_chunks):
            collected = forward_backward(
                forward_step_func=partial(_scoring_forward_step, run),
                data_iterator=[iter(micro_batches) for _ in model_chunks],
                model=list(model_chunks), num_microbatches=count,
                seq_length=layout.seq_length, micro_batch_size=layout.rows_per_micro_batch,
                forward_only=True, collect_non_loss_data=True)
        if groups.is_last_stage and collected:  # one device-to-host copy for the whole pass
            stats, sample, target = (torch.cat(parts, -1) for parts in zip(*collected))
            scores[:, sample, target] = stats.cpu()
    # Measured when the pass set a new process peak; else it stayed below an earlier peak and the
    # size estimate stands in.
    measured = cuda and torch.cuda.max_memory_allocated(device) > peak_before
    peak = torch.cuda.max_memory_allocated(device) - start_bytes if measured else run.peak_bytes
    comm.sum_over_context_parallel(scores, groups.cp)
    comm.broadcast_from_last_stage(scores, groups.pp)
    # Only the output stage knows whether it fell back and what its statistics held: one
    # all-reduce (MAX over the stages) for both.
    logits_used, peak = comm.all_reduce_max_(torch.tensor(
        [int(method == "logits" or "logits" in run.used), int(peak)], dtype=torch.long,
        device=device), groups.pp).tolist()  # the model's device: CUDA under NCCL, CPU under gloo
    return TokenScores(nll=scores[0], entropy=scores[1],
                       target_mask=target_masks(loss_masks, length),
                       method="logits" if logits_used else "fused",
                       peak_memory_bytes=peak,
                       peak_memory_measured=measured,
                       rows_per_micro_batch=layout.rows_per_micro_batch)
