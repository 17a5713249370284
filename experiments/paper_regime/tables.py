"""Tables of the paper-regime grid from its records (`records.py`), and the pilot's gate.

    write_tables(results, settings) -> str   `<results>/tables.md`: per-setting table and
                                              paired comparisons with bootstrap 95% intervals
    gate(records) -> Gate                     each benchmark's difference, full and random
                                              12.5%x50% against zero-shot (seed 1)

Per item: MMLU and qa_wikidata right (100) or wrong (0), the NI held-out NLL per token of the
item. A paired difference A - B takes the seeds both settings have (zero-shot: its one run
against every seed); the interval is `experiments.stats.paired_bootstrap` (seeds, then items).
Compute (x full): (3 x trained tokens + scored tokens) / (3 x full data's trained tokens): a
training token costs a forward and a backward (about 3 forwards), a scored token one forward.
"""

from __future__ import annotations

import pathlib
import statistics
from typing import NamedTuple

from experiments.gsm import gsm_grid

from experiments.paper_regime.records import read_records
from experiments.stats import paired_bootstrap

__all__ = ["COMPARISONS", "GATE_BENCHMARKS", "METRICS", "Gate", "gate", "paired",
           "write_tables"]

METRICS = {"mmlu": ("MMLU (pp)", 1), "qa": ("qa_wikidata exact (pp)", 1),
           "nll": ("NI held-out NLL / token", 3)}
# The held-out NLL is of the training tasks' own distribution: it moves with any SFT, so the gate
# asks the benchmarks SFT was not trained for.
GATE_BENCHMARKS = ("mmlu", "qa")
COMPARISONS = [
    ("qtuning_12.5x50", "random_12.5x50"), ("qtuning_25x70", "random_25x70"),
    ("qtuning_12.5x50_official", "random_12.5x50"), ("qtuning_25x70_official", "random_25x70"),
    ("qtuning_12.5x50", "full"), ("qtuning_25x70", "full"),
    ("qtuning_12.5x50", "triage_12.5x100"),  # token pruning's own effect
    ("random_12.5x50", "full"), ("random_25x70", "full"), ("infobatch", "full"),
    ("full", "zero_shot"), ("random_12.5x50", "zero_shot")]


def per_item(record: dict, metric: str) -> list[float]:
    items = record["items"]
    if metric == "mmlu":
        return [100.0 * c for c in items["mmlu_correct"]]
    if metric == "qa":
        return [100.0 * c for c in items["qa_exact"]]
    return [s / max(n, 1) for s, n in zip(items["nll_sum"], items["loss_tokens"])]


def paired(a: dict[int, dict], b: dict[int, dict], metric: str):
    """PairedInterval of A - B over the seeds both have (a one-run side pairs with every seed
    of the other), or None."""
    if len(a) == 1 and len(b) > 1:
        a = {seed: next(iter(a.values())) for seed in b}
    if len(b) == 1 and len(a) > 1:
        b = {seed: next(iter(b.values())) for seed in a}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = []
    for s in seeds:
        x, y = per_item(a[s], metric), per_item(b[s], metric)
        if len(x) != len(y):
            raise ValueError(f"{a[s]['setting']} seed {s} and {b[s]['setting']}: {len(x)} and "
                             f"{len(y)} items of {metric} (evaluated on different data)")
        diffs.append([p - q for p, q in zip(x, y)])
    return paired_bootstrap(diffs)


def _cell(found, digits: int) -> str:
    return f"{found.mean:+.{digits}f} [{found.low:+.{digits}f}, {found.high:+.{digits}f}]"


class Gate(NamedTuple):
    measurable: bool | None  # None: the pilot's runs are not all recorded
    text: str


