"""The paper's regime (issue 29): SmolLM2-135M-Instruct, LoRA SFT on a natural-instructions mix,
scored on MMLU, qa_wikidata (closed book) and held-out NI NLL, under Q-Tuning and its baselines.

    python experiments/paper_regime/grid.py --data DATA --out WORK --pilot   # the gate (3 runs)
    python experiments/paper_regime/grid.py --data DATA --out WORK           # gate, then the grid
    python experiments/paper_regime/grid.py --data DATA --out WORK --table   # only the tables
    python experiments/paper_regime/grid.py --out /tmp/p --results /tmp/p/r --tiny  # a minute

DATA is `prepare.py`'s folder. A run is (setting, seed): `q_tuning.sft.train` (LoRA, 3 epochs), then
`q_tuning.sft.evaluate.cli` once per task, then one record JSON in --results (default
experiments/paper_regime/records/) with each task's summary and per-item outcomes, the compute and the
commit; the run's weights are deleted after it. A rerun skips recorded runs (the grid resumes);
records from another commit stop it (run the grid from its own worktree at a fixed commit).
The pilot (seed 1: zero_shot, full, random_12.5x50) comes first; when neither full nor random
moves MMLU or qa_wikidata beyond its 95% paired bootstrap interval against zero-shot, the grid
stops there (the regime is unmeasurable at this scale) unless --ignore-gate (or --tiny, whose
random model moves nothing).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from experiments.gsm import gsm_grid  # noqa: E402  (the shared run machinery)

from experiments.paper_regime import records as R  # noqa: E402
from experiments.paper_regime import tables  # noqa: E402

# The LoRA recipe, the one place its flag names live (issue 29: rank 8, alpha 16, all linear).
LORA_FLAGS = ["--lora-rank", "8", "--lora-alpha", "16", "--lora-dropout", "0.0",
              "--lora-target-modules", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
OFFICIAL = ["--q-tuning-selection", "paper", "--q-tuning-token-budget", "global",
            "--q-tuning-entropy-scope", "sequence"]


def _keep(samples: str, tokens: str, *more: str) -> list[str]:
    return ["--enable-q-tuning", "--q-tuning-sample-keep-ratio", samples,
            "--q-tuning-token-keep-ratio", tokens, *more]


SETTINGS: dict[str, list[str] | None] = {
    "zero_shot": None,
    "full": [],
    "random_12.5x50": _keep("0.125", "0.5", "--q-tuning-strategy", "random"),
    "random_25x70": _keep("0.25", "0.7", "--q-tuning-strategy", "random"),
    "qtuning_12.5x50": _keep("0.125", "0.5"),
    "qtuning_25x70": _keep("0.25", "0.7"),
    "qtuning_12.5x50_official": _keep("0.125", "0.5", *OFFICIAL),
    "qtuning_25x70_official": _keep("0.25", "0.7", *OFFICIAL),
    "triage_12.5x100": _keep("0.125", "1.0"),
    "infobatch": ["--enable-q-tuning", "--q-tuning-strategy", "infobatch"],
}
PILOT = ("zero_shot", "full", "random_12.5x50")
SEED_ONE_ONLY = {"zero_shot"}  # greedy / log-likelihood of the untouched model: seed-free

SIZES = {
    "real": dict(global_batch=32, micro_batch=8, seq_length=512, epochs=3, seeds=(1, 2, 3),
                 lr=1e-4, min_lr=0.0, warmup_share=0.1, eval_batch=32, qa_max_new_tokens=16,
                 scoring_micro_batch=16),
    "tiny": dict(global_batch=8, micro_batch=4, seq_length=256, epochs=1, seeds=(1,), lr=1e-3,
                 min_lr=0.0, warmup_share=0.1, eval_batch=4, qa_max_new_tokens=4,
                 scoring_micro_batch=8),
}
TASKS = (("mmlu", "mmlu.jsonl"), ("qa-exact", "qa_wikidata.jsonl"), ("nll", "ni_heldout.jsonl"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="work folder: base model, runs, logs")
    parser.add_argument("--data", default=None, help="prepare.py's folder (not with --tiny)")
    parser.add_argument("--results", default=str(REPO / "experiments" / "paper_regime" / "records"),
                        help="folder of the finished runs' records (the resumable state)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny random model and tiny made-up data: the pipeline in a minute")
    parser.add_argument("--no-lora", action="store_true",
                        help="--tiny only: full fine-tuning (checks the pipeline without LoRA)")
    parser.add_argument("--pilot", action="store_true", help="only the gate's runs and verdict")
    parser.add_argument("--ignore-gate", action="store_true",
                        help="run the grid even when the gate finds nothing measurable")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run")
    parser.add_argument("--table", action="store_true", help="only write the tables")
    args = parser.parse_args(argv)
    if args.tiny == bool(args.data):
        parser.error("--data: give prepare.py's folder, or --tiny (which makes its own data)")
    if args.no_lora and not args.tiny:
        parser.error("--no-lora: only with --tiny (the grid's recipe is LoRA)")
    size, out, results = gsm_grid.grid_setup(args, SIZES)
    if not args.table:
        data = R.write_tiny_data(out / "data") if args.tiny else pathlib.Path(args.data)
        run_grid(args, size, out, results, data)
    print(tables.write_tables(results, list(SETTINGS)))


def run_grid(args, size: dict, out: pathlib.Path, results: pathlib.Path,
             data: pathlib.Path) -> None:
    commit = current_commit()
    R.check_commit(results, commit)
    R.check_data(data, [name for _, name in TASKS] + ["train.jsonl"])
    base = gsm_grid.base_model(out, tiny=args.tiny)
    settings = args.settings or list(SETTINGS)
    start = time.time()
    for setting, seed in run_order(PILOT, size["seeds"][:1]):
        if setting in settings:
            run(out, results, base, data, setting, seed, size, args, commit)
    verdict = tables.gate(R.read_records(results))
    print(verdict.text, flush=True)
    if args.pilot:
        return
    if not verdict.measurable and not (args.ignore_gate or args.tiny):  # tiny: never moves
        why = ("the gate found no benchmark moved by full or random data"
               if verdict.measurable is False else "the pilot's runs are not all recorded")
        raise SystemExit(f"paper grid: {why}: stopped after the pilot (--ignore-gate runs the "
                         "grid anyway)")
    for setting, seed in run_order(settings, size["seeds"]):
        run(out, results, base, data, setting, seed, size, args, commit)
    gsm_grid.log(f"paper grid: done in {time.time() - start:.0f} s")


def run_order(settings, seeds: tuple[int, ...]) -> list[tuple[str, int]]:
    """Seed-major, the pilot's settings first within each seed; zero-shot in the first seed only."""
    ordered = [s for s in PILOT if s in settings] + [s for s in settings if s not in PILOT]
    return [(s, seed) for seed in seeds for s in ordered
            if seed == seeds[0] or s not in SEED_ONE_ONLY]


