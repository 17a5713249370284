"""The trained adapters as an HF peft adapter folder, from any TP / PP split.

Public API:
    HF_TARGETS                         megatron target -> the HF (peft) module names it covers
    peft_state_dict(model_chunks) -> dict[str, Tensor]     (collective; full on global rank 0)
    adapter_config(config, base_model) -> dict           peft's adapter_config.json
    save_peft_adapter(model_chunks, config, out_dir, *, base_model) -> pathlib.Path  (collective)

The folder holds `adapter_config.json` (peft's `LoraConfig`: r, lora_alpha, lora_dropout,
target_modules in HF names) and `adapter_model.safetensors` with peft's keys
`base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight` etc. Fused layers are split
as the weight is (`hf_weights.hf_tensors_like`): linear_qkv's B rows into q_proj / k_proj /
v_proj, linear_fc1's into gate_proj / up_proj, each with the shared A, which is exact:
[B_q; B_k; B_v] A = [B_q A; B_k A; B_v A]. `peft.PeftModel.from_pretrained(base, out_dir)` then
computes the logits of the merged model (tested in tests/sft/test_lora*.py). The merged model itself
is `--export-hf` under `layers.merged_weights`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Union

import torch

from q_tuning.parallel import comm
from q_tuning.sft.lora.config import LoRAConfig
from q_tuning.sft.lora.layers import adapted_layers

__all__ = ["HF_TARGETS", "adapter_config", "peft_state_dict", "save_peft_adapter"]

HF_TARGETS = {"linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_proj": ("o_proj",),
              "linear_fc1": ("gate_proj", "up_proj"), "linear_fc2": ("down_proj",)}


def _peft_key(hf_weight_name: str, which: str) -> str:
    """model.layers.0.self_attn.q_proj.weight -> base_model.model.model.layers.0.self_attn.
    q_proj.lora_A.weight"""
    return f"base_model.model.{hf_weight_name.removesuffix('.weight')}.{which}.weight"


def peft_state_dict(model_chunks) -> dict[str, torch.Tensor]:
    """Every adapter's A and B under peft's keys (CPU, the parameters' dtype). Collective over
    TP and PP: the full dict on the first pipeline stage's ranks, {} elsewhere."""
    from q_tuning.sft.hf.weights import hf_tensors_like

    layers = adapted_layers(model_chunks)
    local: dict[str, torch.Tensor] = {}
    for layer in layers:
        weight_name = f"{layer.name}.weight"
        adapter = layer.adapter
        for which, tensor, replicated in (
                ("lora_A", adapter.linear_in.weight, layer.kind == "column"),
                ("lora_B", adapter.linear_out.weight, layer.kind == "row")):
            hf = hf_tensors_like(layer.model, weight_name, tensor, replicated=replicated)
            local.update({_peft_key(name, which): t for name, t in hf.items()})
    if layers:
        pp_group = layers[0].model.pp_group
        parts = comm.gather_objects_to_first(local, pp_group)
        if parts is None:
            return {}
        local = {k: v for part in parts for k, v in part.items()}
    return dict(sorted(local.items()))


def adapter_config(config: LoRAConfig, base_model: str) -> dict:
    """peft's adapter_config.json for `config` (HF module names)."""
    targets = sorted({hf for m in config.target_modules for hf in HF_TARGETS[m]})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": config.rank, "lora_alpha": config.effective_alpha,
            "lora_dropout": config.dropout, "target_modules": targets, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "use_rslora": False, "use_dora": False, "modules_to_save": None}


def save_peft_adapter(model_chunks, config: LoRAConfig, out_dir: Union[str, os.PathLike], *,
                      base_model: str) -> pathlib.Path:
    """Collective: write the peft adapter folder at `out_dir` (global rank 0 writes it under a
    temporary name and renames it into place). `base_model`: the base's path, recorded in
    adapter_config.json as peft does."""
    from safetensors.torch import save_file

    out_dir = pathlib.Path(out_dir)
    state = peft_state_dict(model_chunks)
    if comm.is_global_rank_zero():
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()},
                  str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(
            json.dumps(adapter_config(config, base_model), indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    comm.barrier()
    return out_dir
