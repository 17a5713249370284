"""Q-Tuning's per-rollout scalars into the tracking slime has (W&B, TensorBoard).

Public API:
    slime_tracking_log() -> callable | None      slime's `log(args, metrics, step_key)`
    log_rollout(args, rollout_id, report) -> dict | None

slime logs its `train/...` metrics with `log(args, metrics, step_key="train/step")`
(`slime.observability.logging_utils`, before that `slime.utils.tracking_utils`): W&B when
`--use-wandb` (its `train/*` metrics are plotted against `train/step`), TensorBoard when
`--use-tensorboard`, each as slime set them up. `log_rollout` hands it `train/q_tuning/...`
(`q_tuning.observe.tensorboard.step_scalars`) with `train/step` = the rollout id, which is slime's
own step number for the rollout's one optimizer step (the hook refuses several steps per rollout),
from the rank where slime logs its own train metrics (`comm.is_megatron_metrics_rank`).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

from q_tuning.observe.tensorboard import step_scalars
from q_tuning.parallel import comm
from q_tuning.report import StepReport

__all__ = ["STEP_KEY", "log_rollout", "slime_tracking_log"]

STEP_KEY = "train/step"
_MODULES = ("slime.observability.logging_utils", "slime.utils.tracking_utils")


def slime_tracking_log() -> Optional[Callable]:
    """slime's `log(args, metrics, step_key)`, from the first of its homes that imports; None
    where slime is not importable (the hook run outside slime: nothing to log to)."""
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        log = getattr(module, "log", None)
        if callable(log):
            return log
    return None


def log_rollout(args: Any, rollout_id: int, report: StepReport) -> Optional[dict]:
    """Log the rollout's Q-Tuning scalars through slime (on slime's metrics rank); returns what
    was logged, None where nothing was."""
    if not comm.is_megatron_metrics_rank():
        return None
    log = slime_tracking_log()
    if log is None:
        return None
    metrics = {f"train/{tag}": value for tag, value in step_scalars(report).items()}
    metrics[STEP_KEY] = rollout_id
    log(args, metrics, step_key=STEP_KEY)
    return metrics
