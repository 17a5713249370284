"""`q-tuning-train` / `python -m q_tuning.train`: SFT with Q-Tuning on megatron-core.

    # the main job: SmolLM2-135M-Instruct on generated GSM-Symbolic, Q-Tuning on, 2 CPU cores
    q-tuning-train --preset smollm2-gsm

    # one process, your model and data
    q-tuning-train --hf-checkpoint path/to/hf_folder --data-path train.jsonl \\
        --global-batch-size 64 --micro-batch-size 4 --train-iters 500 --lr 1e-5 \\
        --enable-q-tuning --q-tuning-sample-keep-ratio 0.5 --q-tuning-token-keep-ratio 0.7 \\
        --save ckpt --load ckpt --tensorboard-dir tb --export-hf out/hf

    # several processes / nodes: torchrun (scripts/launch_torchrun.sh) or Ray
    # (python -m q_tuning.train.ray_launcher --actor-num-nodes 1 --actor-num-gpus-per-node 8 ...)

Bad input (missing or malformed data, unsupported architecture, parallel sizes that do not divide,
an incompatible --load checkpoint) ends with one `q-tuning-train: error: ...` line and exit
status 2.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import time
from typing import Optional, Sequence

__all__ = ["main", "run"]

_LOG_FORMAT = "%(message)s"


def main(argv: Optional[Sequence[str]] = None) -> None:
    from q_tuning.train.arguments import parse_args

    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as err:  # the user's input: no traceback
        print(f"q-tuning-train: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def run(args: argparse.Namespace) -> list[dict]:
    """Train as `args` say (every rank); returns the logged metrics. Raises ValueError /
    FileNotFoundError for bad input."""
    from q_tuning.train.trainer import quiet_expected_warnings

    quiet_expected_warnings(args)
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from q_tuning.train.presets import get_preset
    from q_tuning.train.trainer import Trainer, init_distributed

    created = init_distributed(args)
    handlers = _setup_logging(args, dist.get_rank())
    logging.getLogger("q_tuning.train").info(
        "q-tuning-train: %s, %d process(es)%s", time.strftime("%Y-%m-%d %H:%M:%S"),
        dist.get_world_size(), f", preset {args.preset}" if args.preset else "")
    try:
        if args.preset is not None and get_preset(args.preset).prepare is not None:
            get_preset(args.preset).prepare(args)
        trainer = None
        try:
            trainer = Trainer(args)
            history = trainer.train()
        finally:
            if trainer is not None:
                trainer.close()
            elif ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
        if dist.get_rank() == 0:
            _write_metrics(args, history)
            _print_outputs(args, trainer)
        return history
    finally:
        _remove_handlers(handlers)
        if created:
            dist.destroy_process_group()


def _setup_logging(args: argparse.Namespace, rank: int) -> list[logging.Handler]:
    """Rank 0: q_tuning's INFO lines to stdout and <output-dir>/train.log; other ranks: warnings.
    megatron-core's INFO chatter (config dumps) is held back to warnings."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if rank == 0 and args.output_dir is not None:
        path = pathlib.Path(args.output_dir) / "train.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, mode="a", encoding="utf-8"))
    ours = logging.getLogger("q_tuning")
    for handler in handlers:
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        ours.addHandler(handler)
    ours.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    ours.propagate = False
    logging.getLogger("megatron").setLevel(logging.WARNING)
    return handlers


def _remove_handlers(handlers: list[logging.Handler]) -> None:
    ours = logging.getLogger("q_tuning")
    for handler in handlers:
        ours.removeHandler(handler)
        handler.close()


def _write_metrics(args: argparse.Namespace, history: list[dict]) -> None:
    """<output-dir>/metrics.jsonl: one line per logged iteration (with the Q-Tuning report),
    for scripts that compare runs; written whole, then renamed into place."""
    if args.output_dir is None:
        return
    import json

    from q_tuning._files import write_text_atomic

    write_text_atomic(pathlib.Path(args.output_dir) / "metrics.jsonl",
                      (json.dumps(m, default=float) + "\n" for m in history))


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
    if args.save and trainer is not None and trainer.last_saved_iteration is not None:
        from q_tuning.train.checkpointing import checkpoint_path

        rows.append(("checkpoint", f"{checkpoint_path(args.save, trainer.last_saved_iteration)}"
                                   f"  (resume with --load {args.save})"))
    if args.export_hf:
        rows.append(("HF model", args.export_hf))
    if rows:
        log.info("outputs:")
        for name, where in rows:
            log.info("  %-14s %s", name + ":", where)


if __name__ == "__main__":
    main()
