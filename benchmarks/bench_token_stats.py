"""Benchmark token_nll_entropy against the naive formulation: time and peak extra memory.

    cd /work/main && TORCHDYNAMO_DISABLE=1 .venv/bin/python benchmarks/bench_token_stats.py
    # single-threaded, and a chunk-size study (float32, time only, next to naive):
    TORCHDYNAMO_DISABLE=1 .venv/bin/python benchmarks/bench_token_stats.py --threads 1
    TORCHDYNAMO_DISABLE=1 .venv/bin/python benchmarks/bench_token_stats.py --sweep 21,85,341

Naive formulation (the one the issue measures against): fp32 log_softmax over the whole vocabulary,
gather, and `(p * logp).sum`. Time: median over --repeats runs after one warm-up, the two
implementations alternating run by run so that a load change on a shared machine hits both.
Memory: see `_child_peak_extra`. Target (issue): >= 2x faster and >= 20x less peak extra memory for
8192 tokens x 49,152 vocabulary, fp32.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
from bench_common import dispatch, print_table_header

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from q_tuning.token_stats import token_nll_entropy  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SPEED_TARGET, MEMORY_TARGET = 2.0, 20.0


def naive_token_nll_entropy(logits: torch.Tensor, targets: torch.Tensor):
    logp = torch.log_softmax(logits.float(), dim=-1)  # [N, V] fp32
    nll = -logp.gather(-1, targets[..., None])[..., 0]
    entropy = -(logp.exp() * logp).sum(-1)
    return nll, entropy


def _make_inputs(tokens: int, vocab: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(tokens, vocab, generator=gen) * 2.0).to(dtype)  # [N, V]
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    return logits, targets


def _impls(chunk_size: int | None) -> dict[str, Callable]:
    return {"naive": naive_token_nll_entropy,
            "token_nll_entropy": lambda z, t: token_nll_entropy(z, t, chunk_size=chunk_size)}


def _time(fns: dict[str, Callable], logits, targets, repeats: int) -> dict[str, list[float]]:
    """Seconds per call for each fn: one warm-up each, then `repeats` rounds, fns alternating."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn(logits, targets)
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn(logits, targets)
                times[name].append(time.perf_counter() - start)
    return times


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _child_peak_extra(impl: str, tokens: int, vocab: int, dtype: str, chunk: int | None) -> None:
    """In a fresh process: print the resident-memory peak of one call above the pre-call level.

    torch's CPU tensors are invisible to tracemalloc, so this measures what the OS sees: reset the
    kernel's peak-RSS mark (write 5 to /proc/self/clear_refs, Linux >= 4.0), read VmRSS, call once,
    read VmHWM. The parent sets MALLOC_MMAP_THRESHOLD_ so that every allocation >= 64 KiB is its
    own mmap, returned to the OS when freed: a warm-up cannot leave freed memory in the heap that
    the measured call would then reuse unseen. A warm-up on 64 tokens first loads code and thread
    pools, which are not the function's memory.
    """
    logits, targets = _make_inputs(tokens, vocab, DTYPES[dtype])
    fn = _impls(chunk)[impl]
    with torch.no_grad():
        fn(logits[:64], targets[:64])
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
        result = fn(logits, targets)
        peak = _status_kib("VmHWM")
    del result
    print((peak - before) / 1024)


def _peak_extra_mib(impl: str, args, dtype: str) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TORCHDYNAMO_DISABLE="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--tokens", str(args.tokens),
           "--vocab", str(args.vocab), "--dtypes", dtype,
           "--threads", str(torch.get_num_threads())]
    if args.chunk_size is not None:
        cmd += ["--chunk-size", str(args.chunk_size)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _fmt_time(ts: list[float]) -> str:
    return f"{statistics.median(ts):8.3f} ({min(ts):.3f}-{max(ts):.3f})"


def _compare(args) -> None:
    print(f"token_nll_entropy vs naive: {args.tokens} tokens x {args.vocab} vocab, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, chunk_size={args.chunk_size}, "
          f"median of {args.repeats} after 1 warm-up; load average {_load()}")
    print_table_header("dtype", "implementation", "time s, median (min-max)", "peak extra MiB")
    verdicts = []
    for dtype in args.dtypes.split(","):
        logits, targets = _make_inputs(args.tokens, args.vocab, DTYPES[dtype])
        times = _time(_impls(args.chunk_size), logits, targets, args.repeats)
        del logits, targets
        mem = {name: _peak_extra_mib(name, args, dtype) for name in times}
        for name in times:
            print(f"| {dtype} | {name} | {_fmt_time(times[name])} | {mem[name]:10.1f} |")
        speedup = statistics.median(times["naive"]) / statistics.median(times["token_nll_entropy"])
        mem_ratio = mem["naive"] / max(mem["token_nll_entropy"], 1e-9)
        print(f"| {dtype} | ratio naive/ours | {speedup:8.2f}x faster | {mem_ratio:8.1f}x less |")
        ok = speedup >= SPEED_TARGET and mem_ratio >= MEMORY_TARGET
        verdicts.append(f"{dtype}: target (>= {SPEED_TARGET:g}x faster, >= {MEMORY_TARGET:g}x less "
                        f"memory) {'MET' if ok else 'MISSED'}: {speedup:.2f}x "
                        f"({speedup / SPEED_TARGET:.2f} of target), {mem_ratio:.1f}x "
                        f"({mem_ratio / MEMORY_TARGET:.2f} of target)")
    print("\n".join(verdicts))
    print(f"load average at the end: {_load()} (other processes on these cores slow both columns)")


def _sweep(args) -> None:
    logits, targets = _make_inputs(args.tokens, args.vocab, torch.float32)
    fns = {"naive": naive_token_nll_entropy}
    fns.update({c: (lambda z, t, c=c: token_nll_entropy(z, t, chunk_size=c))
                for c in map(int, args.sweep.split(","))})
    times = _time(fns, logits, targets, args.repeats)
    naive = statistics.median(times.pop("naive"))
    print(f"chunk-size sweep, float32, {args.tokens} tokens x {args.vocab} vocab, median of "
          f"{args.repeats} (rounds alternate chunk sizes and naive); naive median {naive:.3f} s; "
          f"load average {_load()} at the end")
    print("| chunk_size (tokens) | chunk elements | time s, median (min-max) | naive/this |")
    print("|---|---|---|---|")
    for c, ts in times.items():
        ratio = naive / statistics.median(ts)
        print(f"| {c} | {c * args.vocab} | {_fmt_time(ts)} | {ratio:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: the function's")
    parser.add_argument("--sweep", default=None, help="comma-separated chunk sizes to time")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dispatch(args, lambda: _child_peak_extra(args.child, args.tokens, args.vocab, args.dtypes,
                                             args.chunk_size),
             lambda: _sweep(args), lambda: _compare(args))


if __name__ == "__main__":
    main()
