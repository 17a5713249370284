"""The trainer's parts, built from the flags: parallel state, data, model, optimizer.

Public API:
    init_parallel_state(args) -> (dp_rank, dp_size)
    build_transformer_config(args, hf_config, *, cuda) -> TransformerConfig
    build_data(args, *, world_size) -> (tokenizer, SFTDataset)    (collective)
    build_model(args, hf_config, config, *, cuda, load_hf_weights) -> list[DDP chunks]
    build_optimizer(args, model, config, *, train_iters) -> (optimizer, scheduler)
    max_tokens_per_row(args) -> int | None

Composability: TP / PP / VPP / CP are megatron-core's (model chunks from `q_tuning.sft.hf.model`);
DP is megatron-core's `DistributedDataParallel`, with the distributed optimizer as an option.
Context parallelism needs transformer-engine's attention.
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Optional

import torch

from q_tuning.parallel import comm
from q_tuning.sft.lora.config import LoRAConfig
from q_tuning.sft.runtime import progress, seed_everything

__all__ = ["build_data", "build_model", "build_optimizer", "build_transformer_config",
           "init_parallel_state", "max_tokens_per_row"]


def init_parallel_state(args: argparse.Namespace) -> tuple[int, int]:
    """megatron-core's process groups and seeded RNGs; returns (DP rank, DP size)."""
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        distributed_timeout_minutes=args.distributed_timeout_minutes)
    seed_everything(args.seed)
    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def build_transformer_config(args: argparse.Namespace, hf_config, *, cuda: bool):
    """The `TransformerConfig` of the HF model at this run's split (checked: the error names the
    model dimension and the parallel size that do not fit)."""
    from q_tuning.sft.hf.model import transformer_config_from_hf

    if args.context_parallel_size > 1 and not (
            cuda and importlib.util.find_spec("transformer_engine") is not None):
        raise ValueError("--context-parallel-size > 1 needs transformer-engine on CUDA "
                         "(megatron-core's local attention refuses context parallelism)")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    return transformer_config_from_hf(
        hf_config, tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
        vpp=args.virtual_pipeline_model_parallel_size, cp=args.context_parallel_size,
        sequence_parallel=args.sequence_parallel, params_dtype=dtype,
        calculate_per_token_loss=True,  # SPEC 5: global mean over the step's kept tokens
        use_cpu_initialization=not cuda)


def build_data(args: argparse.Namespace, *, world_size: int):
    """Tokenizer and dataset. The data is tokenized once per host into the cache (its lowest rank
    works, with a progress bar, while the others wait) and every rank loads it (with
    --no-data-cache every rank tokenizes). A failure on any rank (bad data, a missing file, a
    tokenizer that does not load) or ranks that read different data are an error on every rank,
    so no rank goes on into the model's collectives alone."""
    from q_tuning.sft.data.config import DataConfig, apply_chat_template_override
    from q_tuning.sft.data.loading import prepare_on_node_leaders
    from q_tuning.sft.hf.assets import load_tokenizer
    from q_tuning.sft.data.dataset import SFTDataset

    config = DataConfig.from_args(args)
    error, tokenizer, dataset = None, None, None
    try:
        with progress("loading the tokenizer"):
            tokenizer = load_tokenizer(args.tokenizer_path or args.hf_checkpoint)
            apply_chat_template_override(tokenizer, config.chat_template)
    except (ValueError, OSError) as err:
        if world_size == 1:
            raise
        error = str(err)
    _agree(error)
    prepare_on_node_leaders(config, tokenizer)
    try:
        dataset = SFTDataset.from_jsonl(
            config.paths, tokenizer, seq_length=config.seq_length, seed=args.seed,
            strict=config.strict, **config.options())
    except (ValueError, OSError) as err:  # DataError, FileNotFoundError, I/O errors
        if world_size == 1:
            raise
        error = str(err)
    _agree(error)
    what = f"{len(dataset)} samples, digest {dataset.digest()}"
    seen = comm.all_gather_objects(what, None)
    if len(set(seen)) > 1:
        raise ValueError("the ranks read different training data (" + "; ".join(
            f"rank {r}: {w}" for r, w in enumerate(seen)) + "): give every rank the same "
            "--data-path files, --seq-length and tokenizer")
    return tokenizer, dataset


def _agree(error: str | None) -> None:
    """Collective: raise on every rank when any rank has an error (its own text when all ranks
    agree on it)."""
    agreed = comm.errors_on_ranks(error)
    if agreed is not None:
        raise ValueError(error if error is not None and agreed.startswith("all ") else agreed)


def build_model(args: argparse.Namespace, hf_config, config, *, cuda: bool,
                load_hf_weights: bool) -> list:
    """This rank's model chunks wrapped as Megatron-LM's `get_model` does (Float16Module with
    --bf16, DDP), with the HF weights unless a checkpoint will give them; with --lora-rank the
    base is frozen and adapters are added (`q_tuning.sft.lora`)."""
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig, finalize_model_grads)
    from megatron.core.transformer.module import Float16Module

    from q_tuning.sft.hf import model as hf_model

    lora = LoRAConfig.from_args(args)
    chunks = hf_model.build_gpt_model_chunks(
        hf_config, config=config, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        # LoRA adapts megatron's local linear layers (not transformer-engine's fused ones)
        use_transformer_engine=False if lora is not None else None)
    if cuda:
        chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
    if load_hf_weights or lora is not None:  # a LoRA checkpoint holds the adapters only
        with progress(f"loading weights from {args.hf_checkpoint}"):
            hf_model.load_hf_weights(chunks, args.hf_checkpoint)
    if lora is not None:  # before the wrappers: DDP and the optimizer see the frozen base
        from q_tuning.sft.lora.layers import apply_lora

        apply_lora(chunks, lora, seed=args.seed)
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


def build_optimizer(args: argparse.Namespace, model: list, config, *, train_iters: int):
    """megatron-core's Adam (distributed with --use-distributed-optimizer) and its LR schedule;
    a warm-up as long as the decay is a ValueError naming both flags."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.min_lr,
                        weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
                        adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
                        clip_grad=args.clip_grad, bf16=args.bf16,
                        params_dtype=config.params_dtype,
                        use_distributed_optimizer=args.use_distributed_optimizer),
        model)
    config.grad_scale_func = optimizer.scale_loss
    decay_iters = args.lr_decay_iters or train_iters
    if args.lr_warmup_iters >= decay_iters:
        raise ValueError(f"--lr-warmup-iters ({args.lr_warmup_iters}) must be smaller than "
                         f"the LR decay length ({decay_iters} iterations: --lr-decay-iters "
                         "or the number of training iterations)")
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=decay_iters,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
        end_wd=args.weight_decay, wd_incr_steps=train_iters, wd_incr_style="constant",
        # The flags of this run win; the checkpoint only gives the position (num_steps).
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
    return optimizer, scheduler


def max_tokens_per_row(args: argparse.Namespace) -> Optional[int]:
    """The packed row length of `--use-dynamic-batch-size`, else None (one sample per row)."""
    return args.max_tokens_per_gpu if args.use_dynamic_batch_size else None
