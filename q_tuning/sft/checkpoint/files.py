"""Checkpoint files: megatron-core `dist_checkpointing` for model and optimizer, plus trainer state.

Public API:
    TRACKER_FILE
    CheckpointError
    CheckpointSaveError
    checkpoint_path(root, iteration) -> pathlib.Path
    find_checkpoint(root) -> pathlib.Path | None
    incomplete_checkpoints(root) -> list[pathlib.Path]
    check_writable(root) -> str | None
    read_trainer_state(path) -> dict
    check_compatible(saved, current, *, load_optim) -> None
    save_checkpoint(root, iteration, model_chunks, optimizer, trainer_state, *,
                    use_distributed_optimizer) -> pathlib.Path
    load_checkpoint(path, model_chunks, optimizer, *, load_optim, load_rng) -> dict

Layout (Megatron-LM's, so its users find their way)::

    <root>/iter_0000020/                   dist_checkpointing folder (metadata.json, common.pt,
                                           *.distcp): model, optimizer, RNG states, trainer state
    <root>/latest_checkpointed_iteration.txt   "20", written last

What is saved:
- model: each chunk's `sharded_state_dict()` (keys `model`, or `model0`, `model1`, ... with
  virtual pipeline stages, as Megatron-LM), reshardable over TP / PP / DP;
- optimizer: `optimizer.sharded_state_dict(...)` (Adam moments, fp32 main weights with --bf16;
  the distributed optimizer in megatron's 'dp_reshardable' format: DP may change on load,
  TP / PP may not);
- RNG: every rank's Python / numpy / torch / megatron tracker states, as a `ShardedObject` per
  (PP, TP) rank holding the list over DP x CP ranks; restored only at the same parallel split;
- trainer state (the common part, identical on every rank): iteration, data position,
  LR-scheduler state, Q-Tuning step, the model and parallel "fingerprint" that `--load` checks,
  and the flags of the run.

Atomicity: every rank writes into `<root>/.iter_0000020.tmp`; after all ranks finished, global
rank 0 renames it to `iter_0000020` and only then rewrites the tracker file (itself via a temporary
file and `os.replace`): the tracker is the commit point, and `--load` reads only the checkpoint
it names. A crash leaves either the previous complete checkpoint as the latest, or a `.tmp`
folder that nothing reads (`incomplete_checkpoints` lists it, the trainer reports it at `--load`,
the next save of that iteration replaces it). A save that fails on any rank (no space left, an
I/O error) raises `CheckpointSaveError` on every rank, naming the incomplete folder (removed, to
give the space back) and the latest complete checkpoint, which stays as it was.

The model, RNG and optimizer pieces of the state are built in `checkpoint.state`.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import socket
from typing import Optional

import torch
from torch.distributed.checkpoint.api import CheckpointException

from q_tuning.parallel import comm
from q_tuning.sft.checkpoint import state as cs

__all__ = ["TRACKER_FILE", "CheckpointError", "CheckpointSaveError", "checkpoint_path",
           "find_checkpoint", "incomplete_checkpoints", "check_writable", "read_trainer_state",
           "check_compatible", "save_checkpoint", "load_checkpoint"]

TRACKER_FILE = "latest_checkpointed_iteration.txt"
_TRAINER_KEY = "q_tuning_trainer"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this run; the message says why and what to do."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (raised on every rank); the message names the incomplete
    folder and the latest complete checkpoint."""


_INCOMPLETE = re.compile(r"^\.iter_\d{7}\.(tmp|old)$")


def checkpoint_path(root: str | os.PathLike, iteration: int) -> pathlib.Path:
    return pathlib.Path(root) / f"iter_{iteration:07d}"


def find_checkpoint(root: str | os.PathLike) -> Optional[pathlib.Path]:
    """The checkpoint `--load root` means: the tracker's iteration, or `root` itself when it is a
    checkpoint folder; None when there is none (the run then starts from the HF weights)."""
    root = pathlib.Path(root)
    if _INCOMPLETE.match(root.name):
        raise CheckpointError(f"--load {root}: this is the folder of a save that did not finish "
                              "(never loaded); pass the checkpoint root folder instead")
    if (root / "metadata.json").is_file():
        return root
    tracker = root / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(f"--load {root}: {TRACKER_FILE} holds {text!r}, not an iteration "
                              "number") from None
    path = checkpoint_path(root, iteration)
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"--load {root}: {TRACKER_FILE} names iteration {iteration} but "
                              f"{path} is not a complete checkpoint")
    return path


def incomplete_checkpoints(root: str | os.PathLike) -> list[pathlib.Path]:
    """Folders under `root` that a save left unfinished (`.iter_*.tmp` / `.iter_*.old`), and
    `iter_*` folders newer than the tracker's iteration (written, but the tracker was not yet
    updated); `--load` never reads them."""
    root = pathlib.Path(root)
    if not root.is_dir():
        return []
    committed = None
    tracker = root / TRACKER_FILE
    if tracker.is_file():
        try:
            committed = int(tracker.read_text().strip())
        except ValueError:
            pass
    found = []
    for path in sorted(root.iterdir()):
        if not path.is_dir():
            continue
        if _INCOMPLETE.match(path.name):
            found.append(path)
        elif re.fullmatch(r"iter_\d{7}", path.name) and (
                committed is None or int(path.name[5:]) > committed
                or not (path / "metadata.json").is_file()):
            found.append(path)
    return found


