"""What the trainer reports: one log line (and the Q-Tuning report) per `--log-interval`
iterations, TensorBoard and W&B scalars (`q_tuning.observe.writers`), and
`<output-dir>/metrics.jsonl`.

Public API:
    StepResult                       one iteration's global numbers (every rank has the same)
    MetricsLogger(args, *, train_iters, pruner=None)
        .begin()                     training starts (the log lines' elapsed time counts from here)
        .record(step, state)         after every iteration; logs when the interval is due
        .flush(step, state)          log a partial interval (a stop between log lines)
        .history                     the logged metrics, one dict per log step
        .close()
    write_metrics_jsonl(output_dir, history, *, resumed_at=None)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import pathlib
import time
from typing import Optional

from q_tuning import StepReport, format_report
from q_tuning.observe import log_step
from q_tuning.observe.writers import TensorBoardWriter, WandbConfig, Writers, open_wandb
from q_tuning.parallel import comm
from q_tuning.sft.checkpoint.policy import TrainState

logger = logging.getLogger("q_tuning.train")

__all__ = ["MetricsLogger", "StepResult", "write_metrics_jsonl"]

# The metrics written to TensorBoard and W&B as train/<key> (when not None).
_SCALARS = ("loss", "lr", "tokens_per_second", "seconds_per_iteration", "samples", "tokens",
            "loss_tokens", "trained_samples", "trained_tokens", "consumed_samples", "grad_norm")


@dataclasses.dataclass(slots=True)
class StepResult:
    """One iteration, summed over the data-parallel ranks."""

    iteration: int
    loss_sum: float
    loss_tokens: int
    loss: float  # loss_sum / loss_tokens
    lr: float  # the rate this step applied
    grad_norm: Optional[float]
    samples: int  # trained (with a loss token)
    tokens: int
    seconds: float
    q_tuning: Optional[StepReport]
    skipped: Optional[str]  # why the optimizer step was skipped; None: it was not


@dataclasses.dataclass(frozen=True, slots=True)
class _IntervalSums:
    """Sums over the steps since the last log line (loss, samples and tokens over the steps
    not skipped)."""

    steps: int
    skipped: int
    loss_sum: float
    loss_tokens: int
    samples: int
    tokens: int
    seconds: float

    @classmethod
    def of(cls, steps: list[StepResult]) -> "_IntervalSums":
        trained = [s for s in steps if s.skipped is None]
        return cls(steps=len(steps), skipped=len(steps) - len(trained),
                   loss_sum=sum(s.loss_sum for s in trained),
                   loss_tokens=sum(s.loss_tokens for s in trained),
                   samples=sum(s.samples for s in trained),
                   tokens=sum(s.tokens for s in trained),
                   seconds=sum(s.seconds for s in steps))


class MetricsLogger:
    """Log lines, TensorBoard and W&B on global rank 0; the metrics dicts on every rank."""

    def __init__(self, args: argparse.Namespace, *, train_iters: int, pruner=None):
        self.log_interval = args.log_interval
        self.train_iters = train_iters
        self.pruner = pruner  # its last_decision goes to the dashboards with the step's report
        self.rank_zero = comm.is_global_rank_zero()
        self.writers = _open_writers(args) if self.rank_zero else Writers()
        self.history: list[dict] = []
        self._steps: list[StepResult] = []  # since the last log line
        self._start = time.perf_counter()

    def begin(self) -> None:
        self._start = time.perf_counter()

    def record(self, step: StepResult, state: TrainState) -> None:
        """Add an iteration; at every --log-interval and at the last one, log the interval."""
        self._steps.append(step)
        if state.iteration % self.log_interval == 0 or state.iteration == self.train_iters:
            self.flush(step, state)

    def flush(self, step: StepResult, state: TrainState) -> None:
        """Log the steps since the last log line, if any (`step` is the latest of them)."""
        if not self._steps:
            return
        interval = _IntervalSums.of(self._steps)
        metrics = self._metrics(interval, step, state)
        if self.rank_zero:
            self._log_lines(metrics, interval, step, state)
            self._write_scalars(metrics, step.q_tuning)
        self.history.append(metrics)
        self._steps = []

    def _metrics(self, interval: _IntervalSums, step: StepResult, state: TrainState) -> dict:
        trained = interval.steps - interval.skipped
        return {
            "iteration": state.iteration,
            "loss": interval.loss_sum / max(interval.loss_tokens, 1) if trained else math.nan,
            "step_loss": step.loss,
            "lr": step.lr,
            "grad_norm": step.grad_norm,
            "tokens_per_second": interval.tokens / max(interval.seconds, 1e-9),
            "seconds_per_iteration": interval.seconds / interval.steps,
            "samples": interval.samples, "tokens": interval.tokens,
            "loss_tokens": interval.loss_tokens,
            "trained_samples": state.trained_samples, "trained_tokens": state.trained_tokens,
            "consumed_samples": state.consumed_samples,
            "skipped_iterations": interval.skipped,
            "q_tuning": None if step.q_tuning is None else step.q_tuning.to_json(),
        }

    def _log_lines(self, metrics: dict, interval: _IntervalSums, step: StepResult,
                   state: TrainState) -> None:
        grad = "n/a" if metrics["grad_norm"] is None else f"{metrics['grad_norm']:.4f}"
        eta = (self.train_iters - state.iteration) * metrics["seconds_per_iteration"]
        logger.info(
            "iteration %5d/%5d | loss %.4f | lr %.3e | grad norm %s | %.1f tokens/s | "
            "%.1f s/it | samples %d, tokens %d (total %d, %d) | elapsed %.0f s, eta %.0f s",
            state.iteration, self.train_iters, metrics["loss"], metrics["lr"], grad,
            metrics["tokens_per_second"], metrics["seconds_per_iteration"],
            metrics["samples"], metrics["tokens"], state.trained_samples, state.trained_tokens,
            time.perf_counter() - self._start, eta)
        if interval.skipped:
            logger.info("  %d of these %d iteration(s) skipped (non-finite loss or "
                        "gradients; %d in this run)", interval.skipped, interval.steps,
                        state.skipped_iterations)
        if step.q_tuning is not None:
            for line in format_report(step.q_tuning).splitlines():
                logger.info("%s", line)

    def _write_scalars(self, metrics: dict, report: StepReport | None) -> None:
        if not self.writers:
            return
        it = metrics["iteration"]
        self.writers.scalars({f"train/{key}": metrics[key] for key in _SCALARS
                              if metrics[key] is not None}, it)
        if report is not None:  # last_decision belongs to the step just trained
            log_step(self.writers, report, self.pruner.last_decision, it)
        self.writers.flush()

    def close(self) -> None:
        self.writers.close()


def _open_writers(args: argparse.Namespace) -> Writers:
    """--tensorboard-dir's SummaryWriter and --wandb-project's run (each when asked for)."""
    tensorboard = None
    if args.tensorboard_dir:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ValueError("--tensorboard-dir needs the 'tensorboard' package: "
                             "pip install 'q-tuning[plot]'") from err
        tensorboard = TensorBoardWriter(SummaryWriter(log_dir=args.tensorboard_dir))
    wandb = WandbConfig.from_args(args)
    return Writers([tensorboard, open_wandb(wandb, vars(args)) if wandb.project else None])


def write_metrics_jsonl(output_dir: Optional[str], history: list[dict], *,
                        resumed_at: Optional[int] = None) -> None:
    """<output-dir>/metrics.jsonl: one line per logged iteration (with the Q-Tuning report),
    for scripts that compare runs; written whole, then renamed into place. A run resumed at
    iteration N keeps the file's lines up to N (those of the runs before it) and replaces the
    rest, so a preempted and resumed job has one line per iteration."""
    if output_dir is None:
        return
    from q_tuning._files import write_text_atomic

    path = pathlib.Path(output_dir) / "metrics.jsonl"
    earlier: list[str] = []
    if resumed_at is not None and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["iteration"] <= resumed_at:
                    earlier.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    write_text_atomic(path, earlier + [json.dumps(m, default=float) + "\n" for m in history])
