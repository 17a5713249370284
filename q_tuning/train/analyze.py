"""`q-tuning-analyze`: where a data set falls on the EU plane, and what Q-Tuning would prune.

    # one process (CPU or one GPU); an HF folder or a .gguf file
    q-tuning-analyze --hf-checkpoint path/to/model --data-path train.jsonl --output-dir analysis \\
        --q-tuning-sample-keep-ratio 0.25 --q-tuning-token-keep-ratio 0.5

    # tensor parallel (and data parallel: world size = TP x DP)
    torchrun --nproc-per-node 4 -m q_tuning.train.analyze --tensor-model-parallel-size 2 ...

    # a q-tuning-train checkpoint (its --hf-checkpoint gives the architecture and tokenizer)
    q-tuning-analyze --load runs/x/checkpoints --data-path train.jsonl --output-dir analysis

Every sample is scored with the model (the same no-grad pass as training, `score_samples`), in
passes of `--batch-size` samples per data-parallel replica, with a progress line (samples/s). The
selection (`select_samples`) is then applied to the whole data set as one batch, or, with
`--selection-batch-size B`, to consecutive batches of B samples in file order (as training steps
would see them, minus the shuffling), each with its own thresholds. Outputs, in --output-dir:

    samples.jsonl  one row per sample: id (the record's "id", else "file:line"), source, index,
                   ppl, entropy (null when unplaceable), quadrant (1-4, 0 = unplaceable),
                   quadrant_name, kept, selection_batch, entry_level, num_tokens,
                   response_tokens (scored targets), kept_tokens (after token pruning)
    eu_plane.png   the EU-plane figure (threshold lines when the selection is one batch)
    summary.json   counts per quadrant, kept samples and tokens, level and thresholds (per
                   selection batch), the flags
    report.html    a sample of Q2 responses with their pruned tokens struck through, and Q1 / Q3 /
                   Q4 examples side by side, for judging the decisions by eye

Bad input ends with one `q-tuning-analyze: error: ...` line and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import pathlib
import sys
import time
import warnings
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from q_tuning._files import write_text_atomic
from q_tuning.config import QTuningConfig, add_q_tuning_args, positive_int
from q_tuning.parallel.process_group import join_process_group
from q_tuning.observe.report_html import pick_examples, write_html
from q_tuning.report import Thresholds
from q_tuning.selection import (QUADRANT_NAMES, keep_count, sample_ppl_entropy_from_tokens,
                                select_samples)

__all__ = ["build_parser", "main", "run"]

logger = logging.getLogger(__name__)

OUTPUTS = {"samples": "samples.jsonl", "figure": "eu_plane.png", "summary": "summary.json",
           "html": "report.html"}


# --- arguments ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="q-tuning-analyze", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Score a JSONL data set with a model, apply Q-Tuning's selection and write "
                    "per-sample statistics, the EU-plane figure, a summary and an HTML report.")
    g = parser.add_argument_group("model")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-checkpoint", help="HF model folder (safetensors) or a .gguf file")
    src.add_argument("--load", help="a q-tuning-train checkpoint folder (--save of a run, or one "
                                    "of its iter_* folders)")
    g.add_argument("--tokenizer-path", default=None,
                   help="tokenizer folder or .gguf (default: the model's, or the run's)")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 weights (statistics are computed in fp32 either way); with --load, "
                        "the run's own precision is used")
    g.add_argument("--make-vocab-size-divisible-by", type=positive_int, default=1,
                   help="vocabulary padding multiple (x TP); 1 keeps the entropy that of the HF "
                        "model")
    g.add_argument("--tensor-model-parallel-size", type=positive_int, default=1,
                   help="TP size; run under torchrun with a world size divisible by it (the "
                        "rest is data parallel)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")

    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", required=True,
                   help="JSONL file(s): chat 'messages' or 'prompt'/'response' per line")
    g.add_argument("--seq-length", type=positive_int, default=2048,
                   help="longer samples are truncated (as in training)")
    g.add_argument("--batch-size", type=positive_int, default=32,
                   help="samples scored per pass and data-parallel replica")
    g.add_argument("--micro-batch-size", type=positive_int, default=None,
                   help="rows per forward micro-batch (default: chosen from memory, as the "
                        "trainer's scoring pass)")
    g.add_argument("--selection-batch-size", type=positive_int, default=None,
                   help="apply the selection to consecutive batches of this many samples "
                        "(e.g. the training global batch size); default: the whole data set as "
                        "one batch")

    g = parser.add_argument_group("output")
    g.add_argument("--output-dir", default="q_tuning_analysis")
    g.add_argument("--html-examples", type=positive_int, default=4,
                   help="examples per quadrant in report.html")
    g.add_argument("--seed", type=int, default=0, help="which examples report.html shows")
    add_q_tuning_args(parser)
    return parser


# --- setup ----------------------------------------------------------------------------------------

def _init_distributed(device: str) -> tuple[bool, bool]:
    """(whether this call created the process group, whether CUDA is used). torchrun's
    environment is used when present, an existing group as it is, else a one-process group."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu)")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return join_process_group(cuda=cuda, timeout_minutes=30), cuda