def current_commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def run(out: pathlib.Path, results: pathlib.Path, base: pathlib.Path, data: pathlib.Path,
        setting: str, seed: int, size: dict, args, commit: str) -> None:
    """Train, evaluate and record one run, unless its record exists."""
    run_dir = gsm_grid.fresh_run_dir(out, results, setting, seed)
    if run_dir is None:
        return
    record_path = results / f"{setting}_seed{seed}.json"
    train_dir, trained = run_dir / "train", SETTINGS[setting] is not None
    start = time.time()
    if trained:
        gsm_grid.log(f"{setting} seed {seed}: training")
        gsm_grid.call_module("q_tuning.sft.train", train_argv(base, data, train_dir, setting, seed,
                                                          size, lora=not args.no_lora),
                             args.tiny, args.threads, run_dir / "train.out")
    train_seconds = time.time() - start
    eval_seconds = {}
    for task, _ in TASKS:
        gsm_grid.log(f"{setting} seed {seed}: evaluating {task}")
        start = time.time()
        gsm_grid.call_module("q_tuning.sft.evaluate.cli",
                             eval_argv(train_dir / "hf" if trained else base, data, run_dir, task,
                                       size), args.tiny, args.threads, run_dir / f"{task}.out")
        eval_seconds[task] = time.time() - start
    record = R.run_record(setting, seed, run_dir, trained=trained, train_seconds=train_seconds,
                          eval_seconds=eval_seconds, commit=commit, lora=not args.no_lora,
                          argv=SETTINGS[setting])
    gsm_grid.write_json(record_path, record)
    shutil.rmtree(train_dir / "hf", ignore_errors=True)  # the record is what the tables need
    gsm_grid.log(f"{setting} seed {seed}: {R.summary_line(record)}")


def train_argv(base: pathlib.Path, data: pathlib.Path, train_dir: pathlib.Path, setting: str,
               seed: int, size: dict, *, lora: bool = True) -> list[str]:
    train_size = R.count_rows(data / "train.jsonl")
    steps = size["epochs"] * train_size // size["global_batch"]
    return ["--hf-checkpoint", str(base), "--data-path", str(data / "train.jsonl"),
            "--output-dir", str(train_dir), "--export-hf", str(train_dir / "hf"), "--no-save",
            "--seq-length", str(size["seq_length"]),
            "--micro-batch-size", str(size["micro_batch"]),
            "--global-batch-size", str(size["global_batch"]), "--train-iters", str(steps),
            "--lr", str(size["lr"]), "--min-lr", str(size["min_lr"]),
            "--lr-warmup-iters", str(round(size["warmup_share"] * steps)),
            "--lr-decay-style", "cosine", "--weight-decay", "0.0", "--clip-grad", "1.0",
            "--seed", str(seed), "--q-tuning-seed", str(seed), "--log-interval", "1",
            "--q-tuning-scoring-micro-batch-size", str(size["scoring_micro_batch"]),
            *(LORA_FLAGS if lora else []), *SETTINGS[setting]]


def eval_argv(checkpoint: pathlib.Path, data: pathlib.Path, run_dir: pathlib.Path, task: str,
              size: dict) -> list[str]:
    name = dict(TASKS)[task]
    return ["--task", task, "--hf-checkpoint", str(checkpoint), "--data-path", str(data / name),
            "--batch-size", str(size["eval_batch"]),
            *(["--max-new-tokens", str(size["qa_max_new_tokens"])] if task == "qa-exact" else []),
            "--output", str(run_dir / f"{task}.json"),
            "--predictions", str(run_dir / f"{task}.predictions.jsonl")]


if __name__ == "__main__":
    main()
