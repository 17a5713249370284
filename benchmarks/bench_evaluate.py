"""`q-tuning-eval`'s work, today's two passes against the shared-prompt path, side by side.

Loads the model once, then alternates, run by run, on the same rows:
- two passes (the path before the change): `greedy_generate` (prompt forward + decoding), then
  `reference_nll` (a second forward over prompt + reference response);
- shared (`generate_with_nll`, what `evaluate` runs now): one prompt forward per batch, the
  reference response run on its KV cache for the NLL, the cache cropped, then the same decoding.
Checks that both give the same generated tokens and NLL (relative 1e-5), and prints the median
times, their ratio, the shared path's seconds per stage (prompt forwards, NLL, decoding) and a
last line of JSON.

    python benchmarks/bench_evaluate.py --num-samples 300            # SmolLM2-135M, GSM-Symbolic
    python benchmarks/bench_evaluate.py --data-path eval.jsonl --num-samples 32 --repeats 1
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--shared-batch-size", type=int, default=None,
                        help="the shared path's batch size (default: --batch-size): is a larger "
                        "decoding batch faster, and are its outputs the same?")
    parser.add_argument("--repeats", type=int, default=1)
    return parser.parse_args()


def rows_for(args) -> list[dict]:
    """The first N rows of --data-path, topped up with freshly generated held-out problems."""
    from q_tuning.train.evaluate import read_rows

    missing_default = args.data_path == DEFAULT_DATA and not os.path.exists(DEFAULT_DATA)
    rows = [] if missing_default else read_rows(args.data_path)[:args.num_samples]
    if len(rows) < args.num_samples:
        from q_tuning.train.gsm_symbolic import build_gsm_splits

        _, extra = build_gsm_splits(0, args.num_samples - len(rows), seed=4321)
        rows += extra
    return rows


def main() -> None:
    args = parse_args()
    on_path()
    from q_tuning.train import evaluate as E
    from q_tuning.train.assets import smollm2_gguf_path

    rows = rows_for(args)
    model, tokenizer = E.load_model(args.hf_checkpoint or str(smollm2_gguf_path()))
    prompts = [E.prompt_ids(tokenizer, r["prompt"]) for r in rows]
    kw = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)

    def two_passes():
        return (E.greedy_generate(model, tokenizer, prompts, **kw),
                E.reference_nll(model, tokenizer, rows, batch_size=max(1, args.batch_size // 2)))

    stages = []  # the shared path's seconds per stage, run by run

    def shared():
        generated, nll, seconds = E.generate_with_nll(
            model, tokenizer, rows, max_new_tokens=args.max_new_tokens,
            batch_size=args.shared_batch_size or args.batch_size)
        stages.append(seconds)
        return generated, nll

    load = [os.getloadavg()[0]]
    times = {"two_passes": [], "shared": []}
    outputs = {}
    for _ in range(args.repeats):
        for name, fn in (("two_passes", two_passes), ("shared", shared)):
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
    load.append(os.getloadavg()[0])
    (gen_a, nll_a), (gen_b, nll_b) = outputs["two_passes"], outputs["shared"]
    same_tokens = gen_a == gen_b
    nll_rel = max(abs(a.sum - b.sum) / max(abs(a.sum), 1e-12) for a, b in zip(nll_a, nll_b))
    same_counts = all(a.count == b.count and a.number_count == b.number_count
                      for a, b in zip(nll_a, nll_b))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{len(rows)} rows, batch {args.batch_size} (shared path: "
          f"{args.shared_batch_size or args.batch_size}), max new tokens {args.max_new_tokens}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{load[0]:.2f} -> {load[1]:.2f}")
    for k, v in times.items():
        print(f"{k:<11} median {med[k]:8.1f} s  runs {', '.join(f'{t:.1f}' for t in v)}")
    print(f"shared / two passes = {med['shared'] / med['two_passes']:.3f}; identical generated "
          f"tokens: {same_tokens}; loss-token counts equal: {same_counts}; max relative NLL "
          f"difference {nll_rel:.2e}")
    split = {k: round(statistics.median(getattr(x, k) for x in stages), 2)
             for k in E.EvalSeconds._fields}
    print("shared path, median seconds per stage: "
          + ", ".join(f"{k} {v:.1f}" for k, v in split.items())
          + f"; generated tokens {sum(len(g) for g in gen_b)}")
    print(json.dumps({"rows": len(rows), "batch_size": args.batch_size,
                      "shared_batch_size": args.shared_batch_size or args.batch_size,
                      "two_passes_s": round(med["two_passes"], 2),
                      "shared_s": round(med["shared"], 2), "shared_stages_s": split,
                      "ratio": round(med["shared"] / med["two_passes"], 4),
                      "identical_tokens": same_tokens, "equal_counts": same_counts,
                      "max_rel_nll_diff": nll_rel, "load_average": load}))


if __name__ == "__main__":
    main()
