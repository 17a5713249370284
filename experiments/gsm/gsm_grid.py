"""The reproduction grid: SmolLM2-135M-Instruct SFT on GSM-Symbolic (10% corrupted answers) under
Q-Tuning and its baselines, evaluated on a disjoint held-out set; writes the results table.

    python experiments/gsm/gsm_grid.py --out grid/gsm            # the real grid (hours on 2 CPU cores)
    python experiments/gsm/gsm_grid.py --out /tmp/g --tiny       # the same pipeline in seconds (tests)
    python experiments/gsm/gsm_grid.py --out grid/gsm --table    # rewrite the table from finished runs

Every (setting, seed) is one run: `q_tuning.sft.train` on the fixed training set, then
`q_tuning.sft.evaluate.cli` on the held-out set; all runs are trained first, then all evaluated. A
run's `train_seconds` marks it trained and its `result.json` marks it evaluated, both written
last; a rerun of the script skips what is finished (a half-trained run starts again), so an
interrupted grid resumes where it stopped. Runs go in a child process each (a crash ends that
run, not the grid) except in `--tiny` mode, which runs them in this process to stay fast.

All settings see the same data stream (same samples per step, same steps); they differ only in
what the step trains on. `zero_shot` is the untouched model: greedy decoding makes it identical
for every seed, so it is evaluated once.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # experiments.gsm.gsm_symbolic

from q_tuning._files import write_text_atomic

SETTINGS: dict[str, list[str] | None] = {
    "zero_shot": None,
    "full": [],
    "qtuning_25x70": ["--enable-q-tuning", "--q-tuning-sample-keep-ratio", "0.25",
                      "--q-tuning-token-keep-ratio", "0.7"],
    "random_25x70": ["--enable-q-tuning", "--q-tuning-strategy", "random",
                     "--q-tuning-sample-keep-ratio", "0.25", "--q-tuning-token-keep-ratio", "0.7"],
    "qtuning_12.5x50": ["--enable-q-tuning", "--q-tuning-sample-keep-ratio", "0.125",
                        "--q-tuning-token-keep-ratio", "0.5"],
    "infobatch": ["--enable-q-tuning", "--q-tuning-strategy", "infobatch"],
}

# (train size, held-out size, global batch, seeds, max new tokens, eval batch)
SIZES = {
    "real": dict(train_size=128, eval_size=300, global_batch=16, seeds=(1, 2, 3),
                 max_new_tokens=200, eval_batch=32, seq_length=512, micro_batch=4,
                 scoring_micro_batch=8, lr=5e-5, min_lr=5e-6),
    "tiny": dict(train_size=16, eval_size=4, global_batch=8, seeds=(1, 2), max_new_tokens=8,
                 eval_batch=4, seq_length=512, micro_batch=4, scoring_micro_batch=8, lr=1e-3,
                 min_lr=1e-4),
}
CORRUPT_FRACTION = 0.1
DATA_SEED = 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="grid folder (created; reruns resume)")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny random model and a few samples: the pipeline in seconds")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--eval-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run")
    parser.add_argument("--table", action="store_true", help="only rewrite the table")
    args = parser.parse_args(argv)
    size = dict(SIZES["tiny" if args.tiny else "real"])
    for key in ("seeds", "train_size", "eval_size"):
        if getattr(args, key) is not None:
            size[key] = tuple(args.seeds) if key == "seeds" else getattr(args, key)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        grid_start = time.time()
        base = prepare(out, size, tiny=args.tiny)
        # seed-major, trained settings first: each finished seed completes a row of every
        # comparison; zero-shot (seed-independent) after the first seed's runs
        trained = [s for s in args.settings if SETTINGS[s] is not None]
        runs = [(setting, seed) for seed in size["seeds"] for setting in trained]
        if "zero_shot" in args.settings:
            runs.insert(len(trained), ("zero_shot", size["seeds"][0]))
        # all training first, then all evaluation: a finished phase is never redone
        for step in (train_run, evaluate_run):
            for setting, seed in runs:
                step(out, base, setting, seed, size, in_process=args.tiny, threads=args.threads)
        log(f"grid: done in {time.time() - grid_start:.0f} s")
    table = write_table(out, args.settings, size)
    print(table)


def prepare(out: pathlib.Path, size: dict, *, tiny: bool) -> pathlib.Path:
    """The data (fixed for every run) and the base model as a safetensors HF folder."""
    from experiments.gsm.gsm_symbolic import build_gsm_splits, write_jsonl_atomic

    data = out / "data"
    if not (data / "eval.jsonl").is_file():
        train, held_out = build_gsm_splits(size["train_size"], size["eval_size"], seed=DATA_SEED,
                                           corrupt_fraction=CORRUPT_FRACTION)
        write_jsonl_atomic(data / "train.jsonl", train)
        write_jsonl_atomic(data / "eval.jsonl", held_out)  # written last: marks data complete
    return base_model(out, tiny=tiny)


def base_model(out: pathlib.Path, *, tiny: bool) -> pathlib.Path:
    """`out/base_model`, made once: SmolLM2-135M-Instruct as a safetensors HF folder, or the
    tiny random model."""
    base = out / "base_model"
    if not (base / "config.json").is_file():
        if tiny:
            write_tiny_model(base)
        else:
            from q_tuning.sft.hf.assets import smollm2_gguf_path
            from q_tuning.sft.hf.model import convert_hf_checkpoint

            convert_hf_checkpoint(smollm2_gguf_path(), base)
    return base


def grid_setup(args, sizes: dict) -> tuple[dict, pathlib.Path, pathlib.Path]:
    """(sizes of `--tiny` or the real grid with `--seeds` applied, the `--out` work folder, the
    `--results` folder), the folders created."""
    size = dict(sizes["tiny" if args.tiny else "real"])
    if args.seeds:
        size["seeds"] = tuple(args.seeds)
    out, results = pathlib.Path(args.out), pathlib.Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    return size, out, results


def fresh_run_dir(out: pathlib.Path, results: pathlib.Path, setting: str,
                  seed: int) -> pathlib.Path | None:
    """The empty folder of run (setting, seed) under `out/runs`, or None (logged) when its record
    `results/<setting>_seed<seed>.json` exists: a recorded run is finished, an interrupted one
    starts again."""
    if (results / f"{setting}_seed{seed}.json").is_file():
        log(f"{setting} seed {seed}: finished earlier, skipped")
        return None
    run_dir = out / "runs" / setting / f"seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    return run_dir


def write_tiny_model(folder: pathlib.Path) -> None:
    import torch
    import transformers

    from q_tuning.sft.hf.assets import load_tokenizer

    tokenizer = load_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)


def _run_dir(out: pathlib.Path, setting: str, seed: int) -> pathlib.Path:
    return out / "runs" / setting / f"seed{seed}"


def train_run(out: pathlib.Path, base: pathlib.Path, setting: str, seed: int, size: dict, *,
              in_process: bool, threads: int | None) -> None:
    """Train one run unless it is trained already (its HF export and metrics exist)."""
    run_dir = _run_dir(out, setting, seed)
    train_dir = run_dir / "train"
    if SETTINGS[setting] is None or (run_dir / "result.json").is_file() or (
            (train_dir / "hf" / "config.json").is_file() and (run_dir / "train_seconds").is_file()):
        return
    if train_dir.exists():  # an interrupted run: start it again
        shutil.rmtree(train_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log(f"{setting} seed {seed}: training")
    start = time.time()
    call_module("q_tuning.sft.train", train_argv(base, out, train_dir, setting, seed, size), in_process,
          threads, run_dir / "train.out")
    (run_dir / "train_seconds").write_text(f"{time.time() - start:.1f}\n")  # marks it trained


def evaluate_run(out: pathlib.Path, base: pathlib.Path, setting: str, seed: int, size: dict, *,
                 in_process: bool, threads: int | None) -> dict:
    """Evaluate a trained run (or the base model) and write its result.json, unless done."""
    run_dir = _run_dir(out, setting, seed)
    result_path = run_dir / "result.json"
    if result_path.is_file():
        log(f"{setting} seed {seed}: done earlier, skipped")
        return json.loads(result_path.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    trained = SETTINGS[setting] is not None
    model_dir = run_dir / "train" / "hf" if trained else base
    eval_json = run_dir / "eval.json"
    log(f"{setting} seed {seed}: evaluating {model_dir}")
    start = time.time()
    call_module("q_tuning.sft.evaluate.cli",
          ["--hf-checkpoint", str(model_dir), "--data-path", str(out / "data" / "eval.jsonl"),
           "--batch-size", str(size["eval_batch"]), "--max-new-tokens",
           str(size["max_new_tokens"]), "--output", str(eval_json),
           "--predictions", str(run_dir / "predictions.jsonl")],
          in_process, threads, run_dir / "eval.out")
    result = {"setting": setting, "seed": seed, "eval": json.loads(eval_json.read_text()),
              "eval_seconds": time.time() - start,
              "train_seconds": float((run_dir / "train_seconds").read_text()) if trained else 0.0,
              "compute": compute_spent(run_dir / "train" / "metrics.jsonl") if trained else None}
    write_json(result_path, result)
    log(f"{setting} seed {seed}: accuracy {result['eval']['accuracy']:.3f}, "
         f"nll {result['eval']['nll_per_token']:.4f}")
    return result


def train_argv(base: pathlib.Path, out: pathlib.Path, train_dir: pathlib.Path, setting: str,
               seed: int, size: dict) -> list[str]:
    steps = size["train_size"] // size["global_batch"]  # one epoch
    return ["--hf-checkpoint", str(base), "--data-path", str(out / "data" / "train.jsonl"),
            "--output-dir", str(train_dir), "--export-hf", str(train_dir / "hf"), "--no-save",
            "--seq-length", str(size["seq_length"]),
            "--micro-batch-size", str(size["micro_batch"]),
            "--global-batch-size", str(size["global_batch"]), "--train-iters", str(steps),
            "--lr", str(size["lr"]), "--min-lr", str(size["min_lr"]), "--lr-decay-style",
            "cosine", "--weight-decay", "0.01", "--clip-grad", "1.0", "--seed", str(seed),
            "--q-tuning-seed", str(seed), "--log-interval", "1",
            "--q-tuning-scoring-micro-batch-size", str(size["scoring_micro_batch"]),
            *SETTINGS[setting]]


def call_module(module: str, argv: list[str], in_process: bool, threads: int | None,
          log: pathlib.Path) -> None:
    if in_process:
        import importlib
        if module == "q_tuning.sft.train":
            from q_tuning.sft.train.__main__ import main as entry
        else:
            entry = importlib.import_module(module).main
        entry(argv)
        return
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", module, *argv], stdout=f,
                              stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"gsm_grid: `python -m {module}` failed (status {proc.returncode}); "
                         f"log {log}:\n" + "\n".join(tail))


def compute_spent(metrics_path: pathlib.Path) -> dict:
    """Training compute of one run from the trainer's metrics.jsonl."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    reports = [r["q_tuning"] for r in rows if r.get("q_tuning")]
    return {
        "steps": len(rows),
        "consumed_samples": rows[-1]["consumed_samples"] if rows else 0,
        "trained_samples": sum(r["samples"] for r in rows),
        "trained_tokens": sum(r["tokens"] for r in rows),  # forwarded and back-propagated
        "loss_tokens": sum(r["loss_tokens"] for r in rows),
        "scored_samples": sum(r.get("scored_samples", 0) for r in reports),
        "scored_tokens": sum(r.get("scored_tokens", 0) for r in reports),  # no-grad forward
        "step_seconds": sum(r["seconds_per_iteration"] for r in rows),
        "scoring_seconds": sum(r.get("scoring_seconds", 0.0) for r in reports),
    }


