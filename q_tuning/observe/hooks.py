"""Rollout-data postprocess hooks: loading them by name, and the built-in ones.

Public API:
    load_hooks(paths) -> list[callable]
    gather_rollout_stats(rollout_data) -> dict[str, list]     (collective over data-parallel ranks)
    reproduce_selection(stats, args) -> SampleSelection | None  the pruner's decision, recomputed
    EUPlanePlot(every=None, out_dir=None, name=None)          the EU-plane PNG hook
    JsonlDump(every=None, out_dir=None, name=None)            the per-sample JSONL hook
    eu_plane_png, jsonl_dump                                  ready-made instances

The contract (slime's `--rollout-data-postprocess-path`, docs/hooks.md): a hook is called as
`hook(args, rollout_id, rollout_data)` on every rank, once per step, after scoring and selection
and before the gradient step. `rollout_data` holds this data-parallel rank's samples only
(`QTuningPruner.rollout_data` documents the fields); editing `rollout_data["loss_masks"][i]` in
place changes what is trained.

The built-in hooks need the whole global batch, so they all-gather the per-sample scalars over the
data-parallel group (`gather_rollout_stats`; safe, as every rank calls every hook at the same
step) and write from global rank 0 only. The level a* and the thresholds are not in
`rollout_data`; they are recomputed with `select_samples` on the gathered statistics and the
gathered kept count, which reproduces the pruner's decision exactly (the selection is a
deterministic function of the statistics and the kept count); should the recomputed kept set
differ (statistics edited by an earlier hook), the lines are left out and a warning says why.

Configuration of the ready-made instances, read at their first call (identical on every rank):
    Q_TUNING_OBSERVE_DIR     output folder (default: <args.output_dir>/q_tuning_observe when the
                             trainer has --output-dir, else ./q_tuning_observe)
    Q_TUNING_EU_PLANE_EVERY  plot every N steps (default 10); the first call always plots
    Q_TUNING_JSONL_EVERY     dump every N steps (default 1)
For other values, make your own instance in your module and name it on the command line, e.g.
`my_hooks.plot = EUPlanePlot(every=50, out_dir="/data/plots")` with
`--rollout-data-postprocess-path my_hooks.plot`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
import pathlib
from typing import Any, Callable

import torch

from q_tuning.config import QTuningConfig
from q_tuning.observe.env import env_number
from q_tuning.parallel import comm
from q_tuning.selection import select_samples

__all__ = ["EUPlanePlot", "JsonlDump", "eu_plane_png", "gather_rollout_stats", "jsonl_dump",
           "load_hooks", "reproduce_selection"]

logger = logging.getLogger(__name__)

FLAG = "--rollout-data-postprocess-path"
OUT_DIR_ENV = "Q_TUNING_OBSERVE_DIR"
PLOT_EVERY_ENV = "Q_TUNING_EU_PLANE_EVERY"
JSONL_EVERY_ENV = "Q_TUNING_JSONL_EVERY"
DEFAULT_PLOT_EVERY = 10
DEFAULT_JSONL_EVERY = 1

# rollout_data fields with one scalar per sample that the built-ins gather, and their JSONL names.
_STAT_FIELDS = {"sample_ppls": "ppl", "sample_entropies": "entropy", "quadrants": "quadrant",
                "kept": "kept", "total_lengths": "total_length",
                "response_lengths": "response_length"}
# Per-token or per-step fields: never gathered.
_TOKEN_FIELDS = {"tokens", "loss_masks", "token_nlls", "token_entropies"}


# --- loading --------------------------------------------------------------------------------------

def load_hooks(paths: list[str] | None) -> list[Callable]:
    """Resolve each `package.module.function` (or `package.module:function`) in `paths`.

    The longest importable module prefix is imported and the rest is looked up as attributes, so
    `pkg.mod.Class.method` and `pkg.mod.instance` work too. A class is instantiated with no
    arguments. Every hook must accept `(args, rollout_id, rollout_data)`. Raises ValueError naming
    the path and what is wrong with it; an error inside the module's own imports is reported as
    such, not as a missing module.
    """
    return [_resolve_hook(path) for path in paths or []]


def _resolve_hook(path: str) -> Callable:
    where = f"{FLAG} {path!r}"
    module_name, sep, attr = path.partition(":")
    if sep:
        parts = [module_name, *attr.split(".")]
    else:
        dotted = path.split(".")
        parts = None
        for cut in range(len(dotted) - 1, 0, -1):
            if _module_exists(".".join(dotted[:cut]), where):
                parts = [".".join(dotted[:cut]), *dotted[cut:]]
                break
        if parts is None:
            top = dotted[0]
            raise ValueError(f"{where}: expected 'package.module.function'; no module "
                             f"{'.'.join(dotted[:-1]) or top!r} can be imported (is it on "
                             "PYTHONPATH?)")
    if not all(parts):
        raise ValueError(f"{where}: expected 'package.module.function' (an empty name part)")
    try:
        obj = importlib.import_module(parts[0])
    except Exception as err:
        raise ValueError(f"{where}: importing module {parts[0]!r} failed: "
                         f"{type(err).__name__}: {err}") from err
    owner = parts[0]
    for name in parts[1:]:
        if not hasattr(obj, name):
            public = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(name, public, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"{where}: {owner!r} has no attribute {name!r}{hint}")
        obj, owner = getattr(obj, name), f"{owner}.{name}"
    if inspect.isclass(obj):
        try:
            obj = obj()
        except Exception as err:
            raise ValueError(f"{where}: {owner} is a class; instantiating it with no arguments "
                             f"failed: {type(err).__name__}: {err}") from err
    if not callable(obj):
        raise ValueError(f"{where}: {owner} is a {type(obj).__name__}, not a callable")
    if not (inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isbuiltin(obj)):
        try:  # a callable object: let hook errors name it by the path it was given as
            obj.__module__, obj.__qualname__ = parts[0], ".".join(parts[1:])
        except (AttributeError, TypeError):
            pass
    _check_signature(obj, where)
    return obj


def _module_exists(name: str, where: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False
    except Exception as err:  # the parent package's __init__ itself failed
        raise ValueError(f"{where}: importing {name!r} failed: {type(err).__name__}: {err}"
                         ) from err


def _check_signature(hook: Callable, where: str) -> None:
    try:
        signature = inspect.signature(hook)
    except (TypeError, ValueError):  # some builtins have none: trust them
        return
    try:
        signature.bind(None, 0, {})
    except TypeError:
        raise ValueError(f"{where}: a hook is called as hook(args, rollout_id, rollout_data), "
                         f"but its signature is {signature}") from None


# --- gathering ------------------------------------------------------------------------------------

def _scalar(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else None
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return getattr(value, "item", lambda: None)()  # numpy scalars


def gather_rollout_stats(rollout_data: dict[str, list]) -> dict[str, list]:
    """The per-sample scalars of the whole global batch, in data-parallel rank order (the
    pruner's global sample order). Collective: every rank of the data-parallel group calls it.

    Returns lists of equal length: `sample_ppls`, `sample_entropies`, `quadrants`, `kept`,
    `total_lengths`, `response_lengths` (those present), `loss_tokens` (trained target tokens,
    after token pruning and after earlier hooks' edits), `dp_rank`, and every other field of
    `rollout_data` whose entries are scalars (e.g. the trainer's `sample_index`).
    """
    n = len(rollout_data["tokens"])
    local: dict[str, list] = {f: list(rollout_data[f]) for f in _STAT_FIELDS if f in rollout_data}
    local["loss_tokens"] = [int(m[1:].count_nonzero()) for m in rollout_data["loss_masks"]]
    for field, values in rollout_data.items():
        if field in local or field in _TOKEN_FIELDS or len(values) != n:
            continue
        scalars = [_scalar(v) for v in values]
        if all(s is not None for s in scalars):
            local[field] = scalars
    parts = comm.all_gather_objects(local, comm.data_parallel_group())
    fields = [f for f in parts[0] if all(f in p for p in parts)]
    out = {f: [v for p in parts for v in p[f]] for f in fields}
    out["dp_rank"] = [r for r, p in enumerate(parts) for _ in p["loss_tokens"]]
    return out


def reproduce_selection(stats: dict[str, list], args: Any):
    """The pruner's decision recomputed from gathered statistics; None (and a warning) when it
    does not reproduce the gathered kept set."""
    ppl = torch.tensor(stats["sample_ppls"], dtype=torch.float64)
    ent = torch.tensor(stats["sample_entropies"], dtype=torch.float64)
    kept = torch.tensor(stats["kept"], dtype=torch.bool)
    placed = int((torch.isfinite(ppl) & torch.isfinite(ent)).sum())
    if placed == 0 or not bool(kept.any()):
        return None
    config = _config_of(args)
    if config.strategy != "eu_plane":  # a baseline's kept set is not the EU-plane rule's
        return None
    selection = select_samples(ppl, ent, min(1.0, int(kept.sum()) / placed),
                               config.bisect_max_iter, rule=config.selection)
    if not torch.equal(selection.keep, kept):
        logger.warning("Q-Tuning observe: the kept set cannot be reproduced from the hooks' "
                       "statistics (edited by an earlier hook?); plotting without thresholds")
        return None
    return selection


def _config_of(args: Any) -> QTuningConfig:
    if isinstance(args, QTuningConfig):
        return args
    try:
        return QTuningConfig.from_args(args)
    except (ValueError, TypeError):
        return QTuningConfig()


def _env_int(name: str, default: int) -> int:
    return env_number(name, default, minimum=1)


# --- the built-in hooks ---------------------------------------------------------------------------

class _EveryNHook:
    """Runs `_run(args, rollout_id, stats)` on the first call and when `rollout_id % every == 0`.
    The decision depends only on the call count and `rollout_id`, identical on every rank, so
    the collective inside is entered by all or by none."""

    env_every: str = ""
    default_every: int = 1

    def __init__(self, every: int | None = None, out_dir: str | os.PathLike | None = None,
                 name: str | None = None):
        if every is not None and (isinstance(every, bool) or not isinstance(every, int)
                                  or every < 1):
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self.every = every
        self.out_dir = out_dir
        self.__qualname__ = name or type(self).__name__  # named in the pruner's hook errors
        self._calls = 0
        self._warned = False

    def __call__(self, args: Any, rollout_id: int, rollout_data: dict[str, list]) -> None:
        every = self.every or _env_int(self.env_every, self.default_every)
        first, self._calls = self._calls == 0, self._calls + 1
        if not (first or rollout_id % every == 0):
            return
        if "sample_ppls" not in rollout_data:
            if not self._warned:
                logger.warning("%s: rollout_data has no Q-Tuning statistics (is --enable-q-tuning "
                               "on?); nothing to record", self.__qualname__)
                self._warned = True
            return
        stats = gather_rollout_stats(rollout_data)
        if comm.is_global_rank_zero():
            self._run(args, rollout_id, stats)

    def output_dir(self, args: Any) -> pathlib.Path:
        if self.out_dir is not None:
            return pathlib.Path(self.out_dir)
        if os.environ.get(OUT_DIR_ENV):
            return pathlib.Path(os.environ[OUT_DIR_ENV])
        base = getattr(args, "output_dir", None)
        return pathlib.Path(base or ".") / "q_tuning_observe"

    def _run(self, args: Any, rollout_id: int, stats: dict[str, list]) -> None:
        raise NotImplementedError


class EUPlanePlot(_EveryNHook):
    """Writes `<out_dir>/eu_plane_step_<rollout_id>.png`: the step's global batch on the EU plane
    (`q_tuning.observe.plot.eu_plane_figure`), every `every` steps and at the first call."""

    env_every = PLOT_EVERY_ENV
    default_every = DEFAULT_PLOT_EVERY

    def _run(self, args: Any, rollout_id: int, stats: dict[str, list]) -> None:
        from q_tuning.observe.plot import eu_plane_figure, save_png

        selection = reproduce_selection(stats, args)
        figure = eu_plane_figure(
            stats["sample_ppls"], stats["sample_entropies"], stats["quadrants"], stats["kept"],
            thresholds=None if selection is None else selection.thresholds,
            level=None if selection is None else selection.level,
            keep_ratio=_config_of(args).sample_keep_ratio, step=rollout_id)
        save_png(figure, self.output_dir(args) / f"eu_plane_step_{rollout_id:07d}.png")


class JsonlDump(_EveryNHook):
    """Appends one JSON line per sample of the global batch to `<out_dir>/rollout_stats.jsonl`:
    `step` (the rollout id), `index` (position in the global batch), `dp_rank`, `ppl`, `entropy`
    (null when unplaceable), `quadrant` (1-4, 0 = unplaceable), `kept`, `total_length`,
    `response_length`, `loss_tokens` (target tokens trained, after token pruning) and the batch's
    own scalar fields (e.g. `sample_index`)."""

    env_every = JSONL_EVERY_ENV
    default_every = DEFAULT_JSONL_EVERY
    filename = "rollout_stats.jsonl"

    def _run(self, args: Any, rollout_id: int, stats: dict[str, list]) -> None:
        names = {f: _STAT_FIELDS.get(f, f) for f in stats}
        n = len(stats["loss_tokens"])
        path = self.output_dir(args) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            for i in range(n):
                row = {"step": rollout_id, "index": i}
                row.update({names[field]: _json_value(values[i])
                            for field, values in stats.items()})
                f.write(json.dumps(row) + "\n")


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN / inf
    return value


eu_plane_png = EUPlanePlot(name="eu_plane_png")
jsonl_dump = JsonlDump(name="jsonl_dump")
