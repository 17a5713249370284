"""TensorBoard logging of Q-Tuning's per-step decision.

Public API:
    log_step(writer, report, decision=None, step=None, *, image_every=None) -> None
    IMAGE_EVERY_ENV

Call it from global rank 0 after `QTuningPruner.prune`, with the report it returned and
`pruner.last_decision` (which holds the whole global batch's statistics, so nothing is gathered
here); `writer=None` makes it a no-op, so every rank may call it. Tags, all under `q_tuning/`:

    fraction/Q1 .. fraction/Q4, fraction/unplaceable   share of the step's scored samples
    kept_samples, kept_sample_fraction, kept_tokens, kept_token_fraction, total_samples,
    total_tokens                                        what the gradient step trains on
    threshold/q2_ppl_floor, threshold/q2_entropy_ceiling, threshold/q4_ppl_ceiling,
    threshold/q4_entropy_floor, level                   the corners' bounds (q_tuning.report)
    scoring_seconds                                     the no-grad scoring pass
    eu_plane (image), log_ppl and entropy (histograms)  every `image_every` steps and at step 1

`image_every`: default `$Q_TUNING_TB_IMAGE_EVERY`, else 10; 0 turns the image off.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from q_tuning.observe.plot import eu_plane_figure, figure_to_rgb
from q_tuning.report import StepReport

__all__ = ["IMAGE_EVERY_ENV", "log_step"]

IMAGE_EVERY_ENV = "Q_TUNING_TB_IMAGE_EVERY"
DEFAULT_IMAGE_EVERY = 10
PREFIX = "q_tuning"


def log_step(writer, report: StepReport, decision: Any = None, step: int | None = None, *,
             image_every: int | None = None) -> None:
    """Write the step's scalars, and every `image_every` steps the EU-plane figure.

    writer: a `torch.utils.tensorboard.SummaryWriter` (or anything with `add_scalar`,
        `add_image`, `add_histogram`), or None to do nothing.
    report: the `StepReport` returned by `QTuningPruner.prune`.
    decision: `pruner.last_decision` (a `StepDecision`); None skips the image and histograms.
    step: the global step to log at; default `report.step`.
    """
    if writer is None:
        return
    step = report.step if step is None else step
    total = max(report.total_samples, 1)
    scalars = {f"fraction/{q}": count / total for q, count in report.quadrant_counts.items()}
    scalars["fraction/unplaceable"] = report.unplaceable_samples / total
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
    for tag, value in scalars.items():
        writer.add_scalar(f"{PREFIX}/{tag}", value, step)

    every = _image_every(image_every)
    if decision is None or not every or not (step == 1 or step % every == 0):
        return
    if not bool(torch.isfinite(decision.sample_ppl).any()):
        return  # a strategy without the scoring forward (random): nothing to place
    selection = decision.selection
    figure = eu_plane_figure(decision.sample_ppl, decision.sample_entropy, selection.quadrant,
                             selection.keep, thresholds=selection.thresholds,
                             level=selection.level, keep_ratio=selection.keep_ratio, step=step)
    writer.add_image(f"{PREFIX}/eu_plane", figure_to_rgb(figure), step, dataformats="HWC")
    placed = selection.placed
    if bool(placed.any()):
        writer.add_histogram(f"{PREFIX}/log_ppl", torch.log(decision.sample_ppl[placed]), step)
        writer.add_histogram(f"{PREFIX}/entropy", decision.sample_entropy[placed], step)


def _image_every(image_every: int | None) -> int:
    if image_every is not None:
        return image_every
    text = os.environ.get(IMAGE_EVERY_ENV, "")
    if not text:
        return DEFAULT_IMAGE_EVERY
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"environment variable {IMAGE_EVERY_ENV} must be an integer >= 0, "
                         f"got {text!r}")
    return value
