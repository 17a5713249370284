"""Seeing what Q-Tuning decides: postprocess hooks, the EU-plane figure, TensorBoard and W&B;
and the progress of long waits.

Public API:
    load_hooks(paths) -> list[callable]          resolve --rollout-data-postprocess-path names
    eu_plane_png, jsonl_dump                     built-in hooks (q_tuning.observe.hooks.*)
    EUPlanePlot, JsonlDump                       their classes, for other settings
    gather_rollout_stats(rollout_data) -> dict   the global batch's per-sample scalars (collective)
    eu_plane_figure(ppl, entropy, quadrant, kept, ...) -> matplotlib Figure
    log_step(writer, report, decision, step)     dashboard scalars and the EU-plane image
    step_scalars(report) -> dict[str, float]     those scalars (q_tuning/<tag>)
    Writers, TensorBoardWriter, WandbWriter      the dashboards behind one interface (writers.py)
    Progress(what, total=None, ...)              count / rate / ETA of a long wait (progress.py)

The offline counterpart is `q-tuning-analyze` (q_tuning/sft/analyze/cli.py). The hook contract is in
docs/hooks.md. matplotlib is imported only when a figure is drawn.
"""

from q_tuning.observe.hooks import (EUPlanePlot, JsonlDump, eu_plane_png, gather_rollout_stats,
                                    jsonl_dump, load_hooks)
from q_tuning.observe.plot import eu_plane_figure
from q_tuning.observe.progress import Progress
from q_tuning.observe.tensorboard import log_step, step_scalars
from q_tuning.observe.writers import TensorBoardWriter, WandbWriter, Writers

__all__ = ["EUPlanePlot", "JsonlDump", "Progress", "TensorBoardWriter", "WandbWriter", "Writers",
           "eu_plane_figure", "eu_plane_png", "gather_rollout_stats", "jsonl_dump", "load_hooks",
           "log_step", "step_scalars"]
