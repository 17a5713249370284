"""The SFT trainer: megatron-core's own parts, with Q-Tuning in front of every gradient step.

Public API:
    Trainer(args)          build everything (collective; torch.distributed must be initialised)
    Trainer.train() -> list[dict]     the logged metrics, one dict per log step
    Trainer.close()

The parts it holds: `components` builds the model, optimizer and data,
`checkpoint.policy.Checkpointer` decides about saving, resuming and the HF export,
`metrics.MetricsLogger` writes the log lines and TensorBoard; `runtime` has the process group,
`progress` and the SIGTERM flag.

One step (`train_step`), on every rank:
1. the dataset's next global batch (G samples; ceil(G / r) under Q-Tuning's `refill` policy);
   DP rank d takes the contiguous slice [n*d/dp, n*(d+1)/dp) of it;
2. Q-Tuning (`--enable-q-tuning`): `QTuningPruner.prune` scores the whole global batch with the
   current weights (no-grad, eval mode), keeps the selected samples (exactly G under `refill`),
   prunes Q2 tokens and rebalances the kept samples over DP; dropped samples leave the batch;
3. the `--rollout-data-postprocess-path` hooks, `(args, rollout_id, rollout_data)` with
   rollout_id the 1-based iteration (as in metrics.jsonl and TensorBoard): with Q-Tuning the
   pruner calls them after its decision (they see every scored sample, its statistics and
   whether it is kept, and may edit `loss_masks`),
   without it they get the step's batch (`tokens`, `loss_masks`, `sample_index`);
4. `forward_backward_step`: megatron-core's schedule with the per-token loss (the mean over all
   kept tokens of the step, across micro-batches and DP x CP ranks; the kept samples padded no
   more than the drawn ones would be), megatron's
   `finalize_model_grads`, `optimizer.step()` (clipping inside), the LR scheduler.

Failures (docs/user_guide.md, "Failures and recovery"): `--exit-signal-handler` (SIGTERM) and
`--exit-duration-in-mins` are agreed on by all ranks once per iteration (`comm.any_rank`), then
every rank stops after that iteration, saves and returns normally; `--check-for-nan-in-loss-and-
grad` (on by default) agrees before each optimizer step whether any rank's loss or gradients are
non-finite, and then skips that step on every rank; a failed save raises on every rank
`checkpoint.files.CheckpointSaveError`; data that fails to load on any rank, or differs
between ranks, is an error on every rank before the model is built.

Composability: TP / PP / VPP / CP are megatron-core's (model chunks from
`q_tuning.sft.hf.model`, the schedule from `get_forward_backward_func`); DP is megatron-core's
`DistributedDataParallel`, with the distributed optimizer as an option. The pruner runs on all of
them (see `q_tuning.pruner`). Context parallelism needs transformer-engine's attention."""

from __future__ import annotations

import argparse
import logging
import time
from typing import Optional, Sequence

import torch

from q_tuning import QTuningConfig, QTuningPruner, RunShape, StepReport
from q_tuning.observe import load_hooks
from q_tuning.parallel import comm
from q_tuning.sft.train.arguments import (samples_per_step, train_iters_for_epochs,
                                      validate_parallel_sizes)
from q_tuning.sft.checkpoint.policy import Checkpointer, TrainingParts, TrainState, run_fingerprint
from q_tuning.sft.train.components import (build_data, build_model, build_optimizer,
                                       build_transformer_config, init_parallel_state,
                                       max_tokens_per_row)
from q_tuning.sft.train.metrics import MetricsLogger, StepResult
from q_tuning.sft.runtime import ExitSignal, use_cuda

logger = logging.getLogger("q_tuning.train")

__all__ = ["Trainer"]


