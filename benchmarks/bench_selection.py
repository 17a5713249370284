"""Speed of the pure-tensor Q-Tuning core: sample selection and token pruning.

    .venv/bin/python benchmarks/bench_selection.py [--threads N] [--repeats R] [--device cpu]

Prints the median and the spread (min..max) over R timed runs after one warm-up of
`select_samples` on 10k, 100k and 1M random samples, beside a baseline that does what the public
implementations do (bisection with `torch.quantile` thresholds, which re-sorts at every step, and
no exact-k finish), and of `token_keep_mask` on 256 x 4096 tokens (70% in the loss mask).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from q_tuning.selection import keep_count, select_samples  # noqa: E402
from q_tuning.token_pruning import token_keep_mask  # noqa: E402


def quantile_bisection(ppl: torch.Tensor, entropy: torch.Tensor, keep_ratio: float,
                       max_iter: int = 10) -> torch.Tensor:
    """Baseline: the corners at the bisection's level, thresholds from torch.quantile."""
    k = keep_count(keep_ratio, ppl.numel())
    low, high = 0.0, 1.0
    corners = torch.ones_like(ppl, dtype=torch.bool)
    for _ in range(max_iter):
        mid = (low + high) / 2
        q = torch.tensor([mid, 1 - mid], dtype=ppl.dtype, device=ppl.device)
        ppl_low, ppl_high = torch.quantile(ppl, q)
        ent_low, ent_high = torch.quantile(entropy, q)
        q2 = (ppl >= ppl_high) & (entropy <= ent_low)
        q4 = (ppl <= ppl_low) & (entropy >= ent_high)
        inside = q2 | q4
        if int(inside.sum()) >= k:
            high, corners = mid, inside
        else:
            low = mid
    return corners


def time_it(fn: Callable[[], object], repeats: int, device: str) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def row(name: str, times: list[float]) -> str:
    ms = [t * 1e3 for t in times]
    return f"{name:<44} {statistics.median(ms):>10.1f} {min(ms):>10.1f} {max(ms):>10.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, device {args.device}, {args.threads} thread(s), "
          f"{args.repeats} runs after a warm-up")
    print(f"{'case':<44} {'median ms':>10} {'min ms':>10} {'max ms':>10}")
    for n in (10_000, 100_000, 1_000_000):
        ppl = torch.randn(n, generator=generator, dtype=torch.float64).exp().to(args.device)
        entropy = torch.rand(n, generator=generator, dtype=torch.float64).to(args.device) * 5
        print(row(f"select_samples n={n:,} r=0.25",
                  time_it(lambda: select_samples(ppl, entropy, 0.25), args.repeats, args.device)))
        print(row(f"  baseline quantile bisection n={n:,}",
                  time_it(lambda: quantile_bisection(ppl, entropy, 0.25), max(1, args.repeats // 2),
                          args.device)))
    nll = (torch.rand(256, 4096, generator=generator) * 6).to(args.device)
    loss_mask = (torch.rand(256, 4096, generator=generator) < 0.7).to(args.device)
    prune = lambda: token_keep_mask(nll, loss_mask, 0.7, 0.5)  # noqa: E731
    print(row("token_keep_mask 256x4096 r_tok=0.7 lambda=0.5",
              time_it(prune, args.repeats, args.device)))


if __name__ == "__main__":
    main()
