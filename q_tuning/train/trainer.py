"""The SFT trainer: megatron-core's own parts, with Q-Tuning in front of every gradient step.

Public API:
    Trainer(args)          build everything (collective; torch.distributed must be initialised)
    Trainer.train() -> list[dict]     the logged metrics, one dict per log step
    Trainer.close()
    init_distributed(args) -> bool    (True when this call created the process group)
    quiet_expected_warnings(args)     (before megatron-core is imported)
    progress(what)         context manager: start / still-running / done lines for long work

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
   kept tokens of the step, across micro-batches and DP x CP ranks), megatron's
   `finalize_model_grads`, `optimizer.step()` (clipping inside), the LR scheduler.

Failures (docs/user_guide.md, "Failures and recovery"): `--exit-signal-handler` (SIGTERM) and
`--exit-duration-in-mins` are agreed on by all ranks once per iteration (`comm.any_rank`), then
every rank stops after that iteration, saves and returns normally; `--check-for-nan-in-loss-and-
grad` (on by default) agrees before each optimizer step whether any rank's loss or gradients are
non-finite, and then skips that step on every rank; a failed save raises
`checkpointing.CheckpointSaveError` on every rank; data that fails to load on any rank, or differs
between ranks, is an error on every rank before the model is built.

Composability: TP / PP / VPP / CP are megatron-core's (model chunks from
`q_tuning.train.model`, the schedule from `get_forward_backward_func`); DP is megatron-core's
`DistributedDataParallel`, with the distributed optimizer as an option. The pruner runs on all of
them (see `q_tuning.pruner`). Context parallelism needs transformer-engine's attention.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import logging
import math
import pathlib
import random
import signal
import threading
import time
import warnings
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from q_tuning import QTuningConfig, QTuningPruner, RunShape, StepReport, format_report
from q_tuning.parallel.process_group import join_process_group
from q_tuning.observe import load_hooks, log_step
from q_tuning.parallel import comm
from q_tuning.train import checkpointing
from q_tuning.train.arguments import (samples_per_step, train_iters_for_epochs,
                                      validate_parallel_sizes)

logger = logging.getLogger("q_tuning.train")

__all__ = ["Trainer", "init_distributed", "progress",
           "quiet_expected_warnings"]



# --- runtime utilities ---------------------------------------------------------------------------

def _use_cuda(args: argparse.Namespace) -> bool:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu)")
    return args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())


def init_distributed(args: argparse.Namespace) -> bool:
    """Join (or for one process create) the default process group (`join_process_group`);
    returns whether this call created it."""
    return join_process_group(cuda=_use_cuda(args), backend=args.distributed_backend,
                              timeout_minutes=args.distributed_timeout_minutes)


def quiet_expected_warnings(args: argparse.Namespace) -> None:
    """Silence megatron-core warnings that say nothing to act on here; call before importing it.

    On CPU its fallbacks to pure-PyTorch kernels ("Transformer Engine and Apex are not
    installed") are the plan; on GPU they stay visible. "full scope is deprecated" comes from
    megatron-core 0.16's own TransformerConfig default.
    """
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    if not _use_cuda(args):
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        warnings.filterwarnings("ignore", message="Apex is not installed")


@contextlib.contextmanager
def progress(what: str, every: float = 10.0):
    """Log `what ...`, then `... still <what> (N s)` every `every` seconds, then `done in N s`.

    For opaque long calls (GGUF de-quantisation, tokenising, writing checkpoints). Global rank 0
    only; the ticker is a daemon thread that touches no torch state.
    """
    if dist.is_initialized() and dist.get_rank() != 0:
        yield
        return
    logger.info("%s ...", what)
    start = time.perf_counter()
    stop = threading.Event()

    def tick():
        while not stop.wait(every):
            logger.info("  ... still %s (%.0f s)", what, time.perf_counter() - start)

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
    logger.info("%s: done in %.1f s", what, time.perf_counter() - start)


def _seed_everything(seed: int) -> None:
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


class _ExitSignal:
    """Megatron-LM's DistributedSignalHandler (`--exit-signal-handler`): the handler only sets a
    flag; the trainer all-reduces it once per iteration so that every rank stops after the same
    one. Signal handlers can be set in the main thread only; elsewhere (an embedding program's
    worker thread) this warns and does nothing."""

    def __init__(self, sig: signal.Signals = signal.SIGTERM):
        self.sig = sig
        self.received = False
        self._previous = None
        self.installed = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("--exit-signal-handler: not in the main thread, %s is not handled",
                           self.sig.name)
            return
        self._previous = signal.signal(self.sig, self._handle)
        self.installed = True

    def _handle(self, signum, frame) -> None:  # nothing else here: it interrupts any code
        self.received = True

    def restore(self) -> None:
        if self.installed:
            signal.signal(self.sig, self._previous)
            self.installed = False


@dataclasses.dataclass(slots=True)
class _Interval:
    """Sums over the steps since the last log line (loss sums over steps not skipped)."""

    steps: int = 0
    skipped: int = 0
    loss_sum: float = 0.0
    loss_tokens: int = 0
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0


# --- the trainer ---------------------------------------------------------------------------------

class Trainer:
    """Build with `Trainer(args)` (every rank), run `train()`, always `close()`."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.start_time = time.time()  # --exit-duration-in-mins counts from here
        self.exit_signal = _ExitSignal()
        if args.exit_signal_handler:  # from here on SIGTERM means "stop after this iteration"
            self.exit_signal.install()
        try:
            self._build()
        except BaseException:
            self.exit_signal.restore()
            raise

    def _build(self) -> None:
        from q_tuning.train import model as hf_model

        # core configs (checked before anything expensive or anything is written)
        args = self.args
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.cuda = _use_cuda(args)
        validate_parallel_sizes(args, self.world_size)
        self.hf_config = hf_model.read_hf_config(args.hf_checkpoint)
        self.transformer_config = self._transformer_config(hf_model)
        self._init_parallel_state()
        self._check_save_folder()

        # data
        self.tokenizer, self.dataset = self._build_data()
        self.samples_per_step = samples_per_step(args)
        self.train_iters = args.train_iters or train_iters_for_epochs(
            len(self.dataset), self.samples_per_step, args.num_epochs)
        self.dataset.batches_per_epoch(self.samples_per_step)  # checks G <= dataset size
        self.resume_from = self._checkpoint_to_resume()

        # swappable components
        self.model = self._build_model(hf_model)
        self.optimizer, self.scheduler = self._build_optimizer()
        self.postprocess_hooks = load_hooks(args.rollout_data_postprocess_path or [])
        # With Q-Tuning the pruner calls the hooks itself, between its decision and the
        # rebalance, with the scored samples and their statistics (`QTuningPruner.rollout_data`).
        run = RunShape(micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
                       max_tokens_per_row=self._max_tokens_per_row(),
                       total_steps=self.train_iters)
        self.pruner = (QTuningPruner(QTuningConfig.from_args(args), run, log=False,
                                     hooks=self.postprocess_hooks, hook_args=args)
                       if args.enable_q_tuning else None)

        # runtime state
        self.iteration = 0
        self.consumed_samples = 0
        self.trained_samples = 0
        self.trained_tokens = 0
        self.skipped_iterations = 0  # optimizer steps skipped for non-finite loss or gradients
        self.last_saved_iteration: Optional[int] = None
        self.stop_reason: Optional[str] = None  # why train() stopped before train_iters
        if self.resume_from is not None:
            self._resume()
        self.start_iteration = self.iteration  # 0, or the resumed checkpoint's iteration
        self.writer = self._tensorboard_writer()

    # -- building ---------------------------------------------------------------------------------

    def _init_parallel_state(self) -> None:
        from megatron.core import parallel_state as ps

        args = self.args
        ps.initialize_model_parallel(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
            context_parallel_size=args.context_parallel_size,
            distributed_timeout_minutes=args.distributed_timeout_minutes)
        _seed_everything(args.seed)
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()

    def _check_save_folder(self) -> None:
        """Every rank writes a probe file into --save (each writes its own shards there); any
        failure is an error on every rank, before the data and the model load."""
        if self.args.save is None:
            return
        error = comm.errors_on_ranks(checkpointing.check_writable(self.args.save))
        if error is not None:
            raise ValueError(f"--save {self.args.save}: {error}")

    def _build_data(self):
        """Tokenizer and dataset, read on every rank. A failure on any rank (bad data, a missing
        file, a tokenizer that does not load) or ranks that read different data are an error on
        every rank, so no rank goes on into the model's collectives alone."""
        from q_tuning.train.assets import load_tokenizer
        from q_tuning.train.data import SFTDataset

        args = self.args
        error, tokenizer, dataset = None, None, None
        try:
            with progress("loading the tokenizer"):
                tokenizer = load_tokenizer(args.tokenizer_path or args.hf_checkpoint)
            with progress(f"tokenizing {', '.join(args.data_path)}"):
                dataset = SFTDataset.from_jsonl(args.data_path, tokenizer,
                                                seq_length=args.seq_length, seed=args.seed,
                                                strict=args.strict_data)
        except (ValueError, OSError) as err:  # DataError, FileNotFoundError, I/O errors
            if self.world_size == 1:
                raise
            error = str(err)
        agreed = comm.errors_on_ranks(error)
        if agreed is not None:
            raise ValueError(error if error is not None and agreed.startswith("all ")
                             else agreed)
        what = f"{len(dataset)} samples, digest {dataset.digest()}"
        seen = comm.all_gather_objects(what, None)
        if len(set(seen)) > 1:
            raise ValueError("the ranks read different training data (" + "; ".join(
                f"rank {r}: {w}" for r, w in enumerate(seen)) + "): give every rank the same "
                "--data-path files, --seq-length and tokenizer")
        return tokenizer, dataset

    def _checkpoint_to_resume(self) -> Optional[pathlib.Path]:
        """The `--load` checkpoint, checked against this run before the model is built."""
        args = self.args
        if args.load is None:
            return None
        path = checkpointing.find_checkpoint(args.load)
        if self.rank == 0:
            for partial in checkpointing.incomplete_checkpoints(args.load):
                logger.warning("--load %s: ignoring %s: a save that did not finish (never "
                               "loaded; the next save of that iteration replaces it)", args.load,
                               partial)
        if path is None:
            logger.info("--load %s: no checkpoint there, starting from %s", args.load,
                        args.hf_checkpoint)
            return None
        saved = checkpointing.read_trainer_state(path)
        checkpointing.check_compatible(saved["fingerprint"], self.fingerprint(),
                                       load_optim=not args.no_load_optim)
        return path

    def _transformer_config(self, hf_model):
        args = self.args
        if args.context_parallel_size > 1 and not (
                self.cuda and importlib.util.find_spec("transformer_engine") is not None):
            raise ValueError("--context-parallel-size > 1 needs transformer-engine on CUDA "
                             "(megatron-core's local attention refuses context parallelism)")
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        # Model dimensions vs the parallel sizes are checked here (the error names them).
        return hf_model.transformer_config_from_hf(
            self.hf_config, tp=args.tensor_model_parallel_size,
            pp=args.pipeline_model_parallel_size,
            vpp=args.virtual_pipeline_model_parallel_size, cp=args.context_parallel_size,
            sequence_parallel=args.sequence_parallel, params_dtype=dtype,
            calculate_per_token_loss=True,  # SPEC 5: global mean over the step's kept tokens
            use_cpu_initialization=not self.cuda)

    def fingerprint(self) -> dict:
        """What a checkpoint must share with this run to be loaded (see `check_compatible`)."""
        from q_tuning.train.model import hf_architecture, padded_vocab_size

        c, a = self.transformer_config, self.args
        return {
            "model": {"architecture": hf_architecture(self.hf_config),
                      "num_layers": c.num_layers, "hidden_size": c.hidden_size,
                      "ffn_hidden_size": c.ffn_hidden_size,
                      "num_attention_heads": c.num_attention_heads,
                      "num_query_groups": c.num_query_groups, "kv_channels": c.kv_channels,
                      "vocab_size": self.hf_config.vocab_size,
                      "padded_vocab_size": padded_vocab_size(
                          self.hf_config.vocab_size, tp=a.tensor_model_parallel_size,
                          make_vocab_size_divisible_by=a.make_vocab_size_divisible_by),
                      "tied_embeddings": bool(getattr(self.hf_config, "tie_word_embeddings",
                                                      False))},
            "parallel": {"tp": a.tensor_model_parallel_size, "pp": a.pipeline_model_parallel_size,
                         "vpp": a.virtual_pipeline_model_parallel_size,
                         "cp": a.context_parallel_size, "world_size": self.world_size},
            "optimizer": {"distributed": bool(a.use_distributed_optimizer),
                          "bf16": bool(a.bf16)},
        }

    def _build_model(self, hf_model) -> list:
        from megatron.core.distributed import (DistributedDataParallel,
                                               DistributedDataParallelConfig,
                                               finalize_model_grads)
        from megatron.core.transformer.module import Float16Module

        args, config = self.args, self.transformer_config
        chunks = hf_model.build_gpt_model_chunks(
            self.hf_config, config=config,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
        if self.cuda:
            chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
        if self.resume_from is None:  # a resumed run reads its weights from the checkpoint
            with progress(f"loading weights from {args.hf_checkpoint}"):
                hf_model.load_hf_weights(chunks, args.hf_checkpoint)
        if args.bf16:
            chunks = [Float16Module(config, c) for c in chunks]
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=args.bf16, overlap_grad_reduce=args.overlap_grad_reduce,
            use_distributed_optimizer=args.use_distributed_optimizer)
        # Megatron-LM's get_model: buckets only for the first chunk of a virtual pipeline.
        model = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=c,
                                         disable_bucketing=i > 0)
                 for i, c in enumerate(chunks)]
        config.finalize_model_grads_func = finalize_model_grads
        if args.overlap_grad_reduce:
            no_sync = [m.no_sync for m in model]
            config.no_sync_func = no_sync[0] if len(model) == 1 else no_sync
        return model

    def _build_optimizer(self):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        args = self.args
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.min_lr,
                            weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
                            adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
                            clip_grad=args.clip_grad, bf16=args.bf16,
                            params_dtype=self.transformer_config.params_dtype,
                            use_distributed_optimizer=args.use_distributed_optimizer),
            self.model)
        self.transformer_config.grad_scale_func = optimizer.scale_loss
        decay_iters = args.lr_decay_iters or self.train_iters
        if args.lr_warmup_iters >= decay_iters:
            raise ValueError(f"--lr-warmup-iters ({args.lr_warmup_iters}) must be smaller than "
                             f"the LR decay length ({decay_iters} iterations: --lr-decay-iters "
                             "or the number of training iterations)")
        scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
            lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=decay_iters,
            lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
            end_wd=args.weight_decay, wd_incr_steps=self.train_iters, wd_incr_style="constant",
            # The flags of this run win; the checkpoint only gives the position (num_steps).
            use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
        return optimizer, scheduler

    def _max_tokens_per_row(self) -> Optional[int]:
        return self.args.max_tokens_per_gpu if self.args.use_dynamic_batch_size else None

    def _tensorboard_writer(self):
        if self.rank != 0 or not self.args.tensorboard_dir:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ValueError("--tensorboard-dir needs the 'tensorboard' package: "
                             "pip install 'q-tuning[plot]'") from err
        return SummaryWriter(log_dir=self.args.tensorboard_dir)

    # -- checkpoints ------------------------------------------------------------------------------

    def _resume(self) -> None:
        args = self.args
        saved = checkpointing.read_trainer_state(self.resume_from)
        same_split = saved["fingerprint"]["parallel"] == self.fingerprint()["parallel"]
        if not same_split and not args.no_load_rng:
            logger.warning("--load: the checkpoint has another parallel split (%s); RNG states "
                           "are not restored", saved["fingerprint"]["parallel"])
        with progress(f"loading checkpoint {self.resume_from}"):
            state = checkpointing.load_checkpoint(
                self.resume_from, self.model, self.optimizer, load_optim=not args.no_load_optim,
                load_rng=same_split and not args.no_load_rng)
        self.dataset.load_state_dict(state["dataset"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration = self.last_saved_iteration = state["iteration"]
        self.consumed_samples = state["consumed_samples"]
        self.trained_samples = state["trained_samples"]
        self.trained_tokens = state["trained_tokens"]
        if self.pruner is not None:
            self.pruner.step = state["q_tuning_step"]
        logger.info("resumed from %s at iteration %d", self.resume_from, self.iteration)

    def save(self) -> pathlib.Path:
        state = {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                 "trained_samples": self.trained_samples, "trained_tokens": self.trained_tokens,
                 "dataset": self.dataset.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "q_tuning_step": self.pruner.step if self.pruner is not None else 0,
                 "fingerprint": self.fingerprint(), "args": vars(self.args).copy()}
        with progress(f"saving checkpoint of iteration {self.iteration} to {self.args.save}"):
            path = checkpointing.save_checkpoint(
                self.args.save, self.iteration, self.model, self.optimizer, state,
                use_distributed_optimizer=self.args.use_distributed_optimizer)
        self.last_saved_iteration = self.iteration
        return path

    def export_hf(self) -> pathlib.Path:
        from q_tuning.train.model import save_hf_checkpoint

        with progress(f"exporting the model as an HF folder to {self.args.export_hf}"):
            return save_hf_checkpoint(self.model, self.hf_config, self.tokenizer,
                                      self.args.export_hf)

    # -- training ---------------------------------------------------------------------------------

    def next_batch(self) -> dict[str, list]:
        """This DP rank's contiguous share of the next global batch, as per-sample lists."""
        samples = self.dataset.next_global_batch(self.samples_per_step)
        n = len(samples)
        mine = samples[n * self.dp_rank // self.dp_size: n * (self.dp_rank + 1) // self.dp_size]
        return {"tokens": [s.tokens for s in mine], "loss_masks": [s.loss_mask for s in mine],
                "sample_index": [s.index for s in mine]}

    def forward_backward_step(self, batch: dict[str, list]
                              ) -> tuple[torch.Tensor, Optional[float], Optional[str]]:
        """Gradient step on `batch`; returns ([sum of token losses, loss tokens] of this rank's
        micro-batches (zeros off the last pipeline stage), grad norm, and why the optimizer step
        was skipped (None: it was not)).

        `--check-for-nan-in-loss-and-grad`: all ranks agree whether any rank's loss or gradients
        (after the data-parallel reduction) hold NaN/inf; if so no rank steps the optimizer or
        the LR schedule. megatron-core's optimizer itself skips only on a loss-scaler overflow
        (fp16), which this trainer does not use, so without the check such a step would write
        NaN into the weights.
        """
        from q_tuning.parallel.training import forward_backward

        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = forward_backward(self.model, batch, micro_batch_size=self.args.micro_batch_size,
                                   max_tokens_per_row=self._max_tokens_per_row())
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

    def train_step(self) -> dict:
        """One iteration (module docstring); returns the step's global metrics."""
        from megatron.core import parallel_state as ps

        start = time.perf_counter()
        batch = self.next_batch()
        report = None
        if self.pruner is not None:  # runs the postprocess hooks too
            refill = self.args.q_tuning_batch_policy == "refill"
            batch, report = self.pruner.prune(
                self.model, batch, keep_count=self.args.global_batch_size if refill else None,
                step=self.iteration + 1)
        else:
            for hook in self.postprocess_hooks:
                hook(self.args, self.iteration + 1, batch)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step applies
        loss, grad_norm, skipped = self.forward_backward_step(batch)

        # Global sums: the loss lives on the last stage, split over DP x CP; counts per replica.
        dist.all_reduce(loss, group=ps.get_data_parallel_group(with_context_parallel=True))
        comm.broadcast_from_last_stage(loss, ps.get_pipeline_model_parallel_group())
        counts = torch.tensor([
            sum(1 for m in batch["loss_masks"] if bool(m[1:].any())),
            sum(t.numel() for t in batch["tokens"]),
            sum(int(m[1:].count_nonzero()) for m in batch["loss_masks"])], dtype=torch.float64)
        dist.all_reduce(counts, group=ps.get_data_parallel_group())
        samples, tokens, loss_tokens = (int(x) for x in counts.tolist())
        loss_sum, loss_count = loss.tolist()
        if int(loss_count) != loss_tokens:
            raise RuntimeError(f"iteration {self.iteration + 1}: the schedule counted "
                               f"{int(loss_count)} loss tokens, the batch has {loss_tokens}")
        self.iteration += 1
        self.consumed_samples += self.samples_per_step
        if skipped is None:
            self.trained_samples += samples
            self.trained_tokens += tokens
        else:
            self.skipped_iterations += 1
            if self.rank == 0:
                logger.warning(
                    "iteration %d: non-finite %s (global loss sum %s over %d tokens); "
                    "--check-for-nan-in-loss-and-grad: optimizer step skipped on every rank "
                    "(weights, optimizer state and LR schedule unchanged; the step's samples "
                    "are consumed; %d skipped so far)", self.iteration, skipped, loss_sum,
                    loss_tokens, self.skipped_iterations)
        return {"iteration": self.iteration, "loss_sum": loss_sum, "loss_tokens": loss_tokens,
                "loss": loss_sum / max(loss_count, 1.0), "lr": lr, "grad_norm": grad_norm,
                "samples": samples, "tokens": tokens, "seconds": time.perf_counter() - start,
                "q_tuning": report, "skipped": skipped}

    def train(self) -> list[dict]:
        """Train to `train_iters`, logging, saving and exporting as the flags say.

        Stops early, after a complete iteration and on every rank together, on SIGTERM
        (`--exit-signal-handler`), after `--exit-duration-in-mins` or at `--exit-interval`; it
        then saves (with --save) and returns normally, without the --export-hf export (the run
        is not finished: resume it with --load). `stop_reason` says why.
        """
        args = self.args
        logger.info("training: %d iterations of %d samples (%s), %d data-parallel rank(s), "
                    "starting at iteration %d", self.train_iters, self.samples_per_step,
                    "Q-Tuning " + args.q_tuning_batch_policy if self.pruner else "no pruning",
                    self.dp_size, self.iteration)
        history: list[dict] = []
        interval = _Interval()
        start = time.perf_counter()
        try:
            while self.iteration < self.train_iters:
                step = self.train_step()
                interval.steps += 1
                if step["skipped"] is None:
                    interval.loss_sum += step["loss_sum"]
                    interval.loss_tokens += step["loss_tokens"]
                    interval.samples += step["samples"]
                    interval.tokens += step["tokens"]
                else:
                    interval.skipped += 1
                interval.seconds += step["seconds"]
                if self.iteration % args.log_interval == 0 or self.iteration == self.train_iters:
                    history.append(self._log(step, interval, time.perf_counter() - start))
                    interval = _Interval()
                if args.save_interval and self.iteration % args.save_interval == 0:
                    self.save()
                if self.iteration == self.train_iters:
                    break
                # At the end of every iteration, as Megatron-LM (a signal during start-up is
                # acted on after the first iteration).
                self.stop_reason = self._agreed_stop()
                if self.stop_reason is None and args.exit_interval \
                        and self.iteration % args.exit_interval == 0:
                    self.stop_reason = f"--exit-interval {args.exit_interval}"
                if self.stop_reason is not None:
                    break
            if interval.steps:  # a stop between log lines: log what was trained
                history.append(self._log(step, interval, time.perf_counter() - start))
            if self.stop_reason is not None:
                logger.info("%s: stopping after iteration %d of %d%s", self.stop_reason,
                            self.iteration, self.train_iters,
                            f", saving a checkpoint to {args.save}" if args.save
                            and self.last_saved_iteration != self.iteration else "")
            if args.save and self.last_saved_iteration != self.iteration and self.iteration > 0:
                self.save()
            if args.export_hf:
                if self.stop_reason is None:
                    self.export_hf()
                else:
                    logger.info("--export-hf: not exported, the run stopped before --train-iters "
                                "(resume it with --load to finish and export)")
        finally:
            self.exit_signal.restore()
        return history

    def _agreed_stop(self) -> Optional[str]:
        """Collective (when an exit flag is set): why every rank stops now, or None."""
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

    def _log(self, step: dict, interval: _Interval, elapsed: float) -> dict:
        trained = interval.steps - interval.skipped
        metrics = {
            "iteration": self.iteration,
            "loss": interval.loss_sum / max(interval.loss_tokens, 1) if trained else math.nan,
            "step_loss": step["loss"],
            "lr": step["lr"],
            "grad_norm": step["grad_norm"],
            "tokens_per_second": interval.tokens / max(interval.seconds, 1e-9),
            "seconds_per_iteration": interval.seconds / interval.steps,
            "samples": interval.samples, "tokens": interval.tokens,
            "loss_tokens": interval.loss_tokens,
            "trained_samples": self.trained_samples, "trained_tokens": self.trained_tokens,
            "consumed_samples": self.consumed_samples,
            "skipped_iterations": interval.skipped,
            "q_tuning": None if step["q_tuning"] is None else step["q_tuning"].to_json(),
        }
        if self.rank == 0:
            grad = "n/a" if metrics["grad_norm"] is None else f"{metrics['grad_norm']:.4f}"
            eta = (self.train_iters - self.iteration) * metrics["seconds_per_iteration"]
            logger.info(
                "iteration %5d/%5d | loss %.4f | lr %.3e | grad norm %s | %.1f tokens/s | "
                "%.1f s/it | samples %d, tokens %d (total %d, %d) | elapsed %.0f s, eta %.0f s",
                self.iteration, self.train_iters, metrics["loss"], metrics["lr"], grad,
                metrics["tokens_per_second"], metrics["seconds_per_iteration"],
                metrics["samples"], metrics["tokens"], self.trained_samples, self.trained_tokens,
                elapsed, eta)
            if interval.skipped:
                logger.info("  %d of these %d iteration(s) skipped (non-finite loss or "
                            "gradients; %d in this run)", interval.skipped, interval.steps,
                            self.skipped_iterations)
            if step["q_tuning"] is not None:
                for line in format_report(step["q_tuning"]).splitlines():
                    logger.info("%s", line)
            self._write_scalars(metrics, step["q_tuning"])
        return metrics

    def _write_scalars(self, metrics: dict, report: StepReport | None) -> None:
        if self.writer is None:
            return
        it = metrics["iteration"]
        for key in ("loss", "lr", "tokens_per_second", "seconds_per_iteration", "samples",
                    "tokens", "loss_tokens", "trained_samples", "trained_tokens",
                    "consumed_samples", "grad_norm"):
            if metrics[key] is not None:
                self.writer.add_scalar(f"train/{key}", metrics[key], it)
        if report is not None:  # last_decision belongs to the step just trained
            log_step(self.writer, report, self.pruner.last_decision, it)
        self.writer.flush()

    def close(self) -> None:
        from megatron.core import parallel_state as ps

        if getattr(self, "writer", None) is not None:
            self.writer.close()
            self.writer = None
        if getattr(self, "exit_signal", None) is not None:
            self.exit_signal.restore()
        ps.destroy_model_parallel()
