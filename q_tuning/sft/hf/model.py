"""HF Llama / Qwen2 / Qwen3 checkpoints <-> megatron-core `GPTModel` at any TP / PP / VPP split.

Public API:
    SUPPORTED_ARCHITECTURES
    hf_architecture(hf_config) -> str
    padded_vocab_size(vocab_size, *, tp=1, make_vocab_size_divisible_by=128) -> int
    transformer_config_from_hf(hf_config, *, tp=1, pp=1, vpp=None, cp=1, sequence_parallel=False,
                               params_dtype=torch.float32, **overrides) -> TransformerConfig
    build_gpt_model(hf_config, *, config=None, pre_process=None, post_process=None, vp_stage=None,
                    make_vocab_size_divisible_by=128, use_transformer_engine=None) -> GPTModel
    build_gpt_model_chunks(hf_config, *, config=None, **build_kwargs) -> list[GPTModel]
    resolve_checkpoint(path) -> (folder, gguf file name or None)
    read_hf_config(path) -> PretrainedConfig
    read_hf_checkpoint(path) -> (PretrainedConfig, Mapping[str, Tensor])
    load_hf_weights(model_chunks, hf_state_dict_or_path) -> None
    export_hf_state_dict(model_chunks, *, vocab_size=None, all_ranks=False) -> dict[str, Tensor]
    save_hf_checkpoint(model_chunks, hf_config, tokenizer, out_dir) -> pathlib.Path

Typical use (every rank, after `parallel_state.initialize_model_parallel`)::

    hf_config, hf_weights = read_hf_checkpoint("path/to/hf_folder")   # or a .gguf file
    config = transformer_config_from_hf(hf_config, tp=2, pp=2)
    chunks = build_gpt_model_chunks(hf_config, config=config)        # one per virtual stage
    load_hf_weights(chunks, hf_weights)       # before wrapping in DDP / building the optimizer
    ...
    save_hf_checkpoint(chunks, hf_config, tokenizer, "out/hf")       # collective

Where each part lives: `config` (architectures, `TransformerConfig`, building the chunks),
`weights` (the HF <-> megatron name mapping and conversion, with its composability notes),
`files` (reading and writing HF folders). This module is their one import point and adds the
collective save.
"""

from __future__ import annotations

import os
import pathlib
from typing import TYPE_CHECKING, Union

from q_tuning.parallel import comm
from q_tuning.sft.hf.config import (SUPPORTED_ARCHITECTURES, build_gpt_model,  # noqa: F401
                                      build_gpt_model_chunks, hf_architecture, padded_vocab_size,
                                      transformer_config_from_hf)
from q_tuning.sft.hf.files import (convert_hf_checkpoint, read_hf_checkpoint,  # noqa: F401
                                     read_hf_config, resolve_checkpoint, write_hf_folder)
from q_tuning.sft.hf.weights import export_hf_state_dict, load_hf_weights  # noqa: F401

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "SUPPORTED_ARCHITECTURES", "hf_architecture", "padded_vocab_size",
    "transformer_config_from_hf", "build_gpt_model", "build_gpt_model_chunks", "read_hf_config",
    "read_hf_checkpoint", "resolve_checkpoint", "load_hf_weights", "export_hf_state_dict",
    "save_hf_checkpoint", "write_hf_folder", "convert_hf_checkpoint",
]


def save_hf_checkpoint(model_chunks, hf_config: "PretrainedConfig", tokenizer,
                       out_dir: Union[str, os.PathLike]) -> pathlib.Path:
    """Write the model as an HF folder (safetensors, config.json, tokenizer files) at `out_dir`.

    Collective (it calls `export_hf_state_dict`); global rank 0 writes. The folder is written
    under a temporary name beside `out_dir` and renamed into place, so `out_dir` is either the old
    folder or the complete new one, never a partial one. `tokenizer` may be None. Tied embeddings
    are saved once (as HF does: no `lm_head.weight`). Returns `out_dir`.
    """
    out_dir = pathlib.Path(out_dir)
    state_dict = export_hf_state_dict(model_chunks)
    if comm.is_global_rank_zero():
        assert state_dict, "global rank 0 is expected on the first pipeline stage"
        write_hf_folder(state_dict, hf_config, tokenizer, out_dir)
    comm.barrier()
    return out_dir
