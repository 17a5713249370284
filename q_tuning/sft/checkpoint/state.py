"""Checkpoint state: what a checkpoint holds besides the trainer's own dict: the model's sharded
state, every rank's RNG states, and the fixes two megatron-core 0.16 quirks of the distributed
optimizer need.

Public API:
    RNG_KEY
    sharded_metadata(use_distributed_optimizer) -> dict
    model_sharded_state(model_chunks, metadata) -> dict
    load_model_state(model_chunks, loaded) -> None
    rng_state() -> dict; set_rng_state(state)
    gather_rng_states() -> list            (collective over DP x CP)
    rng_sharded_object(states) -> ShardedObject
    init_empty_torch_adam_state(optimizer); restore_torch_adam_steps(optimizer)
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import numpy as np
import torch

from q_tuning.parallel import comm
from q_tuning.sft.hf.config import unwrap_model
from q_tuning.sft.lora import checkpoint as lora_checkpoint
from q_tuning.sft.lora import layers as lora_layers

__all__ = ["RNG_KEY", "gather_rng_states", "init_empty_torch_adam_state", "load_model_state",
           "model_sharded_state", "restore_torch_adam_steps", "rng_sharded_object", "rng_state",
           "set_rng_state", "sharded_metadata"]

RNG_KEY = "rng_state"


def sharded_metadata(use_distributed_optimizer: bool) -> dict:
    """The `metadata` megatron's sharded_state_dict calls take (how optimizer state is sharded)."""
    # Megatron-LM's defaults (training/checkpointing.py, _build_sharded_state_dict_metadata).
    # A fresh dict per use: megatron adds process groups to it (unpicklable, not for common.pt).
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = "dp_reshardable"
    return metadata


def model_sharded_state(model_chunks: Sequence[torch.nn.Module], metadata: dict) -> dict:
    """The bare models' sharded state (`model`, or `model0`, `model1`, ... with virtual pipeline
    stages), as Megatron-LM checkpoints them; with LoRA adapters, those alone (`lora`)."""
    if lora_layers.is_applied(model_chunks):  # the adapters only: the base comes from HF
        return {lora_checkpoint.STATE_KEY: lora_checkpoint.adapter_sharded_state(model_chunks)}
    chunks = [unwrap_model(c) for c in model_chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict(metadata=metadata)}
    return {f"model{i}": c.sharded_state_dict(metadata=metadata) for i, c in enumerate(chunks)}


def load_model_state(model_chunks: Sequence[torch.nn.Module], loaded: dict) -> None:
    """Copy the loaded `model_sharded_state` entries into the chunks (strict)."""
    if lora_checkpoint.STATE_KEY in loaded:
        lora_checkpoint.load_adapter_state(model_chunks, loaded[lora_checkpoint.STATE_KEY])
        return
    chunks = [unwrap_model(c) for c in model_chunks]
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded["model"], strict=True)
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded[f"model{i}"], strict=True)


def rng_state() -> dict:
    """This rank's Python, numpy, torch (CPU and CUDA) and megatron tracker RNG states."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {"random": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def rng_sharded_object(states: Any):
    """This rank's slot of the global (PP, TP) grid of RNG lists (one entry per DP x CP rank)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        RNG_KEY, states,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


def gather_rng_states() -> list:
    """Collective over DP x CP: every rank's RNG states, in DP x CP rank order."""
    from megatron.core import parallel_state as ps

    return comm.all_gather_objects(rng_state(), ps.get_data_parallel_group(
        with_context_parallel=True))


def init_empty_torch_adam_state(optimizer) -> None:
    """Give a fresh distributed optimizer zero Adam state (loading then overwrites it).

    megatron-core 0.16 `DistributedOptimizer.state_dict()` (distrib_optimizer.py, "Extract
    'step', for non-Apex/TE support") reads every parameter's 'step', which a torch Adam that
    never stepped lacks; this is the path without transformer-engine / apex (CPU).
    """
    for inner in _torch_adams_of_distributed_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state[param]:
                    inner.state[param].update(step=torch.tensor(0.0),
                                              exp_avg=torch.zeros_like(param),
                                              exp_avg_sq=torch.zeros_like(param))


def _torch_adams_of_distributed_optimizers(optimizer):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(opt, DistributedOptimizer) and type(inner) in (torch.optim.Adam,
                                                                      torch.optim.AdamW):
            yield inner


def restore_torch_adam_steps(optimizer) -> None:
    """Each parameter's Adam 'step' from the loaded param groups, one tensor per parameter.

    Two megatron-core 0.16 quirks of the distributed optimizer with a torch Adam (the path
    without transformer-engine / apex, i.e. CPU): `load_state_dict` gives every parameter the
    same `step` tensor object (torch's Adam increments each parameter's step in place, so a
    shared one advances once per parameter per iteration), and the 'dp_reshardable' loader then
    copies the step of the loading template (0) back over it. The checkpoint's step survives in
    the param groups (megatron puts it there for torch optimizers).
    """
    for inner in _torch_adams_of_distributed_optimizers(optimizer):
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                if param in inner.state:
                    inner.state[param]["step"] = torch.tensor(float(group["step"]),
                                                              dtype=torch.float32)