def check_writable(root: str | os.PathLike) -> Optional[str]:
    """None when this process can write checkpoints to `root`, else what went wrong.

    Probes where the first save will write: `root` when it exists, else its nearest existing
    parent (where the save creates it), with a folder and a file of unique names that are
    removed again; nothing else is created, so a run that stops later leaves no empty `--save`
    folder behind, and ranks sharing a file system do not race."""
    root = pathlib.Path(root).absolute()
    existing = root
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    probe = existing / f".q_tuning_write_test.{socket.gethostname()}.{os.getpid()}"
    try:
        probe.mkdir()
        try:
            with open(probe / "probe", "wb") as f:
                f.write(b"q-tuning-train write test\n")
                f.flush()
                os.fsync(f.fileno())
        finally:
            shutil.rmtree(probe, ignore_errors=True)
    except OSError as err:
        return f"cannot write checkpoints there ({type(err).__name__}: {err})"
    return None


def read_trainer_state(path: str | os.PathLike) -> dict:
    """The trainer state of the checkpoint folder `path` (read without building a model)."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(path))
    state = common.get(_TRAINER_KEY) if isinstance(common, dict) else None
    if state is None:
        raise CheckpointError(f"{path} is a megatron checkpoint but not one written by "
                              "q-tuning-train (no trainer state); cannot resume from it")
    return state


def check_compatible(saved: dict, current: dict, *, load_optim: bool) -> None:
    """CheckpointError when the checkpoint cannot be loaded into the current run.

    `saved` / `current`: fingerprints {"model": {...}, "parallel": {...}, "optimizer": {...}}
    (see the trainer). Model dimensions must be equal. The parallel split may change (model and
    non-distributed optimizer state reshard), except with the distributed optimizer's state,
    which reshards over DP only. The optimizer kind and precision must match to load its state.
    """
    diffs = [f"{k}: {saved['model'].get(k)!r} in the checkpoint, {v!r} here"
             for k, v in current["model"].items() if saved["model"].get(k) != v]
    if diffs:
        raise CheckpointError("the checkpoint was saved from a different model ("
                              + "; ".join(diffs) + "); load it with the same --hf-checkpoint "
                              "architecture and sizes")
    if not load_optim:
        return
    so, co = saved["optimizer"], current["optimizer"]
    if so != co:
        what = "; ".join(f"{k}: {so.get(k)!r} in the checkpoint, {v!r} here"
                         for k, v in co.items() if so.get(k) != v)
        raise CheckpointError(f"the checkpoint's optimizer state does not fit this run ({what}); "
                              "use the same optimizer flags or pass --no-load-optim")
    if co["distributed"]:
        sp, cp_ = saved["parallel"], current["parallel"]
        dims = [f"{name} {sp[key]} in the checkpoint, {cp_[key]} here"
                for key, name in (("tp", "tensor-parallel size"),
                                  ("pp", "pipeline-parallel size"),
                                  ("vpp", "virtual pipeline size")) if sp[key] != cp_[key]]
        if dims:
            raise CheckpointError("the distributed optimizer's state reshards over data-parallel "
                                  "ranks only, but " + "; ".join(dims)
                                  + ": resume at the saved split or pass --no-load-optim")



# --- save / load ---------------------------------------------------------------------------------

def save_checkpoint(root: str | os.PathLike, iteration: int, model_chunks, optimizer,
                    trainer_state: dict, *, use_distributed_optimizer: bool) -> pathlib.Path:
    """Collective: write checkpoint `iteration` under `root` (see the module doc).

    Raises CheckpointSaveError on every rank when any rank failed to write; the previous
    checkpoint and the tracker are then untouched. Three stages, each agreed on by every rank:
    rank 0 prepares the temporary folder, every rank writes its shards, rank 0 commits."""
    root = pathlib.Path(root)
    final = checkpoint_path(root, iteration)
    tmp = root / f".{final.name}.tmp"
    error = _prepare_folder(root, tmp) if comm.is_global_rank_zero() else None
    _agree_on_save(error, root, iteration, tmp)  # also the barrier before writing
    error = _write_shards(tmp, model_chunks, optimizer, trainer_state, use_distributed_optimizer)
    _agree_on_save(error, root, iteration, tmp)
    error = _commit(root, iteration, tmp, final) if comm.is_global_rank_zero() else None
    _agree_on_save(error, root, iteration, tmp if tmp.exists() else final)
    return final


def _prepare_folder(root: pathlib.Path, tmp: pathlib.Path) -> Optional[str]:
    """Rank 0: an empty `tmp` under `root` (a crashed save's is removed); the error, or None."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed save
        tmp.mkdir()
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    return None


def _write_shards(tmp: pathlib.Path, model_chunks, optimizer, trainer_state: dict,
                  use_distributed_optimizer: bool) -> Optional[str]:
    """Collective: every rank writes its shards into `tmp`; this rank's error, or None."""
    from megatron.core import dist_checkpointing

    try:
        metadata = cs.sharded_metadata(use_distributed_optimizer)
        state = cs.model_sharded_state(model_chunks, metadata)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False,
                                                          metadata=metadata)
        state[cs.RNG_KEY] = cs.rng_sharded_object(cs.gather_rng_states())
        state[_TRAINER_KEY] = {
            **trainer_state, "format_version": FORMAT_VERSION,
            "sharded_state_dict_metadata": cs.sharded_metadata(use_distributed_optimizer)}
        dist_checkpointing.save(state, str(tmp))  # ends with a barrier
    except (Exception, CheckpointException) as err:  # no space, I/O: agreed on by the caller
        return _describe_save_error(err)
    return None