def write_table(out: pathlib.Path, settings: list[str], size: dict) -> str:
    """Markdown table: accuracy and NLL over the evaluated runs (mean ± standard deviation over
    seeds); compute over the trained runs: mean samples and tokens trained (forwarded and
    back-propagated; tokens relative to full data) and tokens scored by the no-grad forward;
    times as the median over seeds [min, max]."""
    lines = [
        f"GSM-Symbolic held-out set: {size['eval_size']} problems; training set: "
        f"{size['train_size']} problems ({CORRUPT_FRACTION:.0%} with a corrupted final answer), "
        f"one epoch of {size['train_size'] // size['global_batch']} steps x "
        f"{size['global_batch']} samples.",
        "",
        "| setting | evaluated runs | exact match (%) | held-out NLL / token | trained runs | "
        "trained samples | trained tokens (x full) | scored tokens | "
        "step time s, median [min, max] | training process s, median [min, max] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary: dict[str, dict] = {}
    for setting in settings:
        results = [json.loads(p.read_text())
                   for p in sorted((out / "runs" / setting).glob("seed*/result.json"))]
        trained = [] if SETTINGS[setting] is None else [
            {"seed": int(p.parent.name[4:]), "train_seconds": float(p.read_text()),
             **compute_spent(p.parent / "train" / "metrics.jsonl")}
            for p in sorted((out / "runs" / setting).glob("seed*/train_seconds"))]
        summary[setting] = {"evaluated": results, "trained": trained}
        if results:
            acc = [100.0 * r["eval"]["accuracy"] for r in results]
            nll = [r["eval"]["nll_per_token"] for r in results]
            cells = [f"{len(results)} (seed {', '.join(str(r['seed']) for r in results)})",
                     mean_sd(acc, 1), mean_sd(nll, 4)]
        else:
            cells = ["0", "not evaluated yet", ""]
        if trained:
            full = summary.get("full", {}).get("trained", [])
            tokens = statistics.fmean(c["trained_tokens"] for c in trained)
            rel = (f" ({tokens / statistics.fmean(c['trained_tokens'] for c in full):.3f})"
                   if full else "")
            cells += [str(len(trained)),
                      f"{statistics.fmean(c['trained_samples'] for c in trained):.1f}",
                      f"{tokens:.0f}{rel}",
                      f"{statistics.fmean(c['scored_tokens'] for c in trained):.0f}",
                      median_range([c["step_seconds"] for c in trained]),
                      median_range([c["train_seconds"] for c in trained])]
        else:
            cells += ["–"] * 6
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    write_text_atomic(out / "table.md", table)
    write_json(out / "summary.json", summary)
    return table


def median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} [{min(values):.0f}, {max(values):.0f}]"


def mean_sd(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def write_json(path: pathlib.Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, default=float))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


if __name__ == "__main__":
    main()
