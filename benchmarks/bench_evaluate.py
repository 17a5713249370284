"""`q-tuning-eval`'s work, today's two passes against the shared-prompt path, side by side.

Loads the model once, then alternates, run by run, on the same rows:
- two passes (`q-tuning-eval` as of 2026-12-01, the issue's "today"): `greedy_generate` (prompt
  forward + decoding batch by batch) then `reference_nll` (a second forward over prompt +
  reference response), with transformers' own SDPA attention (KV heads repeated);
- shared (`generate_with_nll`, what `evaluate` runs now), once per `--shared-batch-size`: the
  decoding pool kept full, one prompt forward per joining group with the reference response run
  on its KV cache for the NLL, GQA attention.
For each shared run: its time over the two passes', whether the generated tokens are identical,
the largest relative NLL difference, and its seconds per stage (prompt forwards, NLL, decoding);
a last line of JSON.

    python benchmarks/bench_evaluate.py --num-samples 300            # SmolLM2-135M, GSM-Symbolic
    python benchmarks/bench_evaluate.py --num-samples 300 --shared-batch-size 16 64
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import torch
from bench_common import REPO_ROOT, on_path

DEFAULT_DATA = os.path.join(REPO_ROOT, "outputs", "smollm2-gsm", "data", "eval.jsonl")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hf-checkpoint", default=None, help="default: the SmolLM2 GGUF")
    parser.add_argument("--data-path", default=DEFAULT_DATA,
                        help="gsm_symbolic JSONL; more rows than it holds are generated (all "
                        "of them when the default file, the main job's, is not there)")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16,
                        help="the two-pass path's batch size (q-tuning-eval's default before)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--shared-batch-size", type=int, nargs="+", default=[64],
                        help="the shared path's decoding pool sizes, one timed run each "
                        "(64: q-tuning-eval's default now)")
    parser.add_argument("--repeats", type=int, default=1)
    return parser.parse_args()


def rows_for(args) -> list[dict]:
    """The first N rows of --data-path, topped up with freshly generated held-out problems."""
    from q_tuning.sft.evaluate.cli import read_rows

    missing_default = args.data_path == DEFAULT_DATA and not os.path.exists(DEFAULT_DATA)
    rows = [] if missing_default else read_rows(args.data_path)[:args.num_samples]
    if len(rows) < args.num_samples:
        from experiments.gsm.gsm_symbolic import build_gsm_splits

        _, extra = build_gsm_splits(0, args.num_samples - len(rows), seed=4321)
        rows += extra
    return rows


def main() -> None:
    args = parse_args()
    on_path()
    from q_tuning.sft.evaluate import cli as E
    from q_tuning.sft.hf.assets import smollm2_gguf_path
    from q_tuning.sft.evaluate.decoding import use_gqa_attention

    rows = rows_for(args)
    model, tokenizer = E.load_model(args.hf_checkpoint or str(smollm2_gguf_path()))
    prompts = [E.prompt_ids(tokenizer, r["prompt"]) for r in rows]
    kw = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)

    def two_passes():
        model.set_attn_implementation("sdpa")
        return (E.greedy_generate(model, tokenizer, prompts, **kw),
                E.reference_nll(model, tokenizer, rows, batch_size=max(1, args.batch_size // 2)))

    def shared(pool: int):
        use_gqa_attention(model)
        generated, nll, seconds = E.generate_with_nll(
            model, tokenizer, rows, max_new_tokens=args.max_new_tokens, batch_size=pool)
        stages[pool].append(seconds)
        return generated, nll

    runs = {"two_passes": two_passes}
    runs.update({f"shared_{pool}": functools.partial(shared, pool)
                 for pool in args.shared_batch_size})
    stages = {pool: [] for pool in args.shared_batch_size}  # seconds per stage, run by run
    load = [os.getloadavg()[0]]
    times = {name: [] for name in runs}
    outputs = {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
    load.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{len(rows)} rows, two passes at batch {args.batch_size}, max new tokens "
          f"{args.max_new_tokens}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {load[0]:.2f} -> {load[1]:.2f}")
    for k, v in times.items():
        print(f"{k:<11} median {med[k]:8.1f} s  runs {', '.join(f'{t:.1f}' for t in v)}")
    summary = {"rows": len(rows), "batch_size": args.batch_size,
               "two_passes_s": round(med["two_passes"], 2), "load_average": load}
    for pool in args.shared_batch_size:
        summary[f"shared_{pool}"] = compare(outputs["two_passes"], outputs[f"shared_{pool}"],
                                            med["two_passes"], med[f"shared_{pool}"],
                                            stages[pool], pool)
    print(json.dumps(summary))


def compare(old, new, old_s: float, new_s: float, stages: list, pool: int) -> dict:
    """Print and return how one shared run compares with the two passes: time ratio, identical
    tokens, NLL difference, seconds per stage."""
    from q_tuning.sft.evaluate.cli import EvalSeconds

    (gen_a, nll_a), (gen_b, nll_b) = old, new
    same_tokens = gen_a == gen_b
    nll_rel = max(abs(a.sum - b.sum) / max(abs(a.sum), 1e-12) for a, b in zip(nll_a, nll_b))
    same_counts = all(a.count == b.count and a.number_count == b.number_count
                      for a, b in zip(nll_a, nll_b))
    split = {k: round(statistics.median(getattr(x, k) for x in stages), 2)
             for k in EvalSeconds._fields}
    print(f"pool {pool}: shared / two passes = {new_s / old_s:.3f}; identical generated tokens: "
          f"{same_tokens}; loss-token counts equal: {same_counts}; max relative NLL difference "
          f"{nll_rel:.2e}; median seconds per stage: "
          + ", ".join(f"{k} {v:.1f}" for k, v in split.items())
          + f"; generated tokens {sum(len(g) for g in gen_b)}")
    return {"shared_s": round(new_s, 2), "ratio": round(new_s / old_s, 4), "stages_s": split,
            "identical_tokens": same_tokens, "equal_counts": same_counts,
            "max_rel_nll_diff": nll_rel}


if __name__ == "__main__":
    main()
