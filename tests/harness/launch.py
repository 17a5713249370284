"""Run a function on N gloo processes with a hard timeout, so a distributed hang fails the test."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import traceback
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp

from q_tuning.parallel.process_group import free_port


def run_killable(cmd: list[str], *, cwd, env: dict, timeout: float
                 ) -> tuple[int | None, str]:
    """Run `cmd` in its own session; (exit status, output). After `timeout` seconds the whole
    process group is killed and the status is None: a hang fails a test, never blocks it."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out
    return proc.returncode, out


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        # Plain pickle copies tensors into the message: torch's shared-memory handles would
        # vanish with this process before the parent reads them.
        result = pickle.dumps(fn(rank, world_size, *args))
        queue.put((rank, "ok", result))
    except BaseException:  # report every failure to the parent, which raises it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 300.0) -> list:
    """Call `fn(rank, world_size, *args)` on `world_size` spawned gloo processes.

    `fn` must be importable (module level). Returns the per-rank results, ordered by rank. Raises
    RuntimeError with the child's traceback if a rank fails, or TimeoutError (after killing every
    child) if the ranks do not all finish within `timeout` seconds.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        import queue as queue_mod
        import time
        deadline = time.monotonic() + timeout
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{fn.__name__} on {world_size} processes did not finish within "
                                   f"{timeout:.0f}s (ranks done: {sorted(results)})")
            try:
                rank, status, payload = queue.get(timeout=min(remaining, 5.0))
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)
                        and i not in results]
                if dead:
                    raise RuntimeError(f"rank(s) {dead} of {fn.__name__} died with exit codes "
                                       f"{[procs[i].exitcode for i in dead]}")
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} of {fn.__name__} failed:\n{payload}")
            results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world_size)]
