"""Benchmark the scoring pass's output stage: fused (hidden states -> statistics) vs logits path.

    cd /work/main && TORCHDYNAMO_DISABLE=1 .venv/bin/python benchmarks/bench_fused_scoring.py
    # block-shape study for fused_nll_entropy's CPU defaults (time only):
    TORCHDYNAMO_DISABLE=1 .venv/bin/python benchmarks/bench_fused_scoring.py \
        --sweep 512x2048,512x8192,1024x16384,85x49152

What is timed is the part of one scoring micro-batch that differs between the two methods, from
the final hidden states `[s, b, h]` (the decoder's output after the final norm) to the per-token
statistics, with q_tuning's own statistics step (`scoring.token_statistics`):
- logits: the output layer's product `[s, b, V]` (ColumnParallelLinear: `input @ weight.T`),
  GPTModel's `transpose(0, 1).contiguous()` to `[b, s, V]`, then the statistics of the loss-mask
  positions (`token_nll_entropy` on `logits[mask]`). Megatron-LM's Float16Module would also cast
  bf16 logits to float32 on the last stage; that copy is left out, in the logits path's favour.
- fused: GPTModel's transpose of what the tapped output layer returns (the hidden states), then
  `fused_nll_entropy` on the loss-mask positions' hidden states.
The decoder's forward is the same in both and is not included.

Shapes: a SmolLM2-shaped output layer (vocabulary 49,152, hidden 576), 16 sequences x 512 tokens,
the first half of each a prompt (loss mask 0), so 16 x 256 response targets.

Time: median (min-max) over --repeats runs after one warm-up, the two methods alternating run by
run so that a load change on the shared machine hits both. Memory: see `_child_peak_extra`.
Targets (issue 7): fused peak extra memory <= 10% of the logits path's, time no worse.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

import torch
from bench_common import dispatch, print_table_header

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from q_tuning.fused_stats import fused_nll_entropy  # noqa: E402
from q_tuning.passes import scoring  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MEMORY_TARGET, TIME_TARGET = 0.10, 1.0


def make_inputs(batch: int, seq: int, hidden: int, vocab: int, dtype: torch.dtype):
    """Decoder output `[s, b, h]`, output weight `[V, h]` and a micro-batch dict like scoring's."""
    gen = torch.Generator().manual_seed(0)
    hidden_states = torch.randn(seq, batch, hidden, generator=gen).to(dtype)  # [s, b, h]
    weight = (torch.randn(vocab, hidden, generator=gen) * 3 / hidden ** 0.5).to(dtype)  # [V, h]
    loss_mask = torch.zeros(batch, seq)
    loss_mask[:, seq // 2 - 1:seq - 1] = 1  # position p predicts token p + 1: the second half
    mb = {"loss_mask": loss_mask,
          "labels": torch.randint(0, vocab, (batch, seq), generator=gen),
          "sample_index": torch.arange(batch)[:, None].expand(batch, seq),
          "target_index": torch.arange(1, seq + 1).expand(batch, seq)}
    return hidden_states, weight, mb


def _run() -> scoring.ScoringRun:
    groups = scoring.ParallelGroups(tp=None, pp=None, cp=None, dp=None, tp_size=1, pp_size=1,
                                    cp_size=1, is_last_stage=True)
    return scoring.ScoringRun(groups=groups, method="fused")


def _statistics(mb, head, output):
    positions = scoring.ScoredPositions.of(mb, output.device)
    return scoring.token_statistics(_run(), positions, mb["labels"], head, output)


def logits_path(hidden_states, weight, mb):
    logits = torch.matmul(hidden_states, weight.t())  # [s, b, V], ColumnParallelLinear
    output = logits.transpose(0, 1).contiguous()  # [b, s, V], GPTModel
    del logits
    return _statistics(mb, None, output)


def fused_path(hidden_states, weight, mb):
    output = hidden_states.transpose(0, 1).contiguous()  # [b, s, h], GPTModel on the tap's output
    head = scoring.OutputHead(weight=weight, bias=None)
    return _statistics(mb, head, output)


PATHS = {"logits": logits_path, "fused": fused_path}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _child_peak_extra(path: str, args) -> None:
    """In a fresh process: print the resident-memory peak of one call above the pre-call level, MiB.

    torch's CPU tensors are invisible to tracemalloc, so this reads what the OS sees: reset the
    kernel's peak-RSS mark (write 5 to /proc/self/clear_refs, Linux >= 4.0), read VmRSS, call once,
    read VmHWM. The parent sets MALLOC_MMAP_THRESHOLD_ so that every allocation >= 64 KiB is its
    own mmap, returned to the OS when freed: the warm-up cannot leave freed memory in the heap
    that the measured call would then reuse unseen. The warm-up (2 sequences) loads code and
    thread pools, which are not the path's memory.
    """
    hidden_states, weight, mb = make_inputs(args.batch, args.seq, args.hidden, args.vocab,
                                            DTYPES[args.dtypes])
    fn = PATHS[path]
    with torch.no_grad():
        fn(hidden_states[:, :2].contiguous(), weight, {k: v[:2] for k, v in mb.items()})
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
        result = fn(hidden_states, weight, mb)
        peak = _status_kib("VmHWM")
    del result
    print((peak - before) / 1024)


def _peak_extra_mib(path: str, args, dtype: str) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TORCHDYNAMO_DISABLE="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", path, "--dtypes", dtype,
           "--batch", str(args.batch), "--seq", str(args.seq), "--hidden", str(args.hidden),
           "--vocab", str(args.vocab)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def _time(fns: dict, inputs, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn(*inputs)
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn(*inputs)
                times[name].append(time.perf_counter() - start)
    return times


def _fmt(ts: list[float]) -> str:
    return f"{statistics.median(ts):7.2f} ({min(ts):.2f}-{max(ts):.2f})"


def _compare(args) -> None:
    n = args.batch * (args.seq // 2)
    print(f"scoring output stage, fused vs logits: {args.batch} x {args.seq} tokens, half prompt "
          f"({n} response targets), hidden {args.hidden}, vocabulary {args.vocab}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f}; median (min-max) of {args.repeats} after 1 warm-up")
    print_table_header("dtype", "path", "time s", "peak extra MiB", "logits tensor MiB")
    verdicts = []
    for dtype in args.dtypes.split(","):
        inputs = make_inputs(args.batch, args.seq, args.hidden, args.vocab, DTYPES[dtype])
        check = [PATHS[p](*inputs) for p in ("logits", "fused")]
        err = float((check[0][0] - check[1][0]).abs().max())  # [2, n]: nll and entropy
        times = _time(PATHS, inputs, args.repeats)
        del inputs, check
        mem = {p: _peak_extra_mib(p, args, dtype) for p in PATHS}
        logits_mib = args.batch * args.seq * args.vocab * DTYPES[dtype].itemsize / 2 ** 20
        for p in PATHS:
            print(f"| {dtype} | {p} | {_fmt(times[p])} | {mem[p]:9.1f} | {logits_mib:.0f} |")
        mem_ratio = mem["fused"] / mem["logits"]
        time_ratio = statistics.median(times["fused"]) / statistics.median(times["logits"])
        print(f"| {dtype} | fused / logits | {time_ratio:7.2f}x | {100 * mem_ratio:8.1f}% | |")
        ok = mem_ratio <= MEMORY_TARGET and time_ratio <= TIME_TARGET
        verdicts.append(f"{dtype}: target (memory <= {100 * MEMORY_TARGET:g}%, time <= "
                        f"{TIME_TARGET:g}x) {'MET' if ok else 'MISSED'}: memory "
                        f"{100 * mem_ratio:.1f}%, time {time_ratio:.2f}x; max |fused - logits| "
                        f"over nll/entropy {err:.2e}")
    print("\n".join(verdicts))


def _sweep(args) -> None:
    shapes = [tuple(map(int, s.split("x"))) for s in args.sweep.split(",")]
    n = args.batch * (args.seq // 2)
    for dtype in args.dtypes.split(","):
        gen = torch.Generator().manual_seed(0)
        h = torch.randn(n, args.hidden, generator=gen).to(DTYPES[dtype])  # [n, h]
        w = (torch.randn(args.vocab, args.hidden, generator=gen) / args.hidden ** 0.5
             ).to(DTYPES[dtype])
        t = torch.randint(0, args.vocab, (n,), generator=gen)
        fns = {s: (lambda h, w, t, s=s: fused_nll_entropy(h, w, t, chunk_tokens=s[0],
                                                          chunk_vocab=s[1])) for s in shapes}
        times = _time(fns, (h, w, t), args.repeats)
        print(f"block study, {dtype}, {n} tokens x {args.vocab} vocabulary, hidden {args.hidden}, "
              f"{torch.get_num_threads()} threads, median (min-max) of {args.repeats}, rounds "
              "alternate shapes")
        print("| tokens x vocabulary | logits per block (2^20 = 1 Mi) | time s |")
        print("|---|---|---|")
        for s, ts in times.items():
            print(f"| {s[0]} x {s[1]} | {s[0] * s[1] / 2 ** 20:.2f} Mi | {_fmt(ts)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sweep", default=None, help="comma-separated TOKENSxVOCAB block shapes")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    dispatch(args, lambda: _child_peak_extra(args.child, args), lambda: _sweep(args),
             lambda: _compare(args))


if __name__ == "__main__":
    main()
