"""Records and tables of the leg-counting grid (`experiments/leg_counting/leg_grid.py`).

    run_record(...)              one finished run: per-problem outcomes, compute, mechanism
    write_tables(results, data)  main table, paired comparisons with bootstrap intervals, and the
                                 mechanism table, as `<results>/tables.md`

Paired comparisons: for settings A and B and every seed both have, the per-problem difference
A - B; the 95% interval is a percentile bootstrap (seeds resampled, then problems within each
resampled seed, 2000 draws, fixed generator: `experiments.stats.paired_bootstrap`).
"""

from __future__ import annotations

import collections
import json
import pathlib
import statistics
import sys

from experiments.gsm import gsm_grid

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from experiments.stats import BOOTSTRAP_DRAWS, paired_bootstrap  # noqa: E402

NOISE = ("clean", "misaligned", "arithmetic")
COMPARISONS = [("qtuning_25x70", "random_25x70"), ("qtuning_25x70", "full"),
               ("qtuning_25x70", "qtuning_25x70_exact"), ("qtuning_25x100", "random_25x70"),
               ("qtuning_25x70_official", "random_25x70"), ("qtuning_25x70_exact", "random_25x70"),
               ("qtuning_25x70_global", "random_25x70"), ("qtuning_25x70_global", "qtuning_25x70"),
               ("infobatch", "full"), ("random_25x70", "full"), ("full", "full_clean")]


