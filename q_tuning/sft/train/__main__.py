"""`q-tuning-train` / `python -m q_tuning.sft.train`: SFT with Q-Tuning on megatron-core.

    # the main job: SmolLM2-135M-Instruct on generated GSM-Symbolic, Q-Tuning on, 2 CPU cores
    q-tuning-train --preset smollm2-gsm

    # one process, your model and data
    q-tuning-train --hf-checkpoint path/to/hf_folder --data-path train.jsonl \\
        --global-batch-size 64 --micro-batch-size 4 --train-iters 500 --lr 1e-5 \\
        --enable-q-tuning --q-tuning-sample-keep-ratio 0.5 --q-tuning-token-keep-ratio 0.7 \\
        --save ckpt --load ckpt --tensorboard-dir tb --export-hf out/hf

    # several processes / nodes: torchrun (scripts/launch_torchrun.sh) or Ray
    # (python -m q_tuning.sft.train.ray_launcher --actor-num-nodes 1 --actor-num-gpus-per-node 8)

Bad input (missing or malformed data, unsupported architecture, parallel sizes that do not divide,
an incompatible --load checkpoint, an output folder that cannot be written) ends with one
`q-tuning-train: error: ...` line and exit status 2. A failure while running that is not the
input's fault (a checkpoint that could not be written, a collective that timed out after
--distributed-timeout-minutes, another rank that died) ends with one such line and status 1.
A stop asked for (--exit-signal-handler and SIGTERM, --exit-duration-in-mins, --exit-interval)
saves and exits with status 0. See docs/user_guide.md, "Failures and recovery".
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import time
from typing import Optional, Sequence

__all__ = ["main", "run"]

_LOG_FORMAT = "%(message)s"


def main(argv: Optional[Sequence[str]] = None) -> None:
    from q_tuning.sft.train.arguments import parse_args

    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as err:  # the user's input: no traceback
        print(f"q-tuning-train: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except RuntimeError as err:
        message = _runtime_failure(err, args)
        if message is None:
            raise
        print(f"q-tuning-train: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _runtime_failure(err: RuntimeError, args: argparse.Namespace) -> Optional[str]:
    """The one-line message for a failure of the job rather than of its input (a checkpoint
    write, a timed-out collective, a peer that died); None for anything else (a bug: traceback).
    """
    from q_tuning.sft.checkpoint.files import CheckpointSaveError

    rank = f"rank {os.environ.get('RANK', '0')}"
    if isinstance(err, CheckpointSaveError):
        return f"{rank}: {err}"
    from q_tuning.parallel.process_group import is_backend_error

    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    collective = is_backend_error(err) or any(
        marker in text for marker in ("gloo", "NCCL", "ProcessGroup", "c10d"))
    if not collective:
        return None
    lowered = text.lower()
    if "timed out" in lowered or "timeout" in lowered:
        minutes = args.distributed_timeout_minutes
        return (f"{rank}: a collective did not complete within --distributed-timeout-minutes "
                f"{minutes:g} ({minutes * 60:.0f} s): another rank is stopped, hung or far "
                f"slower than this one (raise the timeout if it is only slow) [{first}]")
    if any(marker in lowered for marker in ("connection closed", "connection reset",
                                            "broken pipe", "connection refused")):
        return (f"{rank}: another rank ended while this one waited for it (its log says why) "
                f"[{first}]")
    return None


def run(args: argparse.Namespace) -> list[dict]:
    """Train as `args` say (every rank); returns the logged metrics. Raises ValueError /
    FileNotFoundError for bad input, `checkpoint.files.CheckpointSaveError` for a checkpoint that
    could not be written."""
    from q_tuning.sft.train.arguments import check_writable_paths
    from q_tuning.sft.runtime import quiet_expected_warnings

    check_writable_paths(args)  # before anything loads
    quiet_expected_warnings(args.device)
    from q_tuning.parallel import comm
    from q_tuning.parallel.process_group import leave_process_group
    from q_tuning.sft.runtime import init_distributed

    created = init_distributed(args)
    handlers = _setup_logging(args, rank_zero=comm.is_global_rank_zero())
    logging.getLogger("q_tuning.train").info(
        "q-tuning-train: %s, %d process(es)%s", time.strftime("%Y-%m-%d %H:%M:%S"),
        comm.world_size(), f", preset {args.preset}" if args.preset else "")
    try:
        trainer, history = _train(args)
        if comm.is_global_rank_zero():
            from q_tuning.sft.train.metrics import write_metrics_jsonl

            resumed = trainer.checkpointer.resume_from is not None
            write_metrics_jsonl(args.output_dir, history,
                                resumed_at=trainer.start_iteration if resumed else None)
            _print_outputs(args, trainer)
        return history
    finally:
        _remove_handlers(handlers)
        leave_process_group(created)


def _train(args: argparse.Namespace):
    """(the closed Trainer, its history): the preset's preparation, then the run."""
    from megatron.core import parallel_state as ps

    from q_tuning.sft.train.presets import get_preset
    from q_tuning.sft.train.trainer import Trainer

    if args.preset is not None and get_preset(args.preset).prepare is not None:
        get_preset(args.preset).prepare(args)
    trainer = None
    try:
        trainer = Trainer(args)
        return trainer, trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        elif ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()


def _setup_logging(args: argparse.Namespace, *, rank_zero: bool) -> list[logging.Handler]:
    """Rank 0: q_tuning's INFO lines to stdout and <output-dir>/train.log; other ranks: warnings.
    megatron-core's INFO chatter (config dumps) is held back to warnings."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if rank_zero and args.output_dir is not None:
        path = pathlib.Path(args.output_dir) / "train.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, mode="a", encoding="utf-8"))
    ours = logging.getLogger("q_tuning")
    for handler in handlers:
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        ours.addHandler(handler)
    ours.setLevel(logging.INFO if rank_zero else logging.WARNING)
    ours.propagate = False
    logging.getLogger("megatron").setLevel(logging.WARNING)
    return handlers


def _remove_handlers(handlers: list[logging.Handler]) -> None:
    ours = logging.getLogger("q_tuning")
    for handler in handlers:
        ours.removeHandler(handler)
        handler.close()


def _print_outputs(args: argparse.Namespace, trainer) -> None:
    log = logging.getLogger("q_tuning.train")
    rows = []
    if args.output_dir is not None:
        rows.append(("log", pathlib.Path(args.output_dir) / "train.log"))
        rows.append(("metrics", pathlib.Path(args.output_dir) / "metrics.jsonl"))
    if args.preset is not None and args.data_path:
        rows.append(("training data", args.data_path[0]))
    if args.tensorboard_dir:
        rows.append(("TensorBoard", f"{args.tensorboard_dir}  (tensorboard --logdir "
                                    f"{args.tensorboard_dir})"))
    if args.wandb_project:
        rows.append(("W&B", f"project {args.wandb_project}, files in {args.wandb_save_dir}"))
    saved = trainer.checkpointer.last_saved_iteration
    if args.save and saved is not None:
        from q_tuning.sft.checkpoint.files import checkpoint_path

        rows.append(("checkpoint", f"{checkpoint_path(args.save, saved)}"
                                   f"  (resume with --load {args.save})"))
    if args.export_hf:
        rows.append(("HF model", args.export_hf))
    if rows:
        log.info("outputs:")
        for name, where in rows:
            log.info("  %-14s %s", name + ":", where)


if __name__ == "__main__":
    main()