def _quiet_expected_warnings(device: str) -> None:
    """megatron-core's pure-PyTorch fallbacks are the plan on CPU; call before importing it."""
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        warnings.filterwarnings("ignore", message="Apex is not installed")


def _model_source(args) -> dict:
    """hf path, tokenizer path, dtype and vocab padding; for --load also the checkpoint."""
    source = {"hf": args.hf_checkpoint, "tokenizer": args.tokenizer_path, "checkpoint": None,
              "dtype": torch.bfloat16 if args.bf16 else torch.float32,
              "make_vocab_size_divisible_by": args.make_vocab_size_divisible_by}
    if args.load is None:
        return source
    from q_tuning.train.checkpointing import find_checkpoint, read_trainer_state

    path = find_checkpoint(args.load)
    if path is None:
        raise ValueError(f"--load {args.load}: no q-tuning-train checkpoint there (no "
                         "metadata.json and no latest_checkpointed_iteration.txt)")
    state = read_trainer_state(path)
    run_args = state.get("args") or {}
    if not run_args.get("hf_checkpoint"):
        raise ValueError(f"--load {path}: the checkpoint does not record the run's "
                         "--hf-checkpoint, which gives the architecture")
    source.update(hf=run_args["hf_checkpoint"], checkpoint=path, trainer_state=state,
                  tokenizer=args.tokenizer_path or run_args.get("tokenizer_path"),
                  dtype=torch.bfloat16 if run_args.get("bf16") else torch.float32,
                  make_vocab_size_divisible_by=run_args.get("make_vocab_size_divisible_by", 1))
    return source


def _build_model(source: dict, tp: int, cuda: bool) -> list:
    from megatron.core import dist_checkpointing

    from q_tuning.train import model as hf_model

    hf_config = hf_model.read_hf_config(source["hf"])
    config = hf_model.transformer_config_from_hf(hf_config, tp=tp, params_dtype=source["dtype"],
                                                 use_cpu_initialization=not cuda)
    chunks = hf_model.build_gpt_model_chunks(
        hf_config, config=config,
        make_vocab_size_divisible_by=source["make_vocab_size_divisible_by"])
    if cuda:
        chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
    if source["checkpoint"] is None:
        hf_model.load_hf_weights(chunks, source["hf"])
        return chunks
    # The trainer saves each bare GPTModel's sharded_state_dict under "model" (checkpointing.py).
    metadata = dict(source["trainer_state"]["sharded_state_dict_metadata"])
    loaded = dist_checkpointing.load({"model": chunks[0].sharded_state_dict(metadata=metadata)},
                                     str(source["checkpoint"]))
    chunks[0].load_state_dict(loaded["model"], strict=True)
    return chunks


def _record_ids(paths: Sequence[str]) -> dict[str, Any]:
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


# --- scoring --------------------------------------------------------------------------------------

