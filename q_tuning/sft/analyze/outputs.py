"""What `q-tuning-analyze` writes: samples.jsonl, summary.json, the EU-plane figure and the
HTML report (module docstring of `q_tuning.sft.analyze.cli`).

Public API:
    OUTPUTS                                the file names, by kind
    record_ids(paths) -> {"file:line": id}
    sample_rows(samples, ids, stats, decision, config) -> list[dict]
    summarize(rows, batches, args, config, scoring) -> dict
    write_figure(path, rows, batches, config)
    write_outputs(out, tokenizer, samples, rows, batches, summary, picks, tokens, config)
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Optional, Sequence

from q_tuning._files import write_text_atomic
from q_tuning.config import QTuningConfig
from q_tuning.observe.report_html import write_html
from q_tuning.selection import QUADRANT_NAMES, keep_count

__all__ = ["OUTPUTS", "record_ids", "sample_rows", "summarize", "write_figure", "write_outputs"]

OUTPUTS = {"samples": "samples.jsonl", "figure": "eu_plane.png", "summary": "summary.json",
           "html": "report.html"}


def record_ids(paths: Sequence[str]) -> dict[str, Any]:
    """"file:line" -> the record's "id" (or "uid"), for the records that have one."""
    ids = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if isinstance(record, dict):
                    value = record.get("id", record.get("uid"))
                    if value is not None:
                        ids[f"{pathlib.Path(path)}:{lineno}"] = value
    return ids



def _kept_tokens(quadrant: int, kept: bool, targets: int, token_keep_ratio: float) -> int:
    if not kept:
        return 0
    return keep_count(token_keep_ratio, targets) if quadrant == 2 else targets


def _finite(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def sample_rows(samples, ids: dict, stats: dict, decision: dict, config: QTuningConfig
                ) -> list[dict]:
    rows = []
    for i, s in enumerate(samples):
        q, kept, targets = int(decision["quadrant"][i]), bool(decision["keep"][i]), \
            int(stats["targets"][i])
        rows.append({
            "id": ids.get(s.source, s.source), "source": s.source, "index": i,
            "ppl": _finite(float(stats["ppl"][i])), "entropy": _finite(float(stats["entropy"][i])),
            "quadrant": q, "quadrant_name": QUADRANT_NAMES.get(q, "unplaceable"), "kept": kept,
            "selection_batch": int(decision["batch"][i]),
            "entry_level": _finite(float(decision["entry_level"][i])),
            "num_tokens": int(s.tokens.numel()), "response_tokens": targets,
            "kept_tokens": _kept_tokens(q, kept, targets, config.token_keep_ratio),
        })
    return rows


def summarize(rows: list[dict], batches: list[dict], args, config: QTuningConfig,
              scoring: dict) -> dict:
    counts = {name: sum(r["quadrant"] == q for r in rows) for q, name in QUADRANT_NAMES.items()}
    summary = {
        "model": args.hf_checkpoint or args.load, "data": list(args.data_path),
        "num_samples": len(rows),
        "placed_samples": sum(counts.values()),
        "unplaceable_samples": sum(r["quadrant"] == 0 for r in rows),
        "quadrant_counts": counts,
        "kept_samples": sum(r["kept"] for r in rows),
        "response_tokens": sum(r["response_tokens"] for r in rows),
        "kept_tokens": sum(r["kept_tokens"] for r in rows),
        "selection_batch_size": args.selection_batch_size,
        "selection_batches": len(batches),
    }
    if len(batches) == 1:  # one batch: its level and thresholds are the data set's
        summary.update(level=batches[0].get("level"), thresholds=batches[0].get("thresholds"))
    summary["batches"] = batches
    summary["config"] = {"sample_keep_ratio": config.sample_keep_ratio,
                         "token_keep_ratio": config.token_keep_ratio,
                         "neighbor_lambda": config.neighbor_lambda,
                         "bisect_max_iter": config.bisect_max_iter,
                         "scoring_method": config.scoring_method, "seq_length": args.seq_length}
    summary["scoring"] = scoring
    return summary


def write_figure(path: pathlib.Path, rows: list[dict], batches: list[dict], config) -> None:
    from q_tuning.observe.plot import eu_plane_figure, save_png

    nan = float("nan")
    one = batches[0] if len(batches) == 1 else {}
    title = "Q-Tuning EU plane · " + (
        f"sample keep ratio {config.sample_keep_ratio:g}" if one else
        f"selection in {len(batches)} batches of {batches[0]['size']} (thresholds per batch)")
    figure = eu_plane_figure(
        [nan if r["ppl"] is None else r["ppl"] for r in rows],
        [nan if r["entropy"] is None else r["entropy"] for r in rows],
        [r["quadrant"] for r in rows], [r["kept"] for r in rows],
        thresholds=one.get("thresholds"), level=one.get("level"), title=title)
    save_png(figure, path)



def write_outputs(out: pathlib.Path, tokenizer, samples, rows, batches, summary, picks, tokens,
                   config) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / OUTPUTS["samples"], (json.dumps(r) + "\n" for r in rows))
    write_figure(out / OUTPUTS["figure"], rows, batches, config)
    summary["outputs"] = {k: str(out / v) for k, v in OUTPUTS.items()}
    write_text_atomic(out / OUTPUTS["summary"], [json.dumps(summary, indent=2) + "\n"])
    write_html(out / OUTPUTS["html"], tokenizer, samples, rows, summary, picks, tokens,
               figure=OUTPUTS["figure"])
    counts = ", ".join(f"{k} {v}" for k, v in summary["quadrant_counts"].items())
    print(f"q-tuning-analyze: {summary['num_samples']} samples ({counts}, "
          f"{summary['unplaceable_samples']} unplaceable); kept {summary['kept_samples']} "
          f"samples, {summary['kept_tokens']}/{summary['response_tokens']} response tokens; "
          f"wrote {', '.join(str(out / v) for v in OUTPUTS.values())}", flush=True)
