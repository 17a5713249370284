"""Spawned ranks of tests/sft/test_lora.py: LoRA on a real megatron-core GPTModel built from a tiny HF
Llama (`q_tuning.sft.hf.model`), inside `tests.harness.launch.run_distributed` (gloo)."""

from __future__ import annotations

import math
import pathlib

import torch

RANK, ALPHA, SEED = 3, 5.0, 11
SEQ, BATCH = 16, 2


def save_tiny_llama(folder: str) -> str:
    """An untied 2-layer Llama, 4 query heads on 2 KV heads, odd-ish sizes, O(1) activations."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
    model.save_pretrained(folder)
    return folder


def tokens() -> torch.Tensor:
    return torch.randint(0, 96, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))


def _build(hf_dir: str, *, tp: int, lora: bool = True):
    """This rank's chunks (local spec, fp32) with the HF weights, and the adapters if `lora`."""
    from q_tuning.sft.lora.config import LoRAConfig
    from q_tuning.sft.lora.layers import apply_lora
    from q_tuning.sft.hf import model as hf_model

    hf_config = hf_model.read_hf_config(hf_dir)
    config = hf_model.transformer_config_from_hf(
        hf_config, tp=tp, calculate_per_token_loss=True,
        use_cpu_initialization=True)
    chunks = hf_model.build_gpt_model_chunks(hf_config, config=config,
                                             make_vocab_size_divisible_by=1,
                                             use_transformer_engine=False)
    hf_model.load_hf_weights(chunks, hf_dir)
    if lora:
        apply_lora(chunks, LoRAConfig(rank=RANK, alpha=ALPHA), seed=SEED)
    return chunks, hf_config


def _randomise_b(chunks) -> None:
    """Non-zero B everywhere (B = 0 at init would make every comparison vacuous); TP=1 only."""
    from q_tuning.sft.lora.layers import adapted_layers

    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in adapted_layers(chunks):
            b = layer.adapter.linear_out.weight
            b.copy_(torch.randn(b.shape, generator=gen) * 0.3)


def _adapters(full: dict) -> dict:
    return {k: v for k, v in full.items() if ".adapter." in k}


def _logits(chunks, toks):
    from tests.harness.megatron import causal_attention_mask, forward_logits

    return forward_logits(chunks, toks, causal_attention_mask(*toks.shape))


def _dense_reference(hf_dir: str, full: dict, toks, weights):
    """Logits of a LoRA-free model holding W + (alpha/R) B A, and the gradients of
    sum(logits * weights) with respect to A and B through that dense model (autograd)."""
    from tests.harness.megatron import causal_attention_mask, load_shard

    dense, _ = _build(hf_dir, tp=1, lora=False)
    base = {k: v for k, v in full.items() if ".adapter." not in k}
    load_shard(dense, base)
    model = dense[0]
    leaves, params = {}, {}
    for name in base:
        a_key = name.replace(".weight", ".adapter.linear_in.weight")
        if a_key not in full:
            continue
        b_key = a_key.replace("linear_in", "linear_out")
        a, b = (full[k].clone().requires_grad_(True) for k in (a_key, b_key))
        leaves[a_key], leaves[b_key] = a, b
        params[name] = base[name] + (ALPHA / RANK) * b @ a  # the definition of LoRA
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    logits = torch.func.functional_call(model, params, (toks, pos,
                                                        causal_attention_mask(BATCH, SEQ)))
    (logits * weights).sum().backward()
    return logits.detach(), {k: v.grad for k, v in leaves.items()}


