"""What one Q-Tuning step decided, as a typed object; its JSON form and its log lines.

Public API:
    StepReport, Thresholds, StageSeconds
    format_report(report) -> str

`StepReport.to_json()` is the one place the report becomes a dict (metrics.jsonl, TensorBoard,
hooks); code inside the package reads attributes.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

__all__ = ["StageSeconds", "StepReport", "Thresholds", "format_report"]


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The corners' bounds at the step's level, named by what they bound (at a level above 0.5
    the PPL floor of Q2 can lie below the PPL ceiling of Q4: the corners overlap)."""

    q2_ppl_floor: float  # Q2: PPL >= this
    q2_entropy_ceiling: float  # Q2: entropy <= this
    q4_ppl_ceiling: float  # Q4: PPL <= this
    q4_entropy_floor: float  # Q4: entropy >= this

    @classmethod
    def from_quantiles(cls, quantiles: tuple[float, float, float, float]) -> "Thresholds":
        """From `SampleSelection.thresholds` = (Q_a(PPL), Q_{1-a}(PPL), Q_a(Ent), Q_{1-a}(Ent))."""
        ppl_low, ppl_high, ent_low, ent_high = (float(q) for q in quantiles)
        return cls(q2_ppl_floor=ppl_high, q2_entropy_ceiling=ent_low, q4_ppl_ceiling=ppl_low,
                   q4_entropy_floor=ent_high)


@dataclasses.dataclass(frozen=True)
class StepReport:
    """One step of `QTuningPruner.prune`, over the whole global batch (identical on every rank
    but for the timings)."""

    step: int
    strategy: str
    quadrant_counts: dict[str, int]  # every placed sample's label
    kept_quadrant_counts: dict[str, int]  # the kept samples' labels
    kept_samples: int
    total_samples: int
    unplaceable_samples: int
    kept_tokens: int  # loss tokens trained on (after token pruning)
    total_tokens: int  # loss tokens of the scored global batch
    scored_samples: int  # the no-grad scoring forward's work (0 when the strategy needs none)
    scored_tokens: int
    level: float
    thresholds: Thresholds
    filler_samples: int  # DP ranks that got a zero-loss filler sample (fewer kept than ranks)
    wanted_samples: int | None  # refill: the samples the step should train on (None: shrink)
    scoring_seconds: float
    scoring_peak_memory_bytes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class StageSeconds:
    """Wall-clock seconds of each stage of one `QTuningPruner.prune` call on this rank (the
    module docstring's stages; `validate` includes agreeing on errors across ranks)."""

    validate: float = 0.0
    score: float = 0.0
    gather: float = 0.0
    select: float = 0.0
    masks: float = 0.0
    hooks: float = 0.0
    rebalance: float = 0.0
    report: float = 0.0

    def __post_init__(self) -> None:
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        """Charge the time since the previous lap (or construction) to `stage`."""
        now = time.perf_counter()
        setattr(self, stage, getattr(self, stage) + now - self._last)
        self._last = now

    def to_json(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def format_report(report: StepReport) -> str:
    """Three log lines: quadrants, what is kept, the level with the corners' bounds and timing."""
    kept, total = report.kept_samples, report.total_samples
    t = report.thresholds
    head = "[Q-Tuning] " if report.strategy == "eu_plane" \
        else f"[Q-Tuning] strategy={report.strategy} "
    return "\n".join([
        f"[Q-Tuning] Quadrant distribution: {report.quadrant_counts}",
        f"[Q-Tuning] Kept {kept}/{total} samples ({100.0 * kept / max(total, 1):.1f}%), "
        f"{report.kept_tokens}/{report.total_tokens} tokens "
        f"({100.0 * report.kept_tokens / max(report.total_tokens, 1):.1f}%)"
        + (f", {report.unplaceable_samples} unplaceable" if report.unplaceable_samples else "")
        + (f"; refill short: {report.wanted_samples - kept} fewer than the "
           f"{report.wanted_samples} wanted (too few placeable samples scored)"
           if report.wanted_samples is not None and kept < report.wanted_samples else ""),
        head + f"level={report.level:.4f} Q2: ppl>={t.q2_ppl_floor:.3g} "
        f"ent<={t.q2_entropy_ceiling:.3g} | Q4: ppl<={t.q4_ppl_ceiling:.3g} "
        f"ent>={t.q4_entropy_floor:.3g} scoring={report.scoring_seconds:.2f}s"
        + (f" peak={report.scoring_peak_memory_bytes / 2**20:.1f}MiB"
           if report.scoring_peak_memory_bytes else ""),
    ])
