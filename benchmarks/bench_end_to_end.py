"""End-to-end wall time of training on a fixed number of samples, per grid setting, in one run.

    python benchmarks/bench_end_to_end.py --samples 32            # SmolLM2-135M-Instruct, CPU
    python benchmarks/bench_end_to_end.py --samples 16 --tiny     # tiny random model (smoke)

Each setting of `experiments/gsm/gsm_grid.py` (full data, random 25%x70%, Q-Tuning 25%x70% and
12.5%x50%, InfoBatch) trains one epoch over the same `--samples` GSM-Symbolic problems in a child
process (`python -m q_tuning.sft.train`, as a user runs it); the table gives the process wall time
(start-up, model load and HF export included), the summed step time, the samples and tokens
trained and scored, and both times as a ratio to full-data training.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from experiments.gsm import gsm_grid  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=32, help="training samples (one epoch)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--settings", nargs="+", default=[s for s, flags in
                                                          gsm_grid.SETTINGS.items() if flags is not None])
    parser.add_argument("--work-dir", default=None, help="default: a temporary folder")
    args = parser.parse_args()
    size = dict(gsm_grid.SIZES["tiny" if args.tiny else "real"], train_size=args.samples,
                eval_size=1)
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(args.work_dir or tmp)
        base = gsm_grid.prepare(out, size, tiny=args.tiny)
        rows = []
        for setting in args.settings:
            start = time.time()
            gsm_grid.train_run(out, base, setting, 1, size, in_process=False, threads=None)
            wall = time.time() - start
            compute = gsm_grid.compute_spent(out / "runs" / setting / "seed1" / "train" /
                                             "metrics.jsonl")
            rows.append((setting, wall, compute))
    full = next((r for r in rows if r[0] == "full"), rows[0])
    print(f"\n{args.samples} samples, {size['train_size'] // size['global_batch']} steps of "
          f"{size['global_batch']}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"{'setting':<18}{'wall s':>8}{'steps s':>9}{'wall/full':>10}{'steps/full':>11}"
          f"{'trained':>9}{'tokens':>8}{'scored tok':>11}")
    for setting, wall, c in rows:
        print(f"{setting:<18}{wall:>8.1f}{c['step_seconds']:>9.1f}{wall / full[1]:>10.3f}"
              f"{c['step_seconds'] / full[2]['step_seconds']:>11.3f}{c['trained_samples']:>9}"
              f"{c['trained_tokens']:>8}{c['scored_tokens']:>11}")
    print(json.dumps({s: {"wall_seconds": w, **c} for s, w, c in rows}))


if __name__ == "__main__":
    main()
