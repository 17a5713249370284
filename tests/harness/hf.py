"""A tiny random Llama with the SmolLM2 tokenizer (for `q-tuning-eval` and its decoding), and the
slow greedy reference its decoding is checked against."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch


def save_tiny_llama(folder: Path, cache_dir: Path) -> None:
    """A 2-layer Llama (4 query heads on 2 KV heads) with peaked weights, so that greedy choices
    depend on the input and are far from ties, saved with the tokenizer into `folder`."""
    import transformers

    from q_tuning.sft.hf.assets import load_tokenizer

    tokenizer = load_tokenizer(cache_dir=cache_dir)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32,
                                      intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn_like(p) * 3 / math.sqrt(p.shape[1]))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@torch.inference_mode()
def slow_greedy(model, prompt: list[int], max_new: int, eos: list[int]) -> list[int]:
    """One sample, the whole sequence through the model every step, no cache: argmax."""
    ids = list(prompt)
    new = []
    for _ in range(max_new):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        token = int(logits.argmax())
        new.append(token)
        ids.append(token)
        if token in eos:
            break
    return new


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module (tiny matmuls only lose to thread hand-offs on a busy
    box); the previous count restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
