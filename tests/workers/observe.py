"""Rank workers for tests/distributed/test_observe.py (module level: spawned ranks import them)."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib

from tests.harness.fixtures import MODEL, dp_share, global_batch
from tests.harness.megatron import build_tiny_gpt, parallel_world

STEPS = 3
BATCH = 12


def hooks_worker(rank, world_size, out_dir: str, tb_dir: str, plot_every: int,
                 image_every: int):
    """DP=2: three pruning steps with the built-in hooks loaded by name (configured through the
    environment) and TensorBoard logging on rank 0. Returns, per step, the pruner's global
    decision and report, and what the hooks' own gather recomputes."""
    os.environ["Q_TUNING_OBSERVE_DIR"] = out_dir
    os.environ["Q_TUNING_EU_PLANE_EVERY"] = str(plot_every)
    from q_tuning import QTuningConfig, QTuningPruner
    from q_tuning.observe import gather_rollout_stats, load_hooks, log_step
    from q_tuning.observe.hooks import reproduce_selection

    writer = None
    with parallel_world(), contextlib.ExitStack() as cleanup:
        from megatron.core import parallel_state as ps

        chunks = build_tiny_gpt(**MODEL)
        hooks = load_hooks(["q_tuning.observe.hooks.eu_plane_png",
                            "q_tuning.observe.hooks:jsonl_dump"])
        config = QTuningConfig(sample_keep_ratio=0.5, token_keep_ratio=0.6)
        pruner = QTuningPruner(config, log=False, hooks=hooks)
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=tb_dir)
            cleanup.callback(writer.close)  # before the parallel world ends
        steps = []
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        for step in range(1, STEPS + 1):
            local = dp_share(global_batch(BATCH, seed=step), dp_rank, dp_size)
            _, report = pruner.prune(chunks, local, rollout_id=step)
            log_step(writer, report, pruner.last_decision, step, image_every=image_every)
            d = pruner.last_decision
            recomputed = reproduce_selection(gather_rollout_stats(pruner.rollout_data(local)),
                                             config)
            steps.append({"report": report.to_json(), "ppl": d.sample_ppl.tolist(),
                          "ent": d.sample_entropy.tolist(),
                          "quadrant": d.selection.quadrant.tolist(),
                          "keep": d.selection.keep.tolist(), "level": d.selection.level,
                          "thresholds": list(d.selection.thresholds),
                          "recomputed": (recomputed.level, list(recomputed.thresholds),
                                         recomputed.keep.tolist())})
        return steps


def observe_worker(rank, world_size, out_dir: str, tb_dir: str, plot_every: int,
                   image_every: int, analyze_argvs: list[list[str]]):
    """`hooks_worker`, then `q-tuning-analyze` once per argv in the same process group (as under
    torchrun): one spawn and one set of imports for all the distributed checks."""
    from q_tuning.sft.analyze import cli as analyze

    steps = hooks_worker(rank, world_size, out_dir, tb_dir, plot_every, image_every)
    summaries = []
    for argv in analyze_argvs:
        analyze.main(argv)  # global rank 0 writes; main returns after a barrier
        out = pathlib.Path(analyze.build_parser().parse_args(argv).output_dir)
        summaries.append(json.loads((out / "summary.json").read_text()))
    return {"steps": steps, "summaries": summaries}
