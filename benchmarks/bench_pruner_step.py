"""Step time of Q-Tuning vs full-data training, measured side by side in one run (CPU, 1 process).

Prints, for one global batch:
- t(scoring the full batch) / t(full-data training step)             target <= 0.40
- t(Q-Tuning step at keep r) / t(full-data training step), several r  target <= 0.65 at r = 0.25

A training step is megatron-core's forward-backward (per-token loss, DDP) plus the optimizer step
(megatron-core's `get_megatron_optimizer`, Adam). A Q-Tuning step is the pruner's scoring pass and
decision, then the same training step on the kept samples. Medians over `--repeats` runs after a
warm-up; weights are restored before every run so all runs see the same model.

    python benchmarks/bench_pruner_step.py                       # small model (default)
    python benchmarks/bench_pruner_step.py --preset smollm2      # SmolLM2-135M-shaped model
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRESETS = {
    # name: model sizes, batch, lengths
    "small": dict(vocab=8192, layers=4, hidden=256, heads=8, kv_heads=None, ffn=1024,
                  batch=32, min_len=128, max_len=256),
    "smollm2": dict(vocab=49152, layers=30, hidden=576, heads=9, kv_heads=3, ffn=1536,
                    batch=16, min_len=256, max_len=512),
}


def build(preset: dict, micro_batch_size: int):
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig, finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from tests.harness.megatron import build_tiny_gpt

    (model,) = build_tiny_gpt(vocab=preset["vocab"], layers=preset["layers"],
                              hidden=preset["hidden"], heads=preset["heads"],
                              kv_heads=preset["kv_heads"], ffn_hidden=preset["ffn"],
                              swiglu=True, seed=5)
    model.config.calculate_per_token_loss = True
    model.config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(config=model.config, module=model,
                                  ddp_config=DistributedDataParallelConfig(
                                      grad_reduce_in_fp32=True))
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-5, bf16=False,
                                                 params_dtype=torch.float32, clip_grad=0.0),
                                 [ddp])
    return ddp, opt


def batch_of(preset: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens, masks = [], []
    for _ in range(preset["batch"]):
        n = int(torch.randint(preset["min_len"], preset["max_len"] + 1, (1,), generator=g))
        tok = torch.randint(0, preset["vocab"], (n,), generator=g)
        mask = torch.zeros(n, dtype=torch.long)
        mask[n // 2:] = 1  # half prompt, half response
        tokens.append(tok)
        masks.append(mask)
    return {"tokens": tokens, "loss_masks": masks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--scoring-micro-batch-size", type=int, default=8)
    parser.add_argument("--keep-ratios", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125])
    parser.add_argument("--token-keep-ratio", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    dist.init_process_group("gloo", rank=0, world_size=1)
    from q_tuning import QTuningConfig, QTuningPruner
    from q_tuning.parallel.scoring import score_samples
    from q_tuning.parallel.training import forward_backward
    from tests.harness.megatron import init_parallel

    init_parallel()
    preset = PRESETS[args.preset]
    model, opt = build(preset, args.micro_batch_size)
    initial = copy.deepcopy(model.module.state_dict())
    batch = batch_of(preset)

    def train_on(b: dict) -> None:
        model.zero_grad_buffer()
        opt.zero_grad()
        forward_backward([model], b, micro_batch_size=args.micro_batch_size)
        opt.step()

    def full_step() -> None:
        train_on(batch)

    def scoring_only() -> None:
        score_samples([model], batch["tokens"], batch["loss_masks"],
                      rows_per_micro_batch=args.scoring_micro_batch_size)

    def q_tuning_step(ratio: float):
        pruner = QTuningPruner(QTuningConfig(sample_keep_ratio=ratio,
                                             token_keep_ratio=args.token_keep_ratio,
                                             scoring_micro_batch_size=args.scoring_micro_batch_size),
                               log=False)

        def step() -> None:
            new_batch, _ = pruner.prune([model], batch)
            train_on(new_batch)
        return step

    def timed(fn) -> list[float]:
        times = []
        for i in range(args.repeats + 1):  # the first run is a warm-up
            model.module.load_state_dict(initial)
            start = time.perf_counter()
            fn()
            if i:
                times.append(time.perf_counter() - start)
        return times

    results = {"full-data training step": timed(full_step),
               "scoring the full batch": timed(scoring_only)}
    for r in args.keep_ratios:
        results[f"Q-Tuning step, keep {r:g} x tokens {args.token_keep_ratio:g}"] = \
            timed(q_tuning_step(r))
    base = statistics.median(results["full-data training step"])
    n_tok = sum(t.numel() for t in batch["tokens"])
    print(f"preset={args.preset} batch={preset['batch']} samples, {n_tok} tokens, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {args.repeats}")
    print(f"{'what':<44} {'median s':>9} {'min s':>8} {'max s':>8} {'ratio':>7}")
    for name, times in results.items():
        med = statistics.median(times)
        print(f"{name:<44} {med:>9.3f} {min(times):>8.3f} {max(times):>8.3f} {med / base:>7.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