class Trainer:
    """Build with `Trainer(args)` (every rank), run `train()`, always `close()`."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.start_time = time.time()  # --exit-duration-in-mins counts from here
        self.exit_signal = ExitSignal()
        if args.exit_signal_handler:  # from here on SIGTERM means "stop after this iteration"
            self.exit_signal.install()
        try:
            self._build()
        except BaseException:
            self.exit_signal.restore()
            raise

    def _build(self) -> None:
        from q_tuning.sft.hf.model import read_hf_config

        # core configs (checked before anything expensive or anything is written)
        args = self.args
        self.world_size = comm.world_size()
        self.cuda = use_cuda(args.device)
        validate_parallel_sizes(args, self.world_size)
        self.hf_config = read_hf_config(args.hf_checkpoint)
        self.transformer_config = build_transformer_config(args, self.hf_config, cuda=self.cuda)
        self.dp_rank, self.dp_size = init_parallel_state(args)
        self.checkpointer = Checkpointer(args, run_fingerprint(
            args, self.hf_config, self.transformer_config, world_size=self.world_size))
        self.checkpointer.check_save_folder()

        # data
        self.tokenizer, self.dataset = build_data(args, world_size=self.world_size)
        self.samples_per_step = samples_per_step(args)
        self.train_iters = args.train_iters or train_iters_for_epochs(
            len(self.dataset), self.samples_per_step, args.num_epochs)
        self.dataset.batches_per_epoch(self.samples_per_step)  # checks G <= dataset size
        resume_from = self.checkpointer.find_resume_checkpoint()

        # swappable components (a resumed run reads its weights from the checkpoint)
        self.model = build_model(args, self.hf_config, self.transformer_config, cuda=self.cuda,
                                 load_hf_weights=resume_from is None)
        self.optimizer, self.scheduler = build_optimizer(
            args, self.model, self.transformer_config, train_iters=self.train_iters)
        self.postprocess_hooks = load_hooks(args.rollout_data_postprocess_path or [])
        # With Q-Tuning the pruner calls the hooks itself, between its decision and the
        # rebalance, with the scored samples and their statistics (`QTuningPruner.rollout_data`).
        run = RunShape(micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
                       max_tokens_per_row=max_tokens_per_row(args), total_steps=self.train_iters)
        self.pruner = (QTuningPruner(QTuningConfig.from_args(args), run, log=False,
                                     hooks=self.postprocess_hooks, hook_args=args)
                       if args.enable_q_tuning else None)

        # runtime state
        self.state = TrainState()
        self.stop_reason: Optional[str] = None  # why train() stopped before train_iters
        if resume_from is not None:
            self.checkpointer.resume(self._checkpointed_parts(), self.state)
        self.start_iteration = self.state.iteration  # 0, or the resumed checkpoint's iteration
        self.metrics = MetricsLogger(args, train_iters=self.train_iters, pruner=self.pruner)

    def _checkpointed_parts(self) -> TrainingParts:
        return TrainingParts(model=self.model, optimizer=self.optimizer,
                             scheduler=self.scheduler, dataset=self.dataset, pruner=self.pruner)

    def save(self):
        return self.checkpointer.save(self._checkpointed_parts(), self.state)

    def export_hf(self):
        return self.checkpointer.export_hf(self.model, self.hf_config, self.tokenizer)

    def export_lora(self):
        return self.checkpointer.export_lora(self.model)

    # -- one step ---------------------------------------------------------------------------------

    def next_batch(self) -> dict[str, list]:
        """This DP rank's contiguous share of the next global batch, as per-sample lists."""
        samples = self.dataset.next_global_batch(self.samples_per_step)
        n = len(samples)
        mine = samples[n * self.dp_rank // self.dp_size: n * (self.dp_rank + 1) // self.dp_size]
        return {"tokens": [s.tokens for s in mine], "loss_masks": [s.loss_mask for s in mine],
                "sample_index": [s.index for s in mine]}

    def select(self, batch: dict[str, list]) -> tuple[dict[str, list], Optional[StepReport]]:
        """Q-Tuning's pruning (which runs the postprocess hooks), or the hooks alone."""
        rollout_id = self.state.iteration + 1
        if self.pruner is not None:
            refill = self.args.q_tuning_batch_policy == "refill"
            return self.pruner.prune(
                self.model, batch, keep_count=self.args.global_batch_size if refill else None,
                step=rollout_id)
        for hook in self.postprocess_hooks:
            hook(self.args, rollout_id, batch)
        return batch, None

    def forward_backward_step(self, batch: dict[str, list],
                              padding_reference: Optional[Sequence[int]] = None
                              ) -> tuple[torch.Tensor, Optional[float], Optional[str]]:
        """Gradient step on `batch`; returns ([sum of token losses, loss tokens] of this rank's
        micro-batches (zeros off the last pipeline stage), grad norm, and why the optimizer step
        was skipped (None: it was not)). `padding_reference`: the token counts of the samples
        drawn for the step, whose padding bounds the kept samples' (`training_micro_batches`).

        `--check-for-nan-in-loss-and-grad`: all ranks agree whether any rank's loss or gradients
        (after the data-parallel reduction) hold NaN/inf; if so no rank steps the optimizer or
        the LR schedule. megatron-core's optimizer itself skips only on a loss-scaler overflow
        (fp16), which this trainer does not use, so without the check such a step would write
        NaN into the weights.
        """
        from q_tuning.passes.training import forward_backward

        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = forward_backward(self.model, batch, micro_batch_size=self.args.micro_batch_size,
                                   max_tokens_per_row=max_tokens_per_row(self.args),
                                   padding_reference=padding_reference)
        loss = torch.zeros(2, dtype=torch.float64)
        for out in outputs:
            loss += out["lm loss"].detach().to("cpu", torch.float64)
        skipped = None
        if self.args.check_for_nan_in_loss_and_grad:
            bad_loss, bad_grad = comm.any_rank([not bool(torch.isfinite(loss).all()),
                                                not self._local_grads_finite()])
            if bad_loss or bad_grad:
                skipped = " and ".join(w for w, bad in (("loss", bad_loss),
                                                        ("gradients", bad_grad)) if bad)
        if skipped is not None:
            return loss, None, skipped
        update_successful, grad_norm, _ = self.optimizer.step()
        if update_successful:
            self.scheduler.step(increment=1)
        return loss, grad_norm, None if update_successful else "the optimizer's overflow check"

    def _local_grads_finite(self) -> bool:
        """Whether this rank's gradient buffers hold only finite values (one sum per buffer: a
        NaN or inf anywhere makes it non-finite, and no extra memory is needed)."""
        for chunk in self.model:
            for buffer in list(chunk.buffers) + list(chunk.expert_parallel_buffers):
                if not bool(torch.isfinite(buffer.grad_data.sum(dtype=torch.float32))):
                    return False
        return True

    def _global_sums(self, loss: torch.Tensor, batch: dict[str, list]
                     ) -> tuple[float, float, int, int, int]:
        """(loss sum, loss count) of the schedule and (samples with a loss token, tokens, loss
        tokens) of the batch, summed over the step's ranks; the same on every rank."""
        from megatron.core import parallel_state as ps

        # The loss lives on the last stage, split over DP x CP; the counts per replica.
        comm.all_reduce_sum_(loss, ps.get_data_parallel_group(with_context_parallel=True))
        comm.broadcast_from_last_stage(loss, ps.get_pipeline_model_parallel_group())
        counts = torch.tensor([
            sum(1 for m in batch["loss_masks"] if bool(m[1:].any())),
            sum(t.numel() for t in batch["tokens"]),
            sum(int(m[1:].count_nonzero()) for m in batch["loss_masks"])], dtype=torch.float64)
        comm.all_reduce_sum_(counts, ps.get_data_parallel_group())
        samples, tokens, loss_tokens = (int(x) for x in counts.tolist())
        loss_sum, loss_count = loss.tolist()
        return loss_sum, loss_count, samples, tokens, loss_tokens

    def train_step(self) -> StepResult:
        """One iteration (module docstring); returns the step's global numbers."""
        start = time.perf_counter()
        drawn = self.next_batch()
        batch, report = self.select(drawn)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step applies
        loss, grad_norm, skipped = self.forward_backward_step(
            batch, padding_reference=[t.numel() for t in drawn["tokens"]])
        loss_sum, loss_count, samples, tokens, loss_tokens = self._global_sums(loss, batch)
        if int(loss_count) != loss_tokens:
            raise RuntimeError(f"iteration {self.state.iteration + 1}: the schedule counted "
                               f"{int(loss_count)} loss tokens, the batch has {loss_tokens}")
        self._advance(samples, tokens, skipped, loss_sum, loss_tokens)
        return StepResult(iteration=self.state.iteration, loss_sum=loss_sum,
                          loss_tokens=loss_tokens, loss=loss_sum / max(loss_count, 1.0), lr=lr,
                          grad_norm=grad_norm, samples=samples, tokens=tokens,
                          seconds=time.perf_counter() - start, q_tuning=report, skipped=skipped)

    def _advance(self, samples: int, tokens: int, skipped: Optional[str], loss_sum: float,
                 loss_tokens: int) -> None:
        """Count the iteration in `state` (a skipped step consumes its samples, trains none)."""
        state = self.state
        state.iteration += 1
        state.consumed_samples += self.samples_per_step
        if skipped is None:
            state.trained_samples += samples
            state.trained_tokens += tokens
            return
        state.skipped_iterations += 1
        if comm.is_global_rank_zero():
            logger.warning(
                "iteration %d: non-finite %s (global loss sum %s over %d tokens); "
                "--check-for-nan-in-loss-and-grad: optimizer step skipped on every rank "
                "(weights, optimizer state and LR schedule unchanged; the step's samples "
                "are consumed; %d skipped so far)", state.iteration, skipped, loss_sum,
                loss_tokens, state.skipped_iterations)

    # -- the loop ---------------------------------------------------------------------------------

    def train(self) -> list[dict]:
        """Train to `train_iters`, logging, saving and exporting as the flags say.

        Stops early, after a complete iteration and on every rank together, on SIGTERM
        (`--exit-signal-handler`), after `--exit-duration-in-mins` or at `--exit-interval`; it
        then saves (with --save) and returns normally, without the --export-hf export (the run
        is not finished: resume it with --load). `stop_reason` says why.
        """
        logger.info("training: %d iterations of %d samples (%s), %d data-parallel rank(s), "
                    "starting at iteration %d", self.train_iters, self.samples_per_step,
                    "Q-Tuning " + self.args.q_tuning_batch_policy if self.pruner
                    else "no pruning", self.dp_size, self.state.iteration)
        self.metrics.begin()
        step = None
        try:
            while self.state.iteration < self.train_iters:
                step = self.train_step()
                self.metrics.record(step, self.state)
                if self.checkpointer.due(self.state.iteration):
                    self.save()
                if self.state.iteration == self.train_iters:
                    break
                # At the end of every iteration, as Megatron-LM (a signal during start-up is
                # acted on after the first iteration).
                self.stop_reason = self._stop_reason()
                if self.stop_reason is not None:
                    break
            if step is not None:  # a stop between log lines: log what was trained
                self.metrics.flush(step, self.state)
            self._finish()
        finally:
            self.exit_signal.restore()
        return self.metrics.history

    def _stop_reason(self) -> Optional[str]:
        """Collective (when an exit flag is set): why every rank stops now, or None."""
        args, iteration = self.args, self.state.iteration
        reason = self._agreed_stop()
        if reason is None and args.exit_interval and iteration % args.exit_interval == 0:
            reason = f"--exit-interval {args.exit_interval}"
        return reason

    def _agreed_stop(self) -> Optional[str]:
        """SIGTERM or --exit-duration-in-mins on any rank (collective when either flag is set)."""
        args = self.args
        if not (args.exit_signal_handler or args.exit_duration_in_mins):
            return None
        elapsed = (time.time() - self.start_time) / 60.0
        signalled, timed_out = comm.any_rank([
            self.exit_signal.received,
            args.exit_duration_in_mins is not None and elapsed > args.exit_duration_in_mins])
        if signalled:
            return f"received {self.exit_signal.sig.name} (--exit-signal-handler)"
        if timed_out:
            return (f"--exit-duration-in-mins {args.exit_duration_in_mins:g} reached "
                    f"({elapsed:.2f} minutes on this rank)")
        return None

    def _finish(self) -> None:
        """The last checkpoint (unless just saved) and, for a finished run, the HF export."""
        args, iteration = self.args, self.state.iteration
        unsaved = bool(args.save) and not self.checkpointer.has_saved(iteration)
        if self.stop_reason is not None:
            logger.info("%s: stopping after iteration %d of %d%s", self.stop_reason, iteration,
                        self.train_iters,
                        f", saving a checkpoint to {args.save}" if unsaved else "")
        if unsaved and iteration > 0:
            self.save()
        for flag, export in (("--export-hf", args.export_hf and self.export_hf),
                             ("--export-lora", args.export_lora and self.export_lora)):
            if export and self.stop_reason is None:
                export()
            elif export:
                logger.info("%s: not exported, the run stopped before --train-iters (resume it "
                            "with --load to finish and export)", flag)

    def close(self) -> None:
        from megatron.core import parallel_state as ps

        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        if getattr(self, "exit_signal", None) is not None:
            self.exit_signal.restore()
        ps.destroy_model_parallel()
