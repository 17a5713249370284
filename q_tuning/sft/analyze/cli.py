"""`q-tuning-analyze`: where a data set falls on the EU plane, and what Q-Tuning would prune.

    # one process (CPU or one GPU); an HF folder or a .gguf file
    q-tuning-analyze --hf-checkpoint path/to/model --data-path train.jsonl --output-dir analysis \\
        --q-tuning-sample-keep-ratio 0.25 --q-tuning-token-keep-ratio 0.5

    # tensor parallel (and data parallel: world size = TP x DP)
    torchrun --nproc-per-node 4 -m q_tuning.sft.analyze.cli --tensor-model-parallel-size 2 ...

    # a q-tuning-train checkpoint (its --hf-checkpoint gives the architecture and tokenizer)
    q-tuning-analyze --load runs/x/checkpoints --data-path train.jsonl --output-dir analysis

Every sample is scored with the model (the same no-grad pass as training, `score_samples`), in
passes of `--batch-size` samples per data-parallel replica, with progress on stderr. The
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

Bad input ends with one `q-tuning-analyze: error: ...` line and exit status 2. The scoring and
selection are in `q_tuning.sft.analyze.statistics`, the files in `q_tuning.sft.analyze.outputs`.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import time
from typing import Optional, Sequence

import torch

from q_tuning.config import CommandLineParser, QTuningConfig, add_q_tuning_args, positive_int
from q_tuning.observe.progress import Progress
from q_tuning.observe.report_html import pick_examples
from q_tuning.parallel import comm
from q_tuning.parallel.process_group import join_process_group, leave_process_group
from q_tuning.sft.analyze.statistics import example_tokens, score_dataset, select_in_batches
from q_tuning.sft.analyze.outputs import record_ids, sample_rows, summarize, write_outputs
from q_tuning.sft.runtime import quiet_expected_warnings, use_cuda

__all__ = ["build_parser", "main", "run"]

logger = logging.getLogger(__name__)


# --- arguments ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
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

def _model_source(args) -> dict:
    """hf path, tokenizer path, dtype and vocab padding; for --load also the checkpoint."""
    source = {"hf": args.hf_checkpoint, "tokenizer": args.tokenizer_path, "checkpoint": None,
              "dtype": torch.bfloat16 if args.bf16 else torch.float32,
              "make_vocab_size_divisible_by": args.make_vocab_size_divisible_by}
    if args.load is None:
        return source
    from q_tuning.sft.checkpoint.files import find_checkpoint, read_trainer_state

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

    from q_tuning.sft.hf import model as hf_model
    from q_tuning.sft.checkpoint.state import load_model_state, model_sharded_state

    hf_config = hf_model.read_hf_config(source["hf"])
    config = hf_model.transformer_config_from_hf(hf_config, tp=tp, params_dtype=source["dtype"],
                                                 use_cpu_initialization=not cuda)
    chunks = hf_model.build_gpt_model_chunks(
        hf_config, config=config,
        make_vocab_size_divisible_by=source["make_vocab_size_divisible_by"])
    if cuda:
        chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
    if source["checkpoint"] is None:
        with Progress(f"loading weights from {source['hf']}"):
            hf_model.load_hf_weights(chunks, source["hf"])
        return chunks
    # The model part of a trainer checkpoint (its optimizer and RNG states are not read).
    metadata = dict(source["trainer_state"]["sharded_state_dict_metadata"])
    with Progress(f"loading checkpoint {source['checkpoint']}"):
        loaded = dist_checkpointing.load(model_sharded_state(chunks, metadata),
                                         str(source["checkpoint"]))
    load_model_state(chunks, loaded)
    return chunks



# --- main -----------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    """Everything `main` does, given parsed arguments; returns the summary (on every rank)."""
    from megatron.core import parallel_state as ps

    config = QTuningConfig.from_args(args)
    cuda = use_cuda(args.device)
    created = join_process_group(cuda=cuda, timeout_minutes=30)
    if not comm.is_global_rank_zero():
        logging.getLogger("q_tuning").setLevel(logging.WARNING)  # one copy of the info lines
    initialized_here = False
    try:
        world, tp = comm.world_size(), args.tensor_model_parallel_size
        if world % tp:
            raise ValueError(f"--tensor-model-parallel-size {tp} does not divide the world size "
                             f"{world} (start with torchrun --nproc-per-node N, N a multiple "
                             "of it)")
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(tensor_model_parallel_size=tp)
            initialized_here = True
        return _analyze(args, config, tp, cuda)
    finally:
        if initialized_here:
            ps.destroy_model_parallel()
        leave_process_group(created)


def _analyze(args: argparse.Namespace, config: QTuningConfig, tp: int, cuda: bool) -> dict:
    """Collective: model, data, scores, selection, examples; rank 0 writes the files."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from q_tuning.sft.hf.assets import load_tokenizer
    from q_tuning.sft.data.dataset import load_sft_samples

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
    rows = sample_rows(samples, record_ids(args.data_path), stats, decision, config)
    scoring = {"seconds": seconds, "samples_per_second": len(samples) / max(seconds, 1e-9),
               "tensor_model_parallel_size": tp,
               "data_parallel_size": ps.get_data_parallel_world_size(),
               "device": "cuda" if cuda else "cpu"}
    summary = summarize(rows, batches, args, config, scoring)
    picks = pick_examples(rows, args.html_examples, args.seed)
    tokens = example_tokens(chunks, samples, picks, config, args.micro_batch_size)
    if comm.is_global_rank_zero():
        write_outputs(pathlib.Path(args.output_dir), tokenizer, samples, rows, batches,
                      summary, picks, tokens, config)
    comm.barrier()
    return summary


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
    quiet_expected_warnings(args.device)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run(args)
    except (ValueError, FileNotFoundError) as err:  # the user's input: no traceback
        print(f"q-tuning-analyze: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
