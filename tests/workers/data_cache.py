"""Spawned ranks of tests/sft/test_data_cache.py: `prepare_on_node_leaders` then `load_samples` on
gloo processes of one host; each rank reports how many conversations it tokenized itself."""

from __future__ import annotations


def tokenize_once(rank: int, world_size: int, config, tokenizer_cache: str) -> dict:
    from q_tuning.sft.data import loading
    from q_tuning.sft.hf.assets import load_tokenizer

    counted = []
    original = loading.tokenize_all

    def counting(tokenizer, conversations, **kwargs):
        counted.append(len(conversations))
        return original(tokenizer, conversations, **kwargs)

    loading.tokenize_all = counting
    tokenizer = load_tokenizer(cache_dir=tokenizer_cache)
    try:
        loading.prepare_on_node_leaders(config, tokenizer)
        samples, stats = loading.load_samples(config, tokenizer)
    except ValueError as err:
        return {"error": str(err), "tokenized": counted}
    finally:
        loading.tokenize_all = original
    return {"error": None, "tokenized": counted,
            "samples": [(s.source, s.tokens.tolist(), s.loss_mask.tolist()) for s in samples]}