def _commit(root: pathlib.Path, iteration: int, tmp: pathlib.Path,
            final: pathlib.Path) -> Optional[str]:
    """Rank 0: rename `tmp` to `final`, then rewrite the tracker (the commit point)."""
    try:
        if not (tmp / "metadata.json").is_file():
            raise OSError(f"{tmp} has no metadata.json after the save")
        if final.exists():  # a checkpoint of the same iteration from an earlier run
            old = root / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        tracker_tmp = root / f".{TRACKER_FILE}.tmp"
        with open(tracker_tmp, "w") as f:
            f.write(f"{iteration}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tracker_tmp, root / TRACKER_FILE)  # the commit point
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    return None


def _describe_save_error(err: BaseException) -> str:
    """One line for a failed `dist_checkpointing.save`. torch's CheckpointException (a
    BaseException) carries the failing ranks' exceptions on the coordinator only."""
    failures = getattr(err, "failures", None)
    if isinstance(err, CheckpointException) and isinstance(failures, dict):
        if not failures:
            return "writing failed on another rank (the coordinator's error has the details)"
        parts = []
        for rank, failure in sorted(failures.items()):
            exc = failure[0] if isinstance(failure, tuple) else failure
            parts.append(f"writing failed on rank {rank} ({type(exc).__name__}: {exc})")
        return "; ".join(parts)
    return f"{type(err).__name__}: {err}"


def _agree_on_save(local_error: Optional[str], root: pathlib.Path, iteration: int,
                   incomplete: pathlib.Path) -> None:
    """Collective: CheckpointSaveError on every rank if any rank failed (rank 0 removes the
    incomplete folder first, best effort: with a full disk that gives the space back)."""
    err = comm.errors_on_ranks(local_error)
    if err is not None:
        if comm.is_global_rank_zero() and incomplete.name.startswith("."):
            shutil.rmtree(incomplete, ignore_errors=True)
        latest = _find_quietly(root)
        raise CheckpointSaveError(
            f"the checkpoint of iteration {iteration} could not be written ({err}); the "
            f"incomplete {incomplete} is not a checkpoint"
            + (" and was removed" if incomplete.name.startswith(".") else " (not committed)")
            + (f"; the latest complete checkpoint is {latest}, intact: resume with --load "
               f"{root}" if latest is not None else "; there is no complete checkpoint in "
               f"{root}")) from None


def _find_quietly(root: str | os.PathLike) -> Optional[pathlib.Path]:
    """`find_checkpoint`, None instead of an error."""
    try:
        return find_checkpoint(root)
    except CheckpointError:
        return None


def load_checkpoint(path: str | os.PathLike, model_chunks, optimizer, *, load_optim: bool,
                    load_rng: bool) -> dict:
    """Collective: restore model (and optimizer, RNG) from the checkpoint folder `path`; returns
    the trainer state. Call `check_compatible` first; RNG states are restored only when the
    checkpoint has this run's parallel split (pass `load_rng=False` otherwise)."""
    from megatron.core import dist_checkpointing

    trainer_state = read_trainer_state(path)
    metadata = dict(trainer_state["sharded_state_dict_metadata"])
    state = cs.model_sharded_state(model_chunks, metadata)
    if load_optim:
        cs.init_empty_torch_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True,
                                                          metadata=metadata)
    if load_rng:
        state[cs.RNG_KEY] = cs.rng_sharded_object(None)
    loaded = dist_checkpointing.load(state, str(path))

    cs.load_model_state(model_chunks, loaded)
    if load_optim:
        # no_grad: megatron-core 0.16 `load_parameter_state_from_dp_reshardable` copies into views
        # of fp32 parameters (the distributed optimizer's main shards) without it.
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        cs.restore_torch_adam_steps(optimizer)
    else:
        optimizer.reload_model_params()  # fp32 main weights from the loaded model weights
    if load_rng:
        from megatron.core import parallel_state as ps

        cs.set_rng_state(loaded[cs.RNG_KEY][ps.get_data_parallel_rank(with_context_parallel=True)])
    return trainer_state
