"""The `q-tuning-train` flags: Megatron-LM / slime names, one parser, checks that name the fix.

Public API:
    build_parser() -> argparse.ArgumentParser
    parse_args(argv=None) -> argparse.Namespace
    validate_parallel_sizes(args, world_size) -> None
    check_writable_paths(args) -> None
    train_iters_for_epochs(num_samples, samples_per_step, num_epochs) -> int
    samples_per_step(args) -> int

`parse_args` applies `--preset NAME` first (its values become defaults, so any flag given on the
command line overrides them), then `--output-dir` defaults, then checks what can be checked
without the model or the process group. `validate_parallel_sizes` needs the world size; the
model dimensions are checked by `q_tuning.sft.hf.model.transformer_config_from_hf`.
"""

from __future__ import annotations

import argparse
import math
import pathlib
from typing import Sequence

from q_tuning.config import CommandLineParser, QTuningConfig, add_q_tuning_args, positive_int
from q_tuning.observe.writers import WandbConfig, add_wandb_args
from q_tuning.sft.data.config import DataConfig, add_data_format_args
from q_tuning.sft.lora.config import add_lora_args, check_lora_args
from q_tuning.sft.train.presets import PRESETS, get_preset

__all__ = ["build_parser", "parse_args", "validate_parallel_sizes", "train_iters_for_epochs",
           "samples_per_step", "check_writable_paths"]

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0.0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="q-tuning-train",
        description="Supervised fine-tuning on megatron-core with Q-Tuning (per-step sample and "
                    "token pruning). Megatron-LM / slime flag names.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="named defaults (flags given here override them): "
                             + "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()))
    parser.add_argument("--output-dir", default=None,
                        help="default home of --save (<dir>/checkpoints), --tensorboard-dir "
                             "(<dir>/tensorboard) and the log file (<dir>/train.log)")
    _add_model_args(parser)
    _add_data_args(parser)
    _add_training_args(parser)
    _add_optimizer_args(parser)
    _add_parallelism_args(parser)
    _add_checkpointing_args(parser)
    _add_logging_args(parser)
    add_lora_args(parser)
    add_q_tuning_args(parser)
    return parser


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--hf-checkpoint", default=None,
                   help="HF model folder (safetensors, config, tokenizer) or a .gguf file; "
                        "Llama, Qwen2 and Qwen3 architectures")
    g.add_argument("--tokenizer-path", default=None,
                   help="tokenizer folder or .gguf (default: --hf-checkpoint)")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 parameters and activations, fp32 main weights in the optimizer")
    g.add_argument("--make-vocab-size-divisible-by", type=positive_int, default=1,
                   help="pad the vocabulary to a multiple of this x TP (Megatron-LM uses 128 for "
                        "speed; padded logits are 0 and enter the softmax, so 1 keeps the loss "
                        "and the Q-Tuning entropy exactly those of the HF model)")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="JSONL file(s), one record per line in any format of --data-format "
                        "(docs/data.md)")
    add_data_format_args(g)
    g.add_argument("--seq-length", type=positive_int, default=2048,
                   help="longest sample in tokens; longer ones are truncated (counted in the log)")
    g.add_argument("--seed", type=int, default=1234, help="data order and RNG seed")
    g.add_argument("--strict-data", action="store_true",
                   help="stop with an error (file:line) on every record that would otherwise be "
                        "skipped (no assistant turn; no assistant token within --seq-length) "
                        "instead of counting it in the start-up summary")


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=positive_int, default=1)
    g.add_argument("--global-batch-size", type=positive_int, default=None,
                   help="samples per optimizer step over all data-parallel ranks (with "
                        "Q-Tuning: samples scored per step under 'shrink', samples trained per "
                        "step under 'refill')")
    g.add_argument("--train-iters", type=positive_int, default=None)
    g.add_argument("--num-epochs", type=positive_int, default=None,
                   help="alternative to --train-iters: floor(samples / samples consumed per "
                        "step) x epochs iterations")
    g.add_argument("--use-dynamic-batch-size", action="store_true",
                   help="pack samples first-fit into rows of at most --max-tokens-per-gpu tokens "
                        "(one row per micro-batch) instead of --micro-batch-size padded rows")
    g.add_argument("--max-tokens-per-gpu", type=positive_int, default=None)
    g.add_argument("--rollout-data-postprocess-path", nargs="+", default=None, metavar="MODULE.FN",
                   help="callable(s) (args, rollout_id, rollout_data) run on every rank each "
                        "step before the gradient step (slime's contract); rollout_data holds "
                        "per-sample lists ('tokens', 'loss_masks', 'sample_index'; with Q-Tuning "
                        "every scored sample with its statistics and 'kept'); 'loss_masks' may "
                        "be edited in place")
    g.add_argument("--check-for-nan-in-loss-and-grad", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="before each optimizer step, all ranks agree whether any rank's loss or "
                        "gradients hold NaN/inf; such a step is skipped (weights, optimizer state "
                        "and LR schedule unchanged, its samples consumed) with a warning "
                        "(Megatron-LM's flag; --no-check-for-nan-in-loss-and-grad: step anyway)")


