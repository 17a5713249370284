"""The Error-Uncertainty plane figure, shared by the plot hook, TensorBoard and `q-tuning-analyze`.

Public API:
    QUADRANT_NAMES, QUADRANT_COLORS
    eu_plane_figure(ppl, entropy, quadrant, kept, *, thresholds=None, level=None, title=None,
                    keep_ratio=None, step=None) -> matplotlib.figure.Figure
    save_png(figure, path) -> pathlib.Path
    figure_to_rgb(figure) -> numpy uint8 array [H, W, 3]

Axes: PPL (error) on a log x axis, mean entropy (uncertainty) on a linear y axis, so Q2
("confidently wrong": high PPL, low entropy) is the lower right corner and Q4 ("right but unsure":
low PPL, high entropy) the upper left. Points are coloured by quadrant label (SPEC section 3:
kept samples are Q2/Q4, dropped ones Q1/Q3), kept samples are filled, dropped ones hollow. The
dashed lines bound the two kept corners at the selected level a* (the legend names them: Q2's PPL
floor and entropy ceiling, Q4's PPL ceiling and entropy floor). Unplaceable samples (quadrant 0)
have no position; their number is in the legend.

The figure is a bare `matplotlib.figure.Figure` with an Agg canvas, never registered with
`pyplot`: no global state, safe in a training process and in threads, and nothing to close.
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Sequence

import numpy as np

from q_tuning.report import Thresholds

__all__ = ["QUADRANT_COLORS", "QUADRANT_NAMES", "eu_plane_figure", "figure_to_rgb", "save_png"]

QUADRANT_NAMES = {1: "Q1 harmful noise", 2: "Q2 valuable misconception",
                  3: "Q3 redundant knowledge", 4: "Q4 calibration data"}
# Colour-blind-safe (Okabe-Ito): dropped quadrants in muted tones, kept ones in strong ones.
QUADRANT_COLORS = {1: "#D55E00", 2: "#0072B2", 3: "#999999", 4: "#009E73"}


def _as_array(values, dtype) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def eu_plane_figure(ppl: Sequence[float], entropy: Sequence[float], quadrant: Sequence[int],
                    kept: Sequence[bool], *,
                    thresholds: Sequence[float] | dict | None = None, level: float | None = None,
                    title: str | None = None, keep_ratio: float | None = None,
                    step: int | None = None):
    """One scatter of the samples on the EU plane (see the module docstring).

    ppl, entropy, quadrant (0-4), kept: per sample, any sequence or tensor of equal length.
    thresholds: a `q_tuning.report.Thresholds`, its dict form (as in summary.json), or
        `SampleSelection.thresholds` (the quantiles at a* and 1-a*); None draws no lines (e.g.
        when several selection batches each had their own).
    title: replaces the default first title line, which names `step` and `keep_ratio`; the
        second line (kept counts, a*) is always there.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ppl, entropy = _as_array(ppl, np.float64), _as_array(entropy, np.float64)
    quadrant, kept = _as_array(quadrant, np.int64), _as_array(kept, bool)
    if not (ppl.shape == entropy.shape == quadrant.shape == kept.shape) or ppl.ndim != 1:
        raise ValueError("ppl, entropy, quadrant and kept must be 1-D and of equal length, got "
                         f"{ppl.shape}, {entropy.shape}, {quadrant.shape}, {kept.shape}")
    placed = (quadrant > 0) & np.isfinite(ppl) & np.isfinite(entropy) & (ppl > 0)

    fig = Figure(figsize=(8.0, 6.0), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    handles = []
    for q in (2, 4, 1, 3):
        color = QUADRANT_COLORS[q]
        for is_kept in (True, False):
            sel = placed & (quadrant == q) & (kept == is_kept)
            if sel.any():
                ax.scatter(ppl[sel], entropy[sel], s=30, marker="o", linewidths=1.2,
                           facecolors=color if is_kept else "none", edgecolors=color,
                           alpha=0.85 if is_kept else 0.75, zorder=3 if is_kept else 2)
        count = int((placed & (quadrant == q)).sum())
        handles.append(Line2D([], [], linestyle="", marker="o", markersize=7,
                              markerfacecolor=color if q in (2, 4) else "none",
                              markeredgecolor=color, label=f"{QUADRANT_NAMES[q]}: {count}"))
    handles.append(Line2D([], [], linestyle="", marker="o", markersize=7, color="black",
                          label="filled: kept"))
    handles.append(Line2D([], [], linestyle="", marker="o", markersize=7, markerfacecolor="none",
                          markeredgecolor="black", label="hollow: dropped"))
    unplaceable = int((~placed).sum())
    if unplaceable:
        handles.append(Line2D([], [], linestyle="", marker="x", color="black",
                              label=f"unplaceable (not shown): {unplaceable}"))

    ax.set_xscale("log")
    # plain numbers (2, 5, 10, 20), not 2x10^0: ticks at 1-2-5 of each decade, labelled with %g
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("sample perplexity (error), log scale")
    ax.set_ylabel("mean token entropy, nats (uncertainty)")
    ax.grid(True, which="major", alpha=0.3)
    if thresholds is not None:
        handles.append(_draw_thresholds(ax, thresholds, level))
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8,
               frameon=False)
    ax.text(0.99, 0.01, "Q2 corner", transform=ax.transAxes, ha="right", va="bottom",
            fontsize=9, color=QUADRANT_COLORS[2], fontweight="bold")
    ax.text(0.01, 0.99, "Q4 corner", transform=ax.transAxes, ha="left", va="top",
            fontsize=9, color=QUADRANT_COLORS[4], fontweight="bold")

    n_kept, n_total = int((kept & placed).sum()), int(quadrant.size)
    first = title if title is not None else " · ".join(
        part for part in ("Q-Tuning EU plane",
                          None if step is None else f"step {step}",
                          None if keep_ratio is None else f"sample keep ratio {keep_ratio:g}")
        if part)
    second = f"kept {n_kept}/{n_total} samples ({100.0 * n_kept / max(n_total, 1):.1f}%)"
    if level is not None:
        second += f", level a* = {level:.4g}"
    ax.set_title(f"{first}\n{second}", fontsize=11)
    return fig