def _train_step(chunks, toks) -> dict:
    """One optimizer step (megatron DDP + Adam, clipping) on the per-token loss; the adapters'
    gradients and grad norm, the weights after the step, and the optimizer's parameter count."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from tests.harness.fixtures import wrap_ddp
    from tests.harness.megatron import causal_attention_mask, full_state_dict

    model = wrap_ddp(chunks)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.5,
                                                 params_dtype=torch.float32), model)
    model[0].zero_grad_buffer()
    opt.zero_grad()
    labels = torch.roll(toks, -1, dims=1)
    pos = torch.arange(SEQ).expand(BATCH, SEQ)
    loss = model[0](toks, pos, causal_attention_mask(BATCH, SEQ), labels=labels)
    loss.sum().backward()
    finalize_model_grads(model)
    grads = _adapters(full_state_dict(model, grads=True))
    ok, grad_norm, _ = opt.step()
    optimized = sum(p.numel() for g in opt.param_groups for p in g["params"])
    return {"grads": grads, "grad_norm": float(grad_norm), "ok": ok,
            "after": full_state_dict(model), "optimized": optimized,
            "trainable": sum(p.numel() for p in chunks[0].parameters() if p.requires_grad)}


def _exports(chunks, out: pathlib.Path | None, hf_config) -> dict:
    """The peft tensors and the merged HF state dict; with `out`, both folders written."""
    from q_tuning.sft.lora.config import LoRAConfig
    from q_tuning.sft.lora.export import peft_state_dict, save_peft_adapter
    from q_tuning.sft.lora.layers import merged_weights
    from q_tuning.sft.hf import model as hf_model

    peft = peft_state_dict(chunks)
    with merged_weights(chunks):
        merged = hf_model.export_hf_state_dict(chunks)
        if out is not None:
            hf_model.save_hf_checkpoint(chunks, hf_config, None, out / "merged")
    if out is not None:
        save_peft_adapter(chunks, LoRAConfig(rank=RANK, alpha=ALPHA), out / "peft",
                          base_model="tiny")
    return {"peft": peft, "merged": merged}


def _dropout_logits(chunks, toks) -> dict:
    """Logits with adapter dropout 0.5: two training-mode forwards, then one in eval mode."""
    from q_tuning.sft.lora.layers import adapted_layers
    from tests.harness.megatron import causal_attention_mask, gather_tp_logits

    for layer in adapted_layers(chunks):
        layer.adapter.dropout = 0.5
    pos = torch.arange(SEQ).expand(BATCH, SEQ)

    out = {}
    with torch.no_grad():
        for name, training in (("train1", True), ("train2", True), ("eval", False)):
            for c in chunks:
                c.train(training)
            out[name] = gather_tp_logits(chunks[0](toks, pos, causal_attention_mask(BATCH, SEQ)))
    for layer in adapted_layers(chunks):
        layer.adapter.dropout = 0.0
    for c in chunks:
        c.train(True)
    return out


def _scores(chunks, toks):
    from q_tuning.passes.scoring import score_samples

    masks = [torch.ones(SEQ, dtype=torch.bool) for _ in range(BATCH)]
    scores = score_samples(chunks, list(toks), masks)
    return scores.nll, scores.entropy


def reference(rank: int, world_size: int, hf_dir: str, out: str) -> dict:
    """TP=1 (one process): forward, gradients and Q-Tuning scores against the dense model, the
    exports (written to `out`), and one training step."""
    from q_tuning.sft.lora.layers import merged_weights
    from tests.harness.megatron import (causal_attention_mask, full_state_dict, load_shard,
                                        parallel_world)

    toks = tokens()
    weights = torch.randn(BATCH, SEQ, 96, generator=torch.Generator().manual_seed(9))
    with parallel_world(tp=1):
        chunks, hf_config = _build(hf_dir, tp=1)
        _randomise_b(chunks)
        full = full_state_dict(chunks)
        logits = _logits(chunks, toks)
        model = chunks[0]
        lora_logits = model(toks, torch.arange(SEQ).expand(BATCH, SEQ),
                            causal_attention_mask(BATCH, SEQ))
        (lora_logits * weights).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        dense_logits, dense_grads = _dense_reference(hf_dir, full, toks, weights)
        scores = _scores(chunks, toks)
        dense, _ = _build(hf_dir, tp=1, lora=False)
        merged_full = _exports(chunks, pathlib.Path(out), hf_config)
        with merged_weights(chunks):
            merged_sd = {k: v for k, v in full_state_dict(chunks).items() if ".adapter." not in k}
        load_shard(dense, merged_sd)
        dense_scores = _scores(dense, toks)
        model.zero_grad(set_to_none=True)
        dropout = _dropout_logits(chunks, toks)
        step = _train_step(chunks, toks)
    return {"dropout": dropout, "logits": logits, "dense_logits": dense_logits, "grads": grads,
            "dense_grads": dense_grads, "full": full, "scores": scores,
            "dense_scores": dense_scores, "exports": merged_full, "step": step,
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()}}


def split(rank: int, world_size: int, hf_dir: str, full: dict) -> dict:
    """TP=2 from the TP=1 run's full weights."""
    from tests.harness.megatron import full_state_dict, load_shard, parallel_world

    toks = tokens()
    with parallel_world(tp=2):
        chunks, hf_config = _build(hf_dir, tp=2)
        load_shard(chunks, full)
        loaded = full_state_dict(chunks)
        logits = _logits(chunks, toks)
        exports = _exports(chunks, None, hf_config)
        dropout = _dropout_logits(chunks, toks)
        step = _train_step(chunks, toks)
    return {"dropout": dropout, "loaded": loaded, "logits": logits, "exports": exports,
            "step": step}
