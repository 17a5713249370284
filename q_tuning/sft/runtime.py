"""Runtime utilities of the command-line tools: the device, the process group, expected warnings,
seeds, progress lines for long calls, and the SIGTERM flag of `--exit-signal-handler`.

Public API:
    cuda_requested(device) -> bool         ("auto", "cpu" or "cuda")
    use_cuda(device) -> bool               (the same, a ValueError when CUDA is absent)
    init_distributed(args) -> bool         (True when this call created the process group)
    quiet_expected_warnings(device)        (before megatron-core is imported)
    seed_everything(seed)
    progress(what, total=None, **kw) -> Progress   (q_tuning.observe.progress) into the log
    ExitSignal             the flag SIGTERM sets; the trainer agrees on it once per iteration
"""

from __future__ import annotations

import argparse
import logging
import random
import signal
import threading
import warnings

import numpy as np
import torch

from q_tuning.observe.progress import Progress
from q_tuning.parallel.process_group import join_process_group

logger = logging.getLogger("q_tuning.train")

__all__ = ["ExitSignal", "cuda_requested", "init_distributed", "progress",
           "quiet_expected_warnings", "seed_everything", "use_cuda"]


def cuda_requested(device: str) -> bool:
    """Whether `--device` asks for CUDA ("auto" does when a device is there); never raises."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def use_cuda(device: str) -> bool:
    """`cuda_requested`, with a ValueError naming the flag when CUDA is asked for and absent."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu)")
    return cuda_requested(device)


def init_distributed(args: argparse.Namespace) -> bool:
    """Join (or for one process create) the default process group (`join_process_group`);
    returns whether this call created it."""
    return join_process_group(cuda=use_cuda(args.device), backend=args.distributed_backend,
                              timeout_minutes=args.distributed_timeout_minutes)


def quiet_expected_warnings(device: str) -> None:
    """Silence megatron-core warnings that say nothing to act on here; call before importing it.

    On CPU its fallbacks to pure-PyTorch kernels ("Transformer Engine and Apex are not
    installed") are the plan; on GPU they stay visible. "full scope is deprecated" comes from
    megatron-core 0.16's own TransformerConfig default.
    """
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    if not cuda_requested(device):
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        warnings.filterwarnings("ignore", message="Apex is not installed")


def seed_everything(seed: int) -> None:
    """Python, numpy, torch and megatron's model-parallel RNG trackers."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def progress(what: str, total: int | None = None, **kwargs) -> Progress:
    """`q_tuning.observe.progress.Progress` whose first and last lines go to the trainer's log
    (stdout and <output-dir>/train.log): `with progress("loading the tokenizer"): ...` for an
    opaque call (start / still running / done), `total=` and `.update()` for a counted one."""
    return Progress(what, total, log=logger, **kwargs)


class ExitSignal:
    """Megatron-LM's DistributedSignalHandler (`--exit-signal-handler`): the handler only sets a
    flag; the trainer all-reduces it once per iteration so that every rank stops after the same
    one. Signal handlers can be set in the main thread only; elsewhere (an embedding program's
    worker thread) this warns and does nothing."""

    def __init__(self, sig: signal.Signals = signal.SIGTERM):
        self.sig = sig
        self.received = False
        self._previous = None
        self.installed = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("--exit-signal-handler: not in the main thread, %s is not handled",
                           self.sig.name)
            return
        self._previous = signal.signal(self.sig, self._handle)
        self.installed = True

    def _handle(self, signum, frame) -> None:  # nothing else here: it interrupts any code
        self.received = True

    def restore(self) -> None:
        if self.installed:
            signal.signal(self.sig, self._previous)
            self.installed = False
