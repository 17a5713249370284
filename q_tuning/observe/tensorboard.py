"""Dashboard logging (TensorBoard, W&B: q_tuning.observe.writers) of Q-Tuning's per-step decision.

Public API:
    step_scalars(report) -> dict[str, float]     the scalars below, tagged q_tuning/<name>
    log_step(writer, report, decision=None, step=None, *, image_every=None) -> None
    tb_image_every(image_every=None) -> int
    IMAGE_EVERY_ENV

Call it from the rank that holds the writers after `QTuningPruner.prune`, with the report it
returned and `pruner.last_decision` (which holds the whole global batch's statistics, identical
on every rank, so nothing is gathered here); `writer=None` makes it a no-op, so every rank may
call it. Tags, all under `q_tuning/`:

    fraction/Q1 .. fraction/Q4, fraction/unplaceable   share of the step's scored samples
    count/Q1 .. count/Q4, kept_count/Q1 .. kept_count/Q4   samples per quadrant, scored and kept
    kept_samples, kept_sample_fraction, kept_tokens, kept_token_fraction, total_samples,
    total_tokens                                        what the gradient step trains on
    threshold/q2_ppl_floor, threshold/q2_entropy_ceiling, threshold/q4_ppl_ceiling,
    threshold/q4_entropy_floor, level                   the corners' bounds (q_tuning.report)
    scoring_seconds                                     the no-grad scoring pass
    eu_plane (image), log_ppl and entropy (histograms)  every `image_every` steps and at step 1

Images: each writer's `image_every` (TensorBoard: `$Q_TUNING_TB_IMAGE_EVERY`, else 10; W&B:
--wandb-eu-plane-every, default 0); 0 turns the image off.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from q_tuning.observe.env import env_number
from q_tuning.observe.plot import eu_plane_figure, figure_to_rgb
from q_tuning.observe.writers import TensorBoardWriter, Writers, as_writer
from q_tuning.report import StepReport

__all__ = ["IMAGE_EVERY_ENV", "log_step", "step_scalars", "tb_image_every"]

IMAGE_EVERY_ENV = "Q_TUNING_TB_IMAGE_EVERY"
DEFAULT_IMAGE_EVERY = 10
PREFIX = "q_tuning"


def step_scalars(report: StepReport) -> dict[str, float]:
    """The step's scalars, tagged `q_tuning/...` (the module doc's list): what every dashboard
    gets, from the trainer, the Megatron-LM adapter and the slime hook alike."""
    total = max(report.total_samples, 1)
    scalars = {f"fraction/{q}": count / total for q, count in report.quadrant_counts.items()}
    scalars["fraction/unplaceable"] = report.unplaceable_samples / total
    scalars.update({f"count/{q}": count for q, count in report.quadrant_counts.items()})
    scalars.update({f"kept_count/{q}": count for q, count in report.kept_quadrant_counts.items()})
    scalars.update({
        "kept_samples": report.kept_samples,
        "kept_sample_fraction": report.kept_samples / total,
        "kept_tokens": report.kept_tokens,
        "kept_token_fraction": report.kept_tokens / max(report.total_tokens, 1),
        "total_samples": report.total_samples,
        "total_tokens": report.total_tokens,
        "level": report.level,
        "scoring_seconds": report.scoring_seconds,
    })
    scalars.update({f"threshold/{name}": value
                    for name, value in dataclasses.asdict(report.thresholds).items()})
    return {f"{PREFIX}/{tag}": float(value) for tag, value in scalars.items()}


def log_step(writer, report: StepReport, decision: Any = None, step: int | None = None, *,
             image_every: int | None = None) -> None:
    """Write the step's scalars, and where a writer's `image_every` is due the EU-plane figure.

    writer: a `q_tuning.observe.writers.MetricWriter` or `Writers`, a
        `torch.utils.tensorboard.SummaryWriter`, the `wandb` module, or None to do nothing.
    report: the `StepReport` returned by `QTuningPruner.prune`.
    decision: `pruner.last_decision` (a `StepDecision`); None skips the image and histograms.
    step: the global step to log at; default `report.step`.
    image_every: for a SummaryWriter given as it is, overrides `$Q_TUNING_TB_IMAGE_EVERY`.
    """
    writers = _as_writers(writer, image_every)
    if not writers:
        return
    step = report.step if step is None else step
    writers.scalars(step_scalars(report), step)
    due = writers.image_writers(step)
    if decision is None or not due:
        return
    if not bool(torch.isfinite(decision.sample_ppl).any()):
        return  # a strategy without the scoring forward (random): nothing to place
    selection = decision.selection
    figure = eu_plane_figure(decision.sample_ppl, decision.sample_entropy, selection.quadrant,
                             selection.keep, thresholds=selection.thresholds,
                             level=selection.level, keep_ratio=selection.keep_ratio, step=step)
    rgb = figure_to_rgb(figure)
    placed = selection.placed
    for w in due:
        w.image(f"{PREFIX}/eu_plane", rgb, step)
        if bool(placed.any()):
            w.histogram(f"{PREFIX}/log_ppl", torch.log(decision.sample_ppl[placed]), step)
            w.histogram(f"{PREFIX}/entropy", decision.sample_entropy[placed], step)


def _as_writers(writer, image_every: int | None) -> Writers:
    if isinstance(writer, Writers):
        return writer
    if image_every is not None and hasattr(writer, "add_scalar"):
        return Writers([TensorBoardWriter(writer, image_every)])
    return Writers([as_writer(writer)])


def tb_image_every(image_every: int | None = None) -> int:
    """`image_every`, else `$Q_TUNING_TB_IMAGE_EVERY`, else 10 (ValueError naming the variable)."""
    if image_every is not None:
        return image_every
    return env_number(IMAGE_EVERY_ENV, DEFAULT_IMAGE_EVERY)