def _add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimizer")
    g.add_argument("--lr", type=_non_negative_float, default=1e-5)
    g.add_argument("--min-lr", type=_non_negative_float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=positive_int, default=None,
                   help="default: the number of training iterations")
    g.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default="cosine")
    g.add_argument("--weight-decay", type=_non_negative_float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=_non_negative_float, default=1.0,
                   help="gradient clipping by global norm (0: off)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimizer state over data-parallel ranks (ZeRO-1)")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="overlap the data-parallel gradient reduction with the backward pass")


def _add_parallelism_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=positive_int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=positive_int, default=1)
    g.add_argument("--virtual-pipeline-model-parallel-size", type=positive_int, default=None)
    g.add_argument("--context-parallel-size", type=positive_int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available, else cpu (gloo, megatron-core via mcore_cpu)")
    g.add_argument("--distributed-backend", choices=("nccl", "gloo"), default=None,
                   help="default: nccl on cuda, gloo on cpu")
    g.add_argument("--distributed-timeout-minutes", type=_positive_float, default=30.0,
                   help="a collective that waits longer (a rank stopped, hung or far slower) "
                        "ends the job with an error naming this timeout; fractions allowed")


def _add_checkpointing_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint folder (megatron dist_checkpointing)")
    g.add_argument("--no-save", action="store_true",
                   help="write no checkpoint (by default one goes to <output-dir>/checkpoints)")
    g.add_argument("--save-interval", type=positive_int, default=None,
                   help="iterations between checkpoints (a last one is always written at the end "
                        "when --save is given)")
    g.add_argument("--load", default=None,
                   help="resume from the latest checkpoint in this folder (none there: start "
                        "from --hf-checkpoint)")
    g.add_argument("--exit-interval", type=positive_int, default=None,
                   help="stop after the first iteration divisible by this (saving a checkpoint "
                        "when --save is given); the schedule still follows --train-iters")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM (a scheduler's preemption, sent to every worker), all ranks "
                        "stop together at the end of the current iteration, save a checkpoint "
                        "when --save is given, and exit with status 0 (Megatron-LM's flag)")
    g.add_argument("--exit-duration-in-mins", type=_positive_float, default=None,
                   help="stop (saving a checkpoint when --save is given) at the end of the first "
                        "iteration after this many minutes since the trainer started, on any "
                        "rank's clock (Megatron-LM's flag; fractions allowed)")
    g.add_argument("--no-load-optim", action="store_true", help="do not restore optimizer state")
    g.add_argument("--no-load-rng", action="store_true", help="do not restore RNG states")
    g.add_argument("--export-hf", default=None,
                   help="write the final model as an HF folder (safetensors, config, tokenizer) "
                        "here")


def _add_logging_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging")
    g.add_argument("--log-interval", type=positive_int, default=1)
    g.add_argument("--tensorboard-dir", default=None)
    add_wandb_args(parser)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `argv` with the preset's defaults under the command line; errors exit via argparse."""
    parser = build_parser()
    early, _ = parser.parse_known_args(argv)
    if early.preset is not None:
        parser.set_defaults(**get_preset(early.preset).defaults)
    args = parser.parse_args(argv)
    try:
        _check(args)
    except ValueError as err:
        parser.error(str(err))
    return args


def _check(args: argparse.Namespace) -> None:
    if args.output_dir is not None:
        out = pathlib.Path(args.output_dir)
        if not args.no_save:
            args.save = args.save or str(out / "checkpoints")
        args.tensorboard_dir = args.tensorboard_dir or str(out / "tensorboard")
    if args.preset is None:
        missing = [flag for flag, value in (("--hf-checkpoint", args.hf_checkpoint),
                                            ("--data-path", args.data_path),
                                            ("--global-batch-size", args.global_batch_size))
                   if value is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} required (or use --preset, e.g. "
                             f"--preset {next(iter(PRESETS))})")
    if args.data_path is not None:
        DataConfig.from_args(args)  # errors name the flag
    if (args.train_iters is None) == (args.num_epochs is None):
        raise ValueError("give exactly one of --train-iters and --num-epochs")
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr ({args.min_lr}) must not exceed --lr ({args.lr})")
    if args.lr_warmup_iters < 0:
        raise ValueError(f"--lr-warmup-iters must be >= 0, got {args.lr_warmup_iters}")
    for flag in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, flag) < 1.0:
            raise ValueError(f"--{flag.replace('_', '-')} must be in [0, 1), got "
                             f"{getattr(args, flag)}")
    if args.use_dynamic_batch_size and args.max_tokens_per_gpu is None:
        raise ValueError("--use-dynamic-batch-size needs --max-tokens-per-gpu")
    if args.max_tokens_per_gpu is not None and not args.use_dynamic_batch_size:
        raise ValueError("--max-tokens-per-gpu only applies with --use-dynamic-batch-size")
    if args.use_dynamic_batch_size and args.max_tokens_per_gpu < args.seq_length:
        raise ValueError(f"--max-tokens-per-gpu ({args.max_tokens_per_gpu}) must be >= "
                         f"--seq-length ({args.seq_length}) so that every sample fits a row")
    if args.virtual_pipeline_model_parallel_size is not None \
            and args.pipeline_model_parallel_size == 1:
        raise ValueError("--virtual-pipeline-model-parallel-size needs "
                         "--pipeline-model-parallel-size > 1")
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1 (it splits "
                         "activations over the tensor-parallel group)")
    QTuningConfig.from_args(args)  # preset values too; errors name the flag
    check_lora_args(args)
    if args.no_save and args.save is not None:
        raise ValueError("--no-save and --save contradict each other")
    if args.save_interval is not None and args.save is None:
        raise ValueError("--save-interval needs --save")
    args.wandb_save_dir = WandbConfig.from_args(args).save_dir  # the default, for the path check


