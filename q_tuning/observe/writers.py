"""Where scalars go: TensorBoard and W&B behind one small interface, so that every caller hands
its numbers to one place and each dashboard gets the same ones.

Public API:
    MetricWriter                 the interface: scalars(values, step), image(tag, rgb, step),
                                 histogram(tag, values, step), flush(), close(), image_every
    TensorBoardWriter(summary_writer, image_every=None)
    WandbWriter(run, image_every=0)      `run`: the `wandb` module or a `wandb.Run`
    Writers(writers)                     fans out to several (empty: does nothing)
    as_writer(obj) -> MetricWriter | None    a SummaryWriter, wandb, or a MetricWriter as it is
    WandbConfig                  the trainer's --wandb-* flags, validated (from_args)
    add_wandb_args(parser)
    open_wandb(config, run_config) -> WandbWriter

Flags (Megatron-LM's names and meanings, megatron/training/global_vars.py `_set_wandb_writer`):
--wandb-project turns W&B on; --wandb-exp-name is the run's name (W&B picks one when absent);
--wandb-save-dir is where W&B writes its files (Megatron-LM's default: <save>/wandb; ours:
<output-dir>/wandb, else <save>/wandb); --wandb-entity the team or user. `WANDB_MODE=offline`
(W&B's own variable) writes the run on disk only, with no network (`wandb sync` uploads it
later). Our own: --wandb-eu-plane-every N logs the EU-plane figure as a W&B image every N steps.

Steps: W&B wants steps that never go back; TensorBoard does not mind. Every caller logs at the
training iteration (ours, Megatron-LM's, or slime's `train/step`), once per log step.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import pathlib
from typing import Any, Iterable, Mapping, Optional

import numpy as np

__all__ = ["MetricWriter", "TensorBoardWriter", "WandbConfig", "WandbWriter", "Writers",
           "add_wandb_args", "as_writer", "open_wandb"]

WANDB_FIX = "pip install 'q-tuning[wandb]' (or pip install wandb)"


class MetricWriter:
    """One dashboard. `image_every`: the EU-plane figure every N steps (and at step 1); 0: none."""

    image_every: int = 0

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        """`rgb`: an (H, W, 3) uint8 array."""
        raise NotImplementedError

    def histogram(self, tag: str, values: Any, step: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardWriter(MetricWriter):
    """A `torch.utils.tensorboard.SummaryWriter` (or anything with its `add_*` methods).
    `image_every` default: `$Q_TUNING_TB_IMAGE_EVERY`, else 10 (q_tuning.observe.tensorboard)."""

    def __init__(self, summary_writer, image_every: Optional[int] = None):
        from q_tuning.observe.tensorboard import tb_image_every

        self.writer = summary_writer
        self.image_every = tb_image_every(image_every)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, rgb, step, dataformats="HWC")

    def histogram(self, tag: str, values: Any, step: int) -> None:
        self.writer.add_histogram(tag, values, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbWriter(MetricWriter):
    """`wandb.log(values, step=step)` on the `wandb` module (as Megatron-LM's writer is) or a run.
    `close` finishes the run only when this writer started it (`owns_run`)."""

    def __init__(self, run, image_every: int = 0, owns_run: bool = False):
        self.run, self.image_every, self.owns_run = run, image_every, owns_run

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.run.log({tag: float(value) for tag, value in values.items()}, step=step)

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        import wandb

        self.run.log({tag: wandb.Image(rgb)}, step=step)

    def histogram(self, tag: str, values: Any, step: int) -> None:
        import wandb

        self.run.log({tag: wandb.Histogram(np.asarray(values, dtype=np.float64))}, step=step)

    def close(self) -> None:
        if self.owns_run:
            self.run.finish()


class Writers(MetricWriter):
    """Every writer in `writers` gets every call (`log_step` sends images only to
    `image_writers(step)`). Empty: every call does nothing."""

    def __init__(self, writers: Iterable[Optional[MetricWriter]] = ()):
        self.writers = [w for w in writers if w is not None]

    def __bool__(self) -> bool:
        return bool(self.writers)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for w in self.writers:
            w.scalars(values, step)

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        for w in self.writers:
            w.image(tag, rgb, step)

    def histogram(self, tag: str, values: Any, step: int) -> None:
        for w in self.writers:
            w.histogram(tag, values, step)

    def image_writers(self, step: int) -> list[MetricWriter]:
        """The writers whose `image_every` is due at `step` (step 1 always, when not 0)."""
        return [w for w in self.writers
                if w.image_every and (step == 1 or step % w.image_every == 0)]

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()
        self.writers = []


def as_writer(obj: Any) -> Optional[MetricWriter]:
    """None, a MetricWriter (as it is), a SummaryWriter (`add_scalar`) or wandb (`log`)."""
    if obj is None or isinstance(obj, MetricWriter):
        return obj
    if hasattr(obj, "add_scalar"):
        return TensorBoardWriter(obj)
    if hasattr(obj, "log"):
        return WandbWriter(obj)
    raise TypeError(f"not a metric writer: {type(obj).__name__} (expected a SummaryWriter, the "
                    "wandb module or run, or a q_tuning.observe.writers.MetricWriter)")


# --- the trainer's W&B flags ---------------------------------------------------------------------

def add_wandb_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("W&B (Megatron-LM's flags; WANDB_MODE=offline: no network)")
    g.add_argument("--wandb-project", default=None,
                   help="log to this W&B project (needs the wandb package: "
                        "pip install 'q-tuning[wandb]')")
    g.add_argument("--wandb-exp-name", default=None,
                   help="the W&B run's name (default: one W&B picks)")
    g.add_argument("--wandb-save-dir", default=None,
                   help="where W&B writes its files (default: <output-dir>/wandb, else "
                        "<save>/wandb)")
    g.add_argument("--wandb-entity", default=None, help="W&B team or user")
    g.add_argument("--wandb-eu-plane-every", type=int, default=0, metavar="N",
                   help="log the EU-plane figure as a W&B image every N steps and at step 1 "
                        "(0: never)")


@dataclasses.dataclass(frozen=True, slots=True)
class WandbConfig:
    """The validated --wandb-* flags; `project` None: W&B off."""

    project: Optional[str] = None
    exp_name: Optional[str] = None
    save_dir: Optional[str] = None
    entity: Optional[str] = None
    eu_plane_every: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "WandbConfig":
        """ValueError naming the flag and the fix; fills --wandb-save-dir's default."""
        config = cls(project=args.wandb_project or None, exp_name=args.wandb_exp_name,
                     save_dir=args.wandb_save_dir, entity=args.wandb_entity,
                     eu_plane_every=args.wandb_eu_plane_every)
        if config.eu_plane_every < 0:
            raise ValueError(f"--wandb-eu-plane-every must be >= 0, got {config.eu_plane_every}")
        if config.project is None:
            given = [f"--wandb-{name.replace('_', '-')}" for name in
                     ("exp_name", "save_dir", "entity", "eu_plane_every")
                     if getattr(config, name)]
            if given:
                raise ValueError(f"{', '.join(given)}: only with --wandb-project "
                                 "(W&B is off without it)")
            return config
        if importlib.util.find_spec("wandb") is None:
            raise ValueError(f"--wandb-project needs the wandb package, which is not installed: "
                             f"{WANDB_FIX}")
        if config.save_dir is None:
            home = args.output_dir or getattr(args, "save", None)
            if home is None:
                raise ValueError("--wandb-project needs --wandb-save-dir (or --output-dir or "
                                 "--save, under which W&B writes to wandb/)")
            config = dataclasses.replace(config, save_dir=str(pathlib.Path(home) / "wandb"))
        return config


def open_wandb(config: WandbConfig, run_config: Mapping[str, Any]) -> WandbWriter:
    """Start the W&B run (`wandb.init`; WANDB_MODE=offline honoured) and wrap it."""
    import wandb

    pathlib.Path(config.save_dir).mkdir(parents=True, exist_ok=True)
    kwargs = {"project": config.project, "dir": config.save_dir, "config": dict(run_config)}
    if config.exp_name:
        kwargs["name"] = config.exp_name
    if config.entity:
        kwargs["entity"] = config.entity
    return WandbWriter(wandb.init(**kwargs), image_every=config.eu_plane_every, owns_run=True)