def gate(records: dict[str, dict[int, dict]]) -> Gate:
    zero = records.get("zero_shot", {})
    lines = ["Pilot gate (seed 1): difference against zero-shot, mean and 95% bootstrap interval",
             "", "| setting - zero_shot | " + " | ".join(METRICS[m][0] for m in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    moved, complete = [], bool(zero)
    for setting in ("full", "random_12.5x50"):
        runs = {s: r for s, r in records.get(setting, {}).items() if s == 1}
        if not runs or not zero:
            complete = False
            lines.append(f"| {setting} | not run yet |" + " |" * (len(METRICS) - 1))
            continue
        cells = []
        for metric in METRICS:
            found = paired(runs, zero, metric)
            cells.append(_cell(found, METRICS[metric][1]))
            if metric in GATE_BENCHMARKS and (found.low > 0 or found.high < 0):
                moved.append(f"{setting} on {metric}")
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    if not complete:
        verdict, measurable = "Gate: incomplete (the pilot's runs are not all recorded).", None
    elif moved:
        verdict, measurable = f"Gate: measurable ({', '.join(moved)}): run the grid.", True
    else:
        verdict, measurable = ("Gate: unmeasurable: neither full nor random moves MMLU or "
                               "qa_wikidata beyond its 95% interval; stop here."), False
    return Gate(measurable, "\n".join(lines + ["", verdict]) + "\n")


def _row(setting: str, runs: list[dict], full: list[dict]) -> str:
    if not runs:
        return f"| {setting} | 0 | not run yet |" + " |" * 6
    e = [r["eval"] for r in runs]
    cells = [", ".join(str(r["seed"]) for r in runs),
             gsm_grid.mean_sd([100.0 * x["mmlu"]["accuracy"] for x in e], 1),
             gsm_grid.mean_sd([100.0 * x["qa-exact"]["accuracy"] for x in e], 1),
             gsm_grid.mean_sd([100.0 * x["qa-exact"]["contains"] for x in e], 1),
             gsm_grid.mean_sd([x["nll"]["nll_per_token"] for x in e], 3)]
    compute = [r["compute"] for r in runs if r["compute"]]
    full_compute = [r["compute"] for r in full if r["compute"]]
    if compute and full_compute:
        def mean(key, rows):
            return statistics.fmean(c[key] for c in rows)
        base = 3 * mean("trained_tokens", full_compute)
        cells += [f"{mean('loss_tokens', compute) / mean('loss_tokens', full_compute):.3f}",
                  f"{(3 * mean('trained_tokens', compute) + mean('scored_tokens', compute)) / base:.3f}",
                  f"{statistics.median(r['train_seconds'] for r in runs):.0f}"]
    else:
        cells += ["–", "–", f"{statistics.median(r['train_seconds'] for r in runs):.0f}"]
    return f"| {setting} | " + " | ".join(cells) + " |"


def write_tables(results: pathlib.Path, settings: list[str]) -> str:
    records = read_records(results)
    full = list(records.get("full", {}).values())
    lines = ["| setting | seeds | MMLU (%) | qa_wikidata exact (%) | qa_wikidata contains (%) | "
             "NI held-out NLL / token | trained loss tokens (x full) | compute (x full) | "
             "training s, median |", "|---|" + "---|" * 8]
    lines += [_row(s, list(records.get(s, {}).values()), full) for s in settings]
    lines += ["", "Paired differences A - B (per item, seeds both have), mean and 95% bootstrap "
              "interval:", "", "| A - B | seeds | " + " | ".join(METRICS[m][0] for m in METRICS)
              + " |", "|---|---|" + "---|" * len(METRICS)]
    for a, b in COMPARISONS:
        found = {m: paired(records.get(a, {}), records.get(b, {}), m) for m in METRICS}
        if all(found.values()):
            seeds = found["mmlu"].seeds
            lines.append(f"| {a} - {b} | {seeds} | " + " | ".join(
                _cell(found[m], METRICS[m][1]) for m in METRICS) + " |")
    lines += ["", gate(records).text]
    text = "\n".join(lines)
    gsm_grid.write_text_atomic(results / "tables.md", text)
    return text