def _draw_thresholds(ax, thresholds, level: float | None):
    from matplotlib.lines import Line2D

    if isinstance(thresholds, dict):
        thresholds = Thresholds(**thresholds)
    elif not isinstance(thresholds, Thresholds):
        thresholds = Thresholds.from_quantiles(tuple(thresholds))
    t = thresholds
    style = dict(color="black", linestyle="--", linewidth=0.9, alpha=0.6, zorder=1)
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    # The two kept corners at a*: Q2 right of its PPL floor and below its entropy ceiling, Q4
    # left of its PPL ceiling and above its entropy floor.
    for q, (xa, xb), (ya, yb) in ((2, (t.q2_ppl_floor, x1), (y0, t.q2_entropy_ceiling)),
                                  (4, (x0, t.q4_ppl_ceiling), (t.q4_entropy_floor, y1))):
        if all(map(math.isfinite, (xa, xb, ya, yb))) and xa < xb and ya < yb:
            ax.fill_between([max(xa, x0), xb], max(ya, y0), min(yb, y1),
                            color=QUADRANT_COLORS[q], alpha=0.08, linewidth=0, zorder=0)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    for x in (t.q4_ppl_ceiling, t.q2_ppl_floor):
        if math.isfinite(x) and x > 0:
            ax.axvline(x, **style)
    for y in (t.q2_entropy_ceiling, t.q4_entropy_floor):
        if math.isfinite(y):
            ax.axhline(y, **style)
    where = "a*" if level is None else f"a*={level:.3g}"
    return Line2D([], [], **{**style, "alpha": 0.8},
                  label=f"corners at {where}: Q2 PPL >= {t.q2_ppl_floor:.3g}, entropy <= "
                        f"{t.q2_entropy_ceiling:.3g}; Q4 PPL <= {t.q4_ppl_ceiling:.3g}, "
                        f"entropy >= {t.q4_entropy_floor:.3g}")


def save_png(figure, path: str | os.PathLike) -> pathlib.Path:
    """Write `figure` as PNG, atomically (a temporary file renamed), creating the folder."""
    from q_tuning._files import atomic_path

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return pathlib.Path(path)


def figure_to_rgb(figure) -> np.ndarray:
    """The rendered figure as `[H, W, 3]` uint8 (for TensorBoard's `add_image(..., 'HWC')`)."""
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()  # [H, W, 4] -> [H, W, 3]
