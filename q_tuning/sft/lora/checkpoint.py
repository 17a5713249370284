"""LoRA checkpoints: the adapters alone (megatron dist_checkpointing, reshardable over TP / PP /
DP like the weights they sit on) and the fingerprint of the base they were trained on.

Public API:
    STATE_KEY                                  the checkpoint's key of the adapters
    adapter_sharded_state(model_chunks) -> dict     ShardedTensors of every A and B
    load_adapter_state(model_chunks, loaded) -> None
    base_fingerprint(hf_checkpoint) -> str
    run_fingerprint(args) -> dict | None       what a LoRA checkpoint must share with a run

A LoRA checkpoint holds the adapters, their optimizer state (megatron's optimizer holds nothing
else), RNG and trainer state; the base weights are read again from --hf-checkpoint on resume,
which must have the fingerprint recorded at save (`run_fingerprint`, checked with the model's).
Keys are `decoder.layers.<global layer>.<module>.adapter.linear_{in,out}.weight`; a
column-parallel layer's B is split on dim 0 and a row-parallel layer's A on dim 1 (like their
weights; linear_fc1's B through megatron's SwiGLU factory, its rows being [gate_r; up_r]), the
other tensor is replicated over TP, so a checkpoint loads at another TP / PP / DP split.
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import struct
from typing import Optional

import torch

from q_tuning.sft.lora.config import LoRAConfig
from q_tuning.sft.lora.layers import adapted_layers

__all__ = ["STATE_KEY", "adapter_sharded_state", "base_fingerprint", "load_adapter_state",
           "run_fingerprint"]

STATE_KEY = "lora"
_SAMPLE = 1 << 20  # bytes of tensor data read from each end of a weight file


def adapter_sharded_state(model_chunks) -> dict:
    """Every adapter's A and B as megatron `ShardedTensor`s (the parameters themselves, which
    the optimizer's `sharded_state_dict` matches by identity)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    state = {}
    for layer in adapted_layers(model_chunks):
        axis = {"linear_out.weight": 0} if layer.kind == "column" else {"linear_in.weight": 1}
        prefix = f"{layer.global_name}.adapter."
        tensors = make_sharded_tensors_for_checkpoint(
            layer.adapter.state_dict(prefix="", keep_vars=True), prefix, axis, (),
            tp_group=layer.module.tp_group,
            dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True))
        if layer.name.endswith("linear_fc1") and layer.model.config.gated_linear_unit:
            # this rank's B rows are [gate_r; up_r], as the weight's: megatron's own factory
            key = f"{prefix}linear_out.weight"
            tensors[key] = apply_swiglu_sharded_factory(tensors[key], ())
        state.update(tensors)
    return state


def load_adapter_state(model_chunks, loaded: dict) -> None:
    """Copy the loaded adapter tensors into the chunks (every adapter must be there)."""
    for layer in adapted_layers(model_chunks):
        for name, param in layer.adapter.named_parameters():
            key = f"{layer.global_name}.adapter.{name}"
            if key not in loaded:
                raise KeyError(f"the LoRA checkpoint lacks {key}")
            with torch.no_grad():
                param.copy_(loaded[key])


def _file_digest(path: pathlib.Path, digest) -> None:
    """Name, size, the safetensors header (names, shapes, dtypes, offsets) and the first and last
    MiB of tensor data: cheap at any model size, and different for another model or a
    re-trained one of the same shapes."""
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}:".encode())
    with open(path, "rb") as f:
        head = 0
        if path.suffix == ".safetensors":
            (n,) = struct.unpack("<Q", f.read(8))
            digest.update(f.read(n))
            head = 8 + n
        f.seek(head)
        digest.update(f.read(_SAMPLE))
        f.seek(max(head, size - _SAMPLE))
        digest.update(f.read(_SAMPLE))


def base_fingerprint(hf_checkpoint: str) -> str:
    """A digest of the base weights' files (`.safetensors` in the folder, or the `.gguf` file)."""
    from q_tuning.sft.hf.model import resolve_checkpoint

    folder, gguf = resolve_checkpoint(hf_checkpoint)
    files = [folder / gguf] if gguf else sorted(pathlib.Path(folder).glob("*.safetensors"))
    digest = hashlib.sha256()
    for path in files:
        _file_digest(path, digest)
    return digest.hexdigest()[:32]


def run_fingerprint(args: argparse.Namespace) -> Optional[dict]:
    """None without LoRA; else the adapter shape and the base's fingerprint, which a checkpoint
    must match to be resumed (dropout may change)."""
    config = LoRAConfig.from_args(args)
    if config is None:
        return None
    return {"rank": config.rank, "alpha": config.effective_alpha,
            "target_modules": sorted(config.target_modules),
            "base_weights": base_fingerprint(args.hf_checkpoint)}