def _rows(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_record(setting: str, seed: int, run_dir: pathlib.Path, data_dir: pathlib.Path, *,
               trained: bool, train_seconds: float, eval_seconds: float) -> dict:
    """Everything the tables need from one run (the run folder can then go)."""
    from experiments.leg_counting.leg_counting import line_accuracy

    held_out = _rows(data_dir / "eval.jsonl")
    predictions = _rows(run_dir / "predictions.jsonl")
    assert [p["id"] for p in predictions] == [r["id"] for r in held_out]
    lines = [line_accuracy(p["generated"], r["lines"]) for p, r in zip(predictions, held_out)]
    evaluation = json.loads((run_dir / "eval.json").read_text())
    evaluation["line_accuracy"] = sum(r for r, _ in lines) / max(sum(t for _, t in lines), 1)
    train_dir = run_dir / "train"
    return {
        "setting": setting, "seed": seed, "eval": evaluation,
        "problems": {"correct": [int(p["correct"]) for p in predictions],
                     "lines_right": [r for r, _ in lines], "lines": [t for _, t in lines],
                     "nll_sum": [p["nll_sum"] for p in predictions],
                     "loss_tokens": [p["loss_tokens"] for p in predictions],
                     "number_nll_sum": [p["number_nll_sum"] for p in predictions],
                     "number_tokens": [p["number_tokens"] for p in predictions]},
        "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "compute": gsm_grid.compute_spent(train_dir / "metrics.jsonl") if trained else None,
        "mechanism": mechanism(train_dir / "q_tuning_observe" / "rollout_stats.jsonl",
                               data_dir / "train.jsonl") if trained else None,
    }


def mechanism(stats_path: pathlib.Path, train_path: pathlib.Path) -> dict | None:
    """Per noise type: trained loss tokens, and quadrant counts (all / kept) per epoch, from the
    per-sample JSONL hook. None for a run without the pruner (full data trains on everything)."""
    if not stats_path.is_file():
        return None
    noise = [r["noise"] for r in _rows(train_path)]
    rows = _rows(stats_path)
    steps = sorted({r["step"] for r in rows})
    per_epoch = len(noise) // (len(rows) // len(steps))  # steps per epoch
    tokens = collections.Counter()
    quadrants: dict = collections.defaultdict(lambda: collections.defaultdict(
        lambda: {"all": [0] * 5, "kept": [0] * 5}))
    for r in rows:
        kind = noise[r["sample_index"]]
        epoch = steps.index(r["step"]) // per_epoch + 1
        cell = quadrants[kind][epoch]
        cell["all"][r["quadrant"]] += 1
        if r["kept"]:
            cell["kept"][r["quadrant"]] += 1
            tokens[kind] += r["loss_tokens"]
    return {"trained_loss_tokens": {k: tokens[k] for k in NOISE},
            "quadrants": {k: dict(v) for k, v in quadrants.items()}}


def _records(results: pathlib.Path) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = collections.defaultdict(dict)
    for path in sorted(results.glob("*_seed*.json")):
        record = json.loads(path.read_text())
        out[record["setting"]][record["seed"]] = record
    return out


def _per_problem(record: dict, metric: str) -> list[float]:
    p = record["problems"]
    if metric == "exact match (%)":
        return [100.0 * c for c in p["correct"]]
    if metric == "line accuracy (%)":
        return [100.0 * r / max(t, 1) for r, t in zip(p["lines_right"], p["lines"])]
    return [s / max(n, 1) for s, n in zip(p["nll_sum"], p["loss_tokens"])]  # NLL per token


def paired_interval(a: dict[int, dict], b: dict[int, dict], metric: str
                    ) -> tuple[float, float, float, int] | None:
    """(mean difference A - B, 2.5%, 97.5%, seeds) over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [[x - y for x, y in zip(_per_problem(a[s], metric), _per_problem(b[s], metric))]
             for s in seeds]
    return paired_bootstrap(diffs, BOOTSTRAP_DRAWS)


def write_tables(results: pathlib.Path, data_dir: pathlib.Path, settings: list[str]) -> str:
    records = _records(results)
    lines = ["| setting | seeds | exact match (%) | line accuracy (%) | NLL / token | "
             "NLL number tokens | NLL other tokens | trained loss tokens (x full) | "
             "step time s, median |", "|---|---|---|---|---|---|---|---|---|"]
    full_tokens = [r["compute"]["loss_tokens"] for r in records.get("full", {}).values()]
    for setting in settings:
        runs = list(records.get(setting, {}).values())
        if not runs:
            lines.append(f"| {setting} | 0 | not run yet | | | | | | |")
            continue
        e = [r["eval"] for r in runs]
        cells = [", ".join(str(r["seed"]) for r in runs),
                 gsm_grid.mean_sd([100.0 * x["accuracy"] for x in e], 1),
                 gsm_grid.mean_sd([100.0 * x["line_accuracy"] for x in e], 1),
                 gsm_grid.mean_sd([x["nll_per_token"] for x in e], 3),
                 gsm_grid.mean_sd([x["nll_per_number_token"] for x in e], 3),
                 gsm_grid.mean_sd([x["nll_per_other_token"] for x in e], 3)]
        compute = [r["compute"] for r in runs if r["compute"]]
        if compute:
            tokens = statistics.fmean(c["loss_tokens"] for c in compute)
            rel = f" ({tokens / statistics.fmean(full_tokens):.3f})" if full_tokens else ""
            cells += [f"{tokens:.0f}{rel}",
                      f"{statistics.median(c['step_seconds'] / c['steps'] for c in compute):.1f}"]
        else:
            cells += ["–", "–"]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences A - B (per problem, seeds both have), mean and 95% "
              "bootstrap interval:", "",
              "| A - B | seeds | exact match (pp) | line accuracy (pp) | NLL / token |",
              "|---|---|---|---|---|"]
    for a, b in COMPARISONS:
        cells = []
        for metric in ("exact match (%)", "line accuracy (%)", "NLL / token"):
            found = paired_interval(records.get(a, {}), records.get(b, {}), metric)
            if found is None:
                break
            mean, low, high, seeds = found
            digits = 3 if metric.startswith("NLL") else 1
            cells.append(f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]")
        if cells:
            lines.append(f"| {a} - {b} | {seeds} | " + " | ".join(cells) + " |")
    lines += ["", *mechanism_table(records, settings, data_dir)]
    text = "\n".join(lines) + "\n"
    gsm_grid.write_text_atomic(results / "tables.md", text)
    return text


def data_shares(data_dir: pathlib.Path) -> dict[str, float]:
    """Share of the training set's loss tokens per noise type: what full data trains on."""
    from q_tuning.sft.hf.assets import load_tokenizer
    from q_tuning.sft.data.dataset import load_sft_samples

    samples, _ = load_sft_samples(str(data_dir / "train.jsonl"), load_tokenizer(), 10**6)
    noise = [r["noise"] for r in _rows(data_dir / "train.jsonl")]
    tokens = collections.Counter()
    for kind, sample in zip(noise, samples, strict=True):
        tokens[kind] += int(sample.loss_mask[1:].sum())
    return {k: tokens[k] / sum(tokens.values()) for k in NOISE}


def mechanism_table(records: dict, settings: list[str], data_dir: pathlib.Path) -> list[str]:
    """Share of trained loss tokens per noise type, and where the noisy samples land."""
    out = ["Mechanism (mean over seeds): share of the trained loss tokens that came from each "
           "kind of training sample (the data holds 10% misaligned and 10% wrong-arithmetic "
           "samples), and the EU-plane quadrants of the noisy samples over all steps "
           "(Q1/Q2/Q3/Q4, kept in brackets).", "",
           "| setting | misaligned share | arithmetic share | misaligned: quadrants (kept) | "
           "arithmetic: quadrants (kept) |", "|---|---|---|---|---|"]
    if records.get("full"):
        shares = data_shares(data_dir)
        out.append(f"| full | {100 * shares['misaligned']:.1f}% | "
                   f"{100 * shares['arithmetic']:.1f}% | not scored | not scored |")
    for setting in settings:
        mechs = [r["mechanism"] for r in records.get(setting, {}).values() if r.get("mechanism")]
        if not mechs:
            continue
        shares = {k: statistics.fmean(m["trained_loss_tokens"][k] / max(
            sum(m["trained_loss_tokens"].values()), 1) for m in mechs) for k in NOISE}
        cells = [f"{100 * shares['misaligned']:.1f}%", f"{100 * shares['arithmetic']:.1f}%"]
        for kind in ("misaligned", "arithmetic"):
            total, kept = [0] * 5, [0] * 5
            for m in mechs:
                for cell in m["quadrants"].get(kind, {}).values():
                    total = [x + y for x, y in zip(total, cell["all"])]
                    kept = [x + y for x, y in zip(kept, cell["kept"])]
            cells.append("not scored" if not any(total[1:]) else " / ".join(
                f"{total[q] / len(mechs):.0f} ({kept[q] / len(mechs):.0f})" for q in (1, 2, 3, 4)))
        out.append(f"| {setting} | " + " | ".join(cells) + " |")
    return out