def check_writable_paths(args: argparse.Namespace) -> None:
    """ValueError naming the flag when an output location cannot be written: the path (or its
    nearest existing parent) is not a folder, is on a read-only file system, or lacks write
    permission. No side effect; `q_tuning.sft.train.__main__.run` calls it first, before anything is
    loaded (the trainer then writes a probe file into --save on every rank)."""
    for flag, path in (("--output-dir", args.output_dir), ("--save", args.save),
                       ("--tensorboard-dir", args.tensorboard_dir),
                       ("--wandb-save-dir", getattr(args, "wandb_save_dir", None)),
                       ("--export-hf", args.export_hf), ("--export-lora", args.export_lora)):
        if path is None:
            continue
        problem = _unwritable(pathlib.Path(path))
        if problem is not None:
            raise ValueError(f"{flag} {path}: {problem}; give a location this job can write to")


def _unwritable(path: pathlib.Path) -> str | None:
    import os

    target = path.absolute()
    existing = target
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return (f"{existing} exists and is not a folder" if existing == target
                else f"{existing} is a file, not a folder")
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        return f"{existing} is on a read-only file system"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"no permission to write in {existing}"
    return None


def validate_parallel_sizes(args: argparse.Namespace, world_size: int) -> None:
    """ValueError naming the dimension when the parallel sizes do not fit the world size or the
    global batch (model dimensions are checked when the model config is built)."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    cp = args.context_parallel_size
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ValueError(
            f"world size ({world_size} processes) is not divisible by tensor x pipeline x context "
            f"parallel sizes ({tp} x {pp} x {cp} = {model_parallel}): set "
            "--tensor-model-parallel-size / --pipeline-model-parallel-size / "
            "--context-parallel-size so that their product divides the number of processes")
    dp = world_size // model_parallel
    scored = samples_per_step(args)
    if scored < dp:
        raise ValueError(f"--global-batch-size: {scored} samples per step cannot be spread over "
                         f"{dp} data-parallel ranks; use at least {dp}")


def samples_per_step(args: argparse.Namespace) -> int:
    """Samples drawn from the dataset per step: G, or ceil(G / r) under Q-Tuning's refill."""
    g = args.global_batch_size
    if args.enable_q_tuning and args.q_tuning_batch_policy == "refill":
        return math.ceil(g / args.q_tuning_sample_keep_ratio - 1e-9)
    return g


def train_iters_for_epochs(num_samples: int, samples_per_step: int, num_epochs: int) -> int:
    """Whole steps per epoch (each step's batch comes from one epoch) times epochs."""
    per_epoch = num_samples // samples_per_step
    if per_epoch == 0:
        raise ValueError(f"--global-batch-size: {samples_per_step} samples per step but the "
                         f"data has only {num_samples}; use a smaller batch or more data")
    return per_epoch * num_epochs