class _Progress:
    """`scored 320/1000 samples (41.2 samples/s, ETA 16 s)` on stderr from global rank 0: one
    line rewritten in place on a terminal, a line every 10 s (and at the end) otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.start = self.last = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        final = done >= self.total
        if not self.enabled or not (self.tty or final or now - self.last >= 10.0):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        line = (f"scored {done}/{self.total} samples ({rate:.1f} samples/s, "
                f"{'done' if final else f'ETA {eta:.0f} s'})")
        print(("\r" + line) if self.tty else line, end="\n" if final or not self.tty else "",
              file=sys.stderr, flush=True)


def score_dataset(chunks, samples, *, batch_size: int, micro_batch_size: Optional[int],
                  method: str, dp_rank: int, dp_size: int, dp_group,
                  entropy_scope: str = "response") -> dict[str, torch.Tensor]:
    """Per-sample `ppl`, `entropy` (float64, NaN when unplaceable) and `targets` (int64) of every
    sample, on every rank. Pass b scores samples [b*B*dp, (b+1)*B*dp); replica r takes its r-th
    block of B; the results are all-gathered over DP at the end."""
    from q_tuning.parallel.scoring import score_samples, target_masks

    n = len(samples)
    stride = batch_size * dp_size
    progress = _Progress(n, dist.get_rank() == 0)
    mine: list[tuple[int, float, float, int]] = []
    for start in range(0, n, stride):
        lo = min(n, start + dp_rank * batch_size)
        part = samples[lo:min(n, lo + batch_size)]
        if part:
            masks = [s.loss_mask for s in part]
            scores = score_samples(chunks, [s.tokens for s in part],
                                   masks if entropy_scope == "response"
                                   else [torch.ones_like(m) for m in masks],
                                   rows_per_micro_batch=micro_batch_size, method=method)
            loss = target_masks(masks, scores.target_mask.shape[1])
            ppl, ent = sample_ppl_entropy_from_tokens(scores.nll, scores.entropy, loss,
                                                      entropy_mask=scores.target_mask)
            targets = loss.sum(dim=1)
            mine += [(lo + i, float(ppl[i]), float(ent[i]), int(targets[i]))
                     for i in range(len(part))]
        progress.update(min(n, start + stride))
    parts = [mine]
    if dp_size > 1:
        parts = [None] * dp_size
        dist.all_gather_object(parts, mine, group=dp_group)
    rows = sorted(r for p in parts for r in p)
    assert [r[0] for r in rows] == list(range(n)), "every sample is scored exactly once"
    return {"ppl": torch.tensor([r[1] for r in rows], dtype=torch.float64),
            "entropy": torch.tensor([r[2] for r in rows], dtype=torch.float64),
            "targets": torch.tensor([r[3] for r in rows], dtype=torch.int64)}


# --- selection ------------------------------------------------------------------------------------

def select_in_batches(ppl: torch.Tensor, entropy: torch.Tensor, config: QTuningConfig,
                      batch_size: Optional[int]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """`select_samples` on consecutive batches of `batch_size` samples (None: one batch).

    Returns per-sample `keep`, `quadrant`, `entry_level`, `batch`, and one summary per batch.
    A batch in which no sample can be placed keeps nothing (its summary says so).
    """
    n = ppl.numel()
    batch_size = batch_size or n
    out = {"keep": torch.zeros(n, dtype=torch.bool), "quadrant": torch.zeros(n, dtype=torch.int64),
           "entry_level": torch.full((n,), float("nan"), dtype=torch.float64),
           "batch": torch.arange(n) // batch_size}
    batches = []
    for b, start in enumerate(range(0, n, batch_size)):
        part = slice(start, min(n, start + batch_size))
        info = {"batch": b, "first_index": start, "size": part.stop - start}
        try:
            sel = select_samples(ppl[part], entropy[part], config.sample_keep_ratio,
                                 config.bisect_max_iter, step=b + 1, rule=config.selection)
        except ValueError as err:  # nothing placeable in this batch
            batches.append({**info, "error": str(err), "kept_samples": 0})
            continue
        out["keep"][part], out["quadrant"][part] = sel.keep, sel.quadrant
        out["entry_level"][part] = sel.entry_level
        batches.append({**info, "level": sel.level,
                        "thresholds": dataclasses.asdict(
                            Thresholds.from_quantiles(sel.thresholds)),
                        "quadrant_counts": sel.quadrant_counts(), "kept_samples": sel.target_count,
                        "unplaceable_samples": sel.num_unplaceable})
    return out, batches


def _kept_tokens(quadrant: int, kept: bool, targets: int, token_keep_ratio: float) -> int:
    if not kept:
        return 0
    return keep_count(token_keep_ratio, targets) if quadrant == 2 else targets


# --- outputs --------------------------------------------------------------------------------------

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


# --- the HTML report's token statistics ----------------------------------------------------------

def example_tokens(chunks, samples, picks: dict[int, list[int]], config: QTuningConfig,
                   micro_batch_size: Optional[int]) -> dict[int, dict]:
    """Per picked sample: per-token nll, target mask and (Q2) the pruned positions.
    Collective (every rank scores the picked samples again: a few dozen)."""
    from q_tuning.parallel.scoring import score_samples
    from q_tuning.token_pruning import token_keep_mask

    chosen = sorted(i for idx in picks.values() for i in idx)
    if not chosen:
        return {}
    scores = score_samples(chunks, [samples[i].tokens for i in chosen],
                           [samples[i].loss_mask for i in chosen],
                           rows_per_micro_batch=micro_batch_size, method=config.scoring_method)
    keep = token_keep_mask(scores.nll, scores.target_mask, config.token_keep_ratio,
                           config.neighbor_lambda)
    q2 = set(picks[2])
    out = {}
    for row, i in enumerate(chosen):
        length = samples[i].tokens.numel()
        target = scores.target_mask[row, :length]
        pruned = target & ~keep[row, :length] if i in q2 else torch.zeros_like(target)
        out[i] = {"nll": scores.nll[row, :length].tolist(), "target": target.tolist(),
                  "pruned": pruned.tolist()}
    return out


# --- main -----------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    """Everything `main` does, given parsed arguments; returns the summary (on every rank)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from q_tuning.train.assets import load_tokenizer
    from q_tuning.train.data import load_sft_samples

    config = QTuningConfig.from_args(args)
    created, cuda = _init_distributed(args.device)
    if dist.get_rank() != 0:
        logging.getLogger("q_tuning").setLevel(logging.WARNING)  # one copy of the info lines
    initialized_here = False
    try:
        world, tp = dist.get_world_size(), args.tensor_model_parallel_size
        if world % tp:
            raise ValueError(f"--tensor-model-parallel-size {tp} does not divide the world size "
                             f"{world} (start with torchrun --nproc-per-node N, N a multiple "
                             "of it)")
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(tensor_model_parallel_size=tp)
            initialized_here = True
        model_parallel_cuda_manual_seed(args.seed)
        source = _model_source(args)
        chunks = _build_model(source, tp, cuda)
        tokenizer = load_tokenizer(source["tokenizer"] or source["hf"])
        samples, _ = load_sft_samples(args.data_path, tokenizer, args.seq_length)

        start = time.perf_counter()
        stats = score_dataset(chunks, samples, batch_size=args.batch_size,
                              micro_batch_size=args.micro_batch_size,
                              method=config.scoring_method, dp_rank=ps.get_data_parallel_rank(),
                              dp_size=ps.get_data_parallel_world_size(),
                              dp_group=ps.get_data_parallel_group(),
                              entropy_scope=config.entropy_scope)
        seconds = time.perf_counter() - start
        decision, batches = select_in_batches(stats["ppl"], stats["entropy"], config,
                                              args.selection_batch_size)
        rows = sample_rows(samples, _record_ids(args.data_path), stats, decision, config)
        scoring = {"seconds": seconds, "samples_per_second": len(samples) / max(seconds, 1e-9),
                   "tensor_model_parallel_size": tp,
                   "data_parallel_size": ps.get_data_parallel_world_size(),
                   "device": "cuda" if cuda else "cpu"}
        summary = summarize(rows, batches, args, config, scoring)
        picks = pick_examples(rows, args.html_examples, args.seed)
        tokens = example_tokens(chunks, samples, picks, config, args.micro_batch_size)
        if dist.get_rank() == 0:
            _write_outputs(pathlib.Path(args.output_dir), tokenizer, samples, rows, batches,
                           summary, picks, tokens, config)
        dist.barrier()
        return summary
    finally:
        if initialized_here:
            ps.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


def _write_outputs(out: pathlib.Path, tokenizer, samples, rows, batches, summary, picks, tokens,
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


# Settings q-tuning-analyze would otherwise accept and ignore: (field, why), checked at parse time.
IGNORED_SETTINGS = (
    ("strategy", "q-tuning-analyze shows the EU-plane rule only"),
    ("batch_policy", "q-tuning-analyze selects in --selection-batch-size batches; there is no "
                     "refill"),
    ("scoring_micro_batch_size", "use --micro-batch-size (rows per forward micro-batch)"),
    ("token_budget", "q-tuning-analyze shows per-sample token pruning only"),
)


def unsupported_settings(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(flag, why) for every Q-Tuning setting given a non-default value that analysis ignores."""
    defaults = QTuningConfig()
    return [("--q-tuning-" + field.replace("_", "-"), why) for field, why in IGNORED_SETTINGS
            if getattr(args, "q_tuning_" + field) != getattr(defaults, field)]


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, why in unsupported_settings(args):
        parser.error(f"{flag}: {why}")
    _quiet_expected_warnings(args.device)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run(args)
    except (ValueError, FileNotFoundError) as err:  # the user's input: no traceback
        print(f"q-tuning-analyze: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
