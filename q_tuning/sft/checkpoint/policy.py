"""When to checkpoint: what a checkpoint must share with this run, whether and from where to
resume, when to save, and the HF export at the end. The files themselves are
`checkpoint.files`'s.

Public API:
    TrainState                 the run's position and counters (what `save` records)
    run_fingerprint(args, hf_config, transformer_config, *, world_size) -> dict
    Checkpointer(args, fingerprint)
        .check_save_folder()            collective: --save writable on every rank
        .find_resume_checkpoint()       the --load checkpoint, checked against this run
        .resume(parts, state)           collective: weights, optimizer, RNG, data position
        .save(parts, state)             collective
        .export_hf(model, hf_config, tokenizer)    merged weights with LoRA
        .export_lora(model)                        the peft adapter (--export-lora)
        .due(iteration), .has_saved(iteration)
    TrainingParts                       what a checkpoint holds besides the counters
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
from typing import Any, Optional

from q_tuning.parallel import comm
from q_tuning.sft.checkpoint import files as checkpointing
from q_tuning.sft.lora import checkpoint as lora_checkpoint
from q_tuning.sft.runtime import progress

logger = logging.getLogger("q_tuning.train")

__all__ = ["Checkpointer", "TrainState", "TrainingParts", "run_fingerprint"]


@dataclasses.dataclass(slots=True)
class TrainState:
    """Where the run is; all but `skipped_iterations` (this run's) are saved and resumed."""

    iteration: int = 0
    consumed_samples: int = 0
    trained_samples: int = 0
    trained_tokens: int = 0
    skipped_iterations: int = 0  # optimizer steps skipped for non-finite loss or gradients


@dataclasses.dataclass(slots=True)
class TrainingParts:
    """The stateful components a checkpoint saves and restores."""

    model: list
    optimizer: Any
    scheduler: Any
    dataset: Any
    pruner: Any  # QTuningPruner or None


def run_fingerprint(args: argparse.Namespace, hf_config, transformer_config, *,
                    world_size: int) -> dict:
    """What a checkpoint must share with this run to be loaded (see `check_compatible`)."""
    from q_tuning.sft.hf.model import hf_architecture, padded_vocab_size

    c, a = transformer_config, args
    return {
        "model": {"architecture": hf_architecture(hf_config),
                  "num_layers": c.num_layers, "hidden_size": c.hidden_size,
                  "ffn_hidden_size": c.ffn_hidden_size,
                  "num_attention_heads": c.num_attention_heads,
                  "num_query_groups": c.num_query_groups, "kv_channels": c.kv_channels,
                  "vocab_size": hf_config.vocab_size,
                  "padded_vocab_size": padded_vocab_size(
                      hf_config.vocab_size, tp=a.tensor_model_parallel_size,
                      make_vocab_size_divisible_by=a.make_vocab_size_divisible_by),
                  "tied_embeddings": bool(getattr(hf_config, "tie_word_embeddings", False)),
                  "lora": lora_checkpoint.run_fingerprint(args)},  # None: full fine-tuning
        "parallel": {"tp": a.tensor_model_parallel_size, "pp": a.pipeline_model_parallel_size,
                     "vpp": a.virtual_pipeline_model_parallel_size,
                     "cp": a.context_parallel_size, "world_size": world_size},
        "optimizer": {"distributed": bool(a.use_distributed_optimizer), "bf16": bool(a.bf16)},
    }


class Checkpointer:
    """--save / --load / --save-interval / --export-hf of one run (every rank holds one)."""

    def __init__(self, args: argparse.Namespace, fingerprint: dict):
        self.args = args
        self.fingerprint = fingerprint
        self.resume_from: Optional[pathlib.Path] = None  # set by find_resume_checkpoint
        self.last_saved_iteration: Optional[int] = None

    def check_save_folder(self) -> None:
        """Every rank writes a probe file into --save (each writes its own shards there); any
        failure is an error on every rank, before the data and the model load."""
        if self.args.save is None:
            return
        error = comm.errors_on_ranks(checkpointing.check_writable(self.args.save))
        if error is not None:
            raise ValueError(f"--save {self.args.save}: {error}")

    def find_resume_checkpoint(self) -> Optional[pathlib.Path]:
        """The `--load` checkpoint, checked against this run before the model is built (None:
        start from --hf-checkpoint); also kept as `resume_from`."""
        args = self.args
        if args.load is None:
            return None
        path = checkpointing.find_checkpoint(args.load)
        if comm.is_global_rank_zero():
            for partial in checkpointing.incomplete_checkpoints(args.load):
                logger.warning("--load %s: ignoring %s: a save that did not finish (never "
                               "loaded; the next save of that iteration replaces it)", args.load,
                               partial)
        if path is None:
            logger.info("--load %s: no checkpoint there, starting from %s", args.load,
                        args.hf_checkpoint)
            return None
        saved = checkpointing.read_trainer_state(path)
        checkpointing.check_compatible(saved["fingerprint"], self.fingerprint,
                                       load_optim=not args.no_load_optim)
        self.resume_from = path
        return path

    def resume(self, parts: TrainingParts, state: TrainState) -> None:
        """Collective: load `resume_from` into `parts` and `state` (RNG states only at the
        checkpoint's own parallel split)."""
        args, path = self.args, self.resume_from
        saved = checkpointing.read_trainer_state(path)
        same_split = saved["fingerprint"]["parallel"] == self.fingerprint["parallel"]
        if not same_split and not args.no_load_rng:
            logger.warning("--load: the checkpoint has another parallel split (%s); RNG states "
                           "are not restored", saved["fingerprint"]["parallel"])
        with progress(f"loading checkpoint {path}"):
            loaded = checkpointing.load_checkpoint(
                path, parts.model, parts.optimizer, load_optim=not args.no_load_optim,
                load_rng=same_split and not args.no_load_rng)
        parts.dataset.load_state_dict(loaded["dataset"])
        parts.scheduler.load_state_dict(loaded["scheduler"])
        state.iteration = self.last_saved_iteration = loaded["iteration"]
        state.consumed_samples = loaded["consumed_samples"]
        state.trained_samples = loaded["trained_samples"]
        state.trained_tokens = loaded["trained_tokens"]
        if parts.pruner is not None:
            parts.pruner.step = loaded["q_tuning_step"]
        logger.info("resumed from %s at iteration %d", path, state.iteration)

    def due(self, iteration: int) -> bool:
        """Whether --save-interval asks for a checkpoint after `iteration`."""
        return bool(self.args.save_interval) and iteration % self.args.save_interval == 0

    def has_saved(self, iteration: int) -> bool:
        """Whether the checkpoint of `iteration` has been written by this run (or resumed)."""
        return self.last_saved_iteration == iteration

    def save(self, parts: TrainingParts, state: TrainState) -> pathlib.Path:
        """Collective: checkpoint `state.iteration` under --save."""
        trainer_state = {
            "iteration": state.iteration, "consumed_samples": state.consumed_samples,
            "trained_samples": state.trained_samples, "trained_tokens": state.trained_tokens,
            "dataset": parts.dataset.state_dict(), "scheduler": parts.scheduler.state_dict(),
            "q_tuning_step": parts.pruner.step if parts.pruner is not None else 0,
            "fingerprint": self.fingerprint, "args": vars(self.args).copy()}
        with progress(f"saving checkpoint of iteration {state.iteration} to {self.args.save}"):
            path = checkpointing.save_checkpoint(
                self.args.save, state.iteration, parts.model, parts.optimizer, trainer_state,
                use_distributed_optimizer=self.args.use_distributed_optimizer)
        self.last_saved_iteration = state.iteration
        return path

    def export_hf(self, model: list, hf_config, tokenizer) -> pathlib.Path:
        """Collective: the model as an HF folder at --export-hf (with LoRA: the merged weights
        W + alpha/R B A)."""
        from q_tuning.sft.lora.layers import merged_weights
        from q_tuning.sft.hf.model import save_hf_checkpoint

        with progress(f"exporting the model as an HF folder to {self.args.export_hf}"), \
                merged_weights(model):
            return save_hf_checkpoint(model, hf_config, tokenizer, self.args.export_hf)

    def export_lora(self, model: list) -> pathlib.Path:
        """Collective: the adapters as an HF peft adapter folder at --export-lora."""
        from q_tuning.sft.lora.config import LoRAConfig
        from q_tuning.sft.lora.export import save_peft_adapter

        with progress(f"exporting the LoRA adapters (peft) to {self.args.export_lora}"):
            return save_peft_adapter(model, LoRAConfig.from_args(self.args),
                                     self.args.export_lora,
                                     base_model=str(pathlib.Path(self.args.hf_checkpoint)))
