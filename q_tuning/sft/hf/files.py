"""HF checkpoint folders on disk: reading an HF folder (safetensors, read lazily) or a GGUF file,
and writing one atomically. No megatron-core and no collectives here.

Public API:
    resolve_checkpoint(path) -> (folder, gguf file name or None)
    read_hf_config(path) -> PretrainedConfig
    read_hf_checkpoint(path) -> (PretrainedConfig, Mapping[str, Tensor])
    write_hf_folder(state_dict, hf_config, tokenizer, out_dir) -> pathlib.Path
    convert_hf_checkpoint(src, out_dir) -> pathlib.Path
"""

from __future__ import annotations

import copy
import glob
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Optional, Union

import torch

from q_tuning.observe.progress import Progress
from q_tuning.sft.hf.config import hf_architecture

if TYPE_CHECKING:
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

__all__ = ["convert_hf_checkpoint", "read_hf_checkpoint", "read_hf_config", "resolve_checkpoint",
           "write_hf_folder"]

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_MAX_SHARD_BYTES = 5 * 2**30  # HF's default max_shard_size


# --- reading HF checkpoints ----------------------------------------------------------------------

class _SafetensorsFolder(Mapping):
    """Read-only name -> tensor view of a folder's *.safetensors files, read lazily (mmap)."""

    def __init__(self, folder: pathlib.Path):
        from safetensors import safe_open

        index = folder / _SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(os.path.basename(p) for p in glob.glob(str(folder / "*.safetensors")))
        self._handles = {f: safe_open(str(folder / f), framework="pt") for f in files}
        self._where = {name: f for f, h in self._handles.items() for name in h.keys()}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def resolve_checkpoint(path: Union[str, os.PathLike]) -> tuple[pathlib.Path, Optional[str]]:
    """(folder, gguf file name or None) for an HF folder, a .gguf file, or a folder of one."""
    path = pathlib.Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if not path.is_dir():
        raise FileNotFoundError(f"HF checkpoint {path}: not a folder or a .gguf file")
    if glob.glob(str(path / "*.safetensors")):
        return path, None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return path, ggufs[0]
    raise FileNotFoundError(f"HF checkpoint {path}: no *.safetensors files"
                            + (f" and several .gguf files {ggufs}: name one" if ggufs else
                               " and no .gguf file"))


def read_hf_config(path: Union[str, os.PathLike]) -> "PretrainedConfig":
    """The transformers config of an HF folder or a GGUF file (read locally, never downloaded)."""
    from transformers import AutoConfig

    folder, gguf = resolve_checkpoint(path)
    kwargs = {"gguf_file": gguf} if gguf else {}
    return AutoConfig.from_pretrained(str(folder), local_files_only=True, **kwargs)


def read_hf_checkpoint(path: Union[str, os.PathLike]
                       ) -> tuple["PretrainedConfig", Mapping[str, torch.Tensor]]:
    """(config, name -> tensor) of an HF folder with safetensors (read lazily) or a GGUF file.

    GGUF goes through transformers (`from_pretrained(folder, gguf_file=...)`, de-quantised to
    fp32); its weights are the HF model's `state_dict()`. Its config may carry quantizer
    markers: `save_hf_checkpoint` drops them.
    """
    folder, gguf = resolve_checkpoint(path)
    if gguf is None:
        return read_hf_config(folder), _SafetensorsFolder(folder)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf,
                                                 local_files_only=True, dtype=torch.float32)
    return model.config, model.state_dict()


# --- writing HF folders -------------------------------------------------------------------------

def _write_safetensors(state_dict: dict[str, torch.Tensor], folder: pathlib.Path) -> None:
    """HF layout: model.safetensors, or shards of <= 5 GiB with model.safetensors.index.json."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > _MAX_SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor.contiguous()
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    with Progress("writing safetensors shards", total=len(shards), unit="files") as bar:
        for i, shard in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            bar.update()
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    (folder / _SAFETENSORS_INDEX).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _clean_config(hf_config: "PretrainedConfig", dtype: torch.dtype) -> "PretrainedConfig":
    """A copy to save next to the exported weights: dtype recorded, GGUF quantizer markers off."""
    config = copy.deepcopy(hf_config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if attr in vars(config):
            delattr(config, attr)
    if not getattr(config, "architectures", None):
        config.architectures = [hf_architecture(config)]
    config.dtype = dtype  # transformers >= 4.56 (torch_dtype is a deprecated alias)
    return config


def write_hf_folder(state_dict: dict[str, torch.Tensor], hf_config: "PretrainedConfig", tokenizer,
                    out_dir: Union[str, os.PathLike]) -> pathlib.Path:
    """Write an HF folder atomically (see `save_hf_checkpoint`); one process, no collectives."""
    out_dir = pathlib.Path(out_dir)
    state_dict = dict(state_dict)
    if getattr(hf_config, "tie_word_embeddings", False):
        state_dict.pop("lm_head.weight", None)
    dtype = next(iter(state_dict.values())).dtype
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    tmp.mkdir(parents=True)
    try:
        _write_safetensors(state_dict, tmp)
        _clean_config(hf_config, dtype).save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved HF checkpoint (%d tensors, %s) to %s", len(state_dict), dtype, out_dir)
    return out_dir


def convert_hf_checkpoint(src: Union[str, os.PathLike], out_dir: Union[str, os.PathLike]
                          ) -> pathlib.Path:
    """A GGUF file (or HF folder) as a plain safetensors HF folder with its tokenizer: loading
    it is seconds instead of the GGUF de-quantisation's half minute."""
    from q_tuning.sft.hf.assets import load_tokenizer

    hf_config, state_dict = read_hf_checkpoint(src)
    return write_hf_folder({k: state_dict[k] for k in state_dict.keys()}, hf_config,
                           load_tokenizer(src), out_dir)


def _replace_dir(new: pathlib.Path, target: pathlib.Path) -> None:
    """Rename `new` to `target`; an existing `target` is moved aside first and then removed."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
