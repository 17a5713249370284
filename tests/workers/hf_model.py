"""Spawned ranks of tests/sft/test_hf_model.py: HF folder -> megatron split -> logits and export."""

from __future__ import annotations

import numpy as np
import torch


def _tiny_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def convert_and_run(rank: int, world_size: int, layouts: list, cases: list, tokens: np.ndarray,
                    out_root: str, with_tokenizer: bool) -> dict:
    """For each layout (tp, pp, vpp) in turn (process groups rebuilt in between) and each
    (name, hf_folder): build the split model, load the folder, run the pipeline forward, export,
    and save an HF folder under out_root/<layout>/<name>.

    Returns {(layout, name): {"logits": [b, s, V] on one rank (last stage, TP and DP rank 0;
    None elsewhere), "export": HF state dict as numpy (global rank 0; None elsewhere)}}.
    """
    from megatron.core import parallel_state as ps

    from q_tuning.sft.hf import model as qm
    from tests.harness import megatron as h

    tokens = torch.from_numpy(tokens)
    mask = h.causal_attention_mask(*tokens.shape)
    results = {}
    for layout in layouts:
        tp, pp, vpp = layout
        with h.parallel_world(tp=tp, pp=pp, vpp=vpp):
            for name, folder in cases:
                hf_config = qm.read_hf_config(folder)
                chunks = qm.build_gpt_model_chunks(hf_config)
                qm.load_hf_weights(chunks, folder)
                logits = h.forward_logits(chunks, tokens, mask, num_microbatches=2 if pp > 1 else 1)
                exported = qm.export_hf_state_dict(chunks)
                tokenizer = _tiny_tokenizer(hf_config.vocab_size) if with_tokenizer else None
                qm.save_hf_checkpoint(chunks, hf_config, tokenizer,
                                      f"{out_root}/{tp}-{pp}-{vpp}/{name}")
                keep = (logits is not None and ps.get_tensor_model_parallel_rank() == 0
                        and ps.get_data_parallel_rank() == 0)
                results[layout, name] = {
                    # megatron's padded vocabulary columns dropped: HF's real vocabulary only
                    "logits": logits[..., : hf_config.vocab_size].numpy() if keep else None,
                    "export": ({k: v.numpy() for k, v in exported.items()}
                               if torch.distributed.get_rank() == 0 else None),
                }
    return results
