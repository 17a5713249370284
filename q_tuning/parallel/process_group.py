"""Joining the default process group, the one way every entry point does it.

Public API:
    join_process_group(*, cuda, backend=None, timeout_minutes=10.0) -> bool
    leave_process_group(created) -> None
    is_backend_error(err) -> bool
    free_port(host="127.0.0.1") -> int
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

__all__ = ["free_port", "is_backend_error", "join_process_group", "leave_process_group"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (for a rendezvous about to be created)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def join_process_group(*, cuda: bool, backend: str | None = None,
                       timeout_minutes: float = 10.0) -> bool:
    """Join (or, for a plain single-process run, create) the default process group; returns
    whether this call created it (its creator destroys it at the end).

    torchrun / the Ray launcher set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; an
    already initialised group (tests, an embedding program) is used as it is. With `cuda` the
    device is LOCAL_RANK modulo the visible GPUs (Ray shows each actor one, torchrun a node's
    all); without, `mcore_cpu` is installed, which megatron-core needs on CPU.
    """
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    else:
        import mcore_cpu

        torch._dynamo.config.disable = True  # megatron's jit warm-ups would query CUDA
        mcore_cpu.install()
    if dist.is_initialized():
        return False
    if "RANK" not in os.environ:  # a plain `python -m ...`: one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group(backend or ("nccl" if cuda else "gloo"),
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return True


def leave_process_group(created: bool) -> None:
    """Destroy the default process group when `join_process_group` created it (its return
    value); a group someone else created is theirs to destroy."""
    if created:
        dist.destroy_process_group()


def is_backend_error(err: BaseException) -> bool:
    """Whether `err` is torch.distributed's error for a failed collective (DistBackendError,
    where this torch has it)."""
    return isinstance(err, getattr(dist, "DistBackendError", ()))
