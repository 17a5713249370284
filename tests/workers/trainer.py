"""Spawned ranks of tests/sft/test_trainer.py: the real trainer
(`q_tuning.sft.train.__main__.run`) on a tiny random HF Llama, inside
`tests.harness.launch.run_distributed` (gloo already initialised)."""

from __future__ import annotations

import json
import math
import pathlib

import torch

HOOK_CALLS: list = []


def make_assets(root: str, tokenizer_cache: str) -> dict:
    """Tiny HF folders (Llama 2 layers, Llama 3 layers, GPT-2) sharing the SmolLM2 tokenizer, and
    JSONL files (good with one multi-turn and one no-assistant record; malformed on line 2)."""
    import transformers

    from q_tuning.sft.hf.assets import load_tokenizer

    root = pathlib.Path(root)
    tokenizer = load_tokenizer(cache_dir=tokenizer_cache)
    folders = {}
    for name, layers in (("llama", 2), ("llama3layers", 3)):
        config = transformers.LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, tie_word_embeddings=True)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # O(1) activations, so the loss moves visibly in a few steps
            for param in model.parameters():
                if param.dim() == 2:
                    param.copy_(torch.randn_like(param) / math.sqrt(param.shape[1]))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        folders[name] = str(root / name)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=128, n_positions=64, n_embd=16, n_layer=1, n_head=2))
    gpt2.save_pretrained(root / "gpt2")
    folders["gpt2"] = str(root / "gpt2")

    rows = [{"prompt": f"What is {i} plus {i + 1}?",
             "response": f"{i} plus {i + 1} is {2 * i + 1}."} for i in range(40)]
    rows.append({"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Name a colour."},
                              {"role": "assistant", "content": "Blue."},
                              {"role": "user", "content": "Another one?"},
                              {"role": "assistant", "content": "Green."}]})
    rows.append({"messages": [{"role": "user", "content": "no answer here"}]})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n")
    return {**folders, "data": str(root / "data.jsonl"), "bad": str(root / "bad.jsonl")}


def record_hook(args, rollout_id, rollout_data) -> None:
    """A --rollout-data-postprocess-path hook: records what it was given."""
    HOOK_CALLS.append({"rollout_id": rollout_id, "samples": len(rollout_data["tokens"]),
                       "fields": sorted(rollout_data),
                       "kept": sum(rollout_data.get("kept", [])),
                       "loss_tokens": sum(int(m[1:].sum()) for m in rollout_data["loss_masks"])})


def run_many(rank: int, world_size: int, runs: list[tuple[str, list[str]]]) -> dict:
    """Run the trainer once per (name, argv), in order; {name: {"history" | "error", "hook"}}."""
    import multiprocessing

    from q_tuning.sft.train.__main__ import run
    from q_tuning.sft.train.arguments import parse_args

    # megatron's dist_checkpointing writes through worker processes it forks (and joins before
    # `save` returns); Python refuses to start children from a daemonic process, which is what
    # the harness spawns (so that its ranks die with the test).
    multiprocessing.current_process()._config["daemon"] = False
    results = {}
    for name, argv in runs:
        HOOK_CALLS.clear()
        try:
            history = run(parse_args(argv))
            results[name] = {"history": history, "error": None, "hook": list(HOOK_CALLS)}
        except (ValueError, FileNotFoundError) as err:
            results[name] = {"history": None, "error": f"{type(err).__name__}: {err}",
                             "hook": list(HOOK_CALLS)}
    return results


def history_of(results: dict, name: str) -> list[dict]:
    """The logged history of run `name` of `run_many`'s results (its error fails the test)."""
    assert results[name]["error"] is None, f"{name}: {results[name]['error']}"
    return results[name]["history"]


def losses_of(history: list[dict]) -> list[float]:
    return [h["loss"] for h in history]
