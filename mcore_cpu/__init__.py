"""Run megatron-core on CPU with the gloo backend (environment support, not Q-Tuning code).

Public API:
    install(*, pretend_cuda_available=False) -> None
        Neutralise megatron-core's CUDA hard-codes in this process. Idempotent (a marker on
        `torch.cuda`), logs one line, never applied at import. Call it before building a model
        and before `parallel_state.initialize_model_parallel`, in every process (each spawned or
        torchrun worker), and again in any other thread that runs megatron code (see below).
    installed() -> bool
        Whether `install()` has run in this process.

Tested against megatron-core 0.16.1 with a CPU build of torch 2.13: local-spec `GPTModel` at
TP/PP/virtual-PP/DP, `get_forward_backward_func()` (forward only and training),
`DistributedDataParallel` (with and without `overlap_grad_reduce`), `get_megatron_optimizer`
(Adam, gradient clipping on; fp32 or bf16 params; plain or distributed optimizer),
`finalize_model_grads` and `optimizer.step()`.

What is patched, and why (one private `_patch_*` function each):
- `torch.cuda.current_device` -> 0 (megatron passes it as `device=` in ~100 places: the global
  memory buffer in `utils.py`, rotary embeddings, tensor-parallel layers and mappings).
- a `torch.overrides.TorchFunctionMode`, pushed once in the installing thread, that rewrites every
  CUDA device argument (`"cuda"`, `"cuda:N"`, `torch.device("cuda")`, a bare int) to `cpu`, turns
  `pin_memory=True` off, and makes `Tensor.cuda()`/`Tensor.pin_memory()` return the tensor
  (the `device="cuda"` factories of `pipeline_parallel/schedules.py`, `p2p_communication.py`,
  `optimizer/clip_grads.py`, `utils.local_multi_tensor_l2_norm`, `transformer/utils.py`'s default
  causal mask, the DDP buffers...).
- `torch.cuda.synchronize`, `set_device`, `empty_cache`, `memory_*` statistics: no-ops / zeros.
- `torch.cuda.Stream`, `Event`, `stream()`, `current_stream()`, `default_stream()`,
  `set_stream`: no-op stand-ins (`distributed/param_and_grad_buffer.py` waits on streams;
  timers record events; `Event.elapsed_time` measures host time).
- the CUDA RNG (`tensor_parallel/random.py`: `_get_cuda_rng_state`, `_set_cuda_rng_state`,
  and `torch.cuda.get_rng_state`/`set_rng_state`/`manual_seed`/`manual_seed_all` used by
  `CudaRNGStatesTracker.add`, `model_parallel_cuda_manual_seed` and the dropout/init `fork`):
  mapped onto torch's CPU default generator, which is what CPU ops draw from. The tracker's
  "CPU RNG state changed within GPU RNG context" warning is then expected and filtered.
- gradient clipping (`optimizer/clip_grads.py` `clip_grad_by_total_norm_fp32` asserts
  `torch.cuda.FloatTensor` grads): replaced by a CPU version with the same semantics, also where
  `optimizer/optimizer.py` imported it.
- the parameter type checks of `Float16OptimizerWithFloat16Params.__init__` (bf16 params) and
  `DistributedOptimizer.__init__` (`param.type() == 'torch.cuda.FloatTensor'`...): inside those
  two constructors only, `Tensor.type()` names a CPU tensor as the CUDA type.
- only with `pretend_cuda_available=True` (for Megatron-LM's own training loop, which asserts
  CUDA at initialisation; megatron-core itself does not need it): `torch.cuda.is_available` ->
  True, `device_count` -> 1, `get_device_properties`/`get_device_capability` -> a Hopper-like
  stand-in. Leave it off otherwise: torch's own code (autocast, checkpointing) then stays on its
  CPU paths.

What the caller must do (cannot be patched here):
- run with `TORCHDYNAMO_DISABLE=1` in the environment (JIT warm-ups otherwise query CUDA);
- use the local layer spec (`get_gpt_layer_local_spec`); transformer-engine and apex need CUDA;
- build configs with `use_cpu_initialization=True`, `gradient_accumulation_fusion=False`,
  `masked_softmax_fusion=False`, `bias_activation_fusion=False`, `bias_dropout_fusion=False`,
  `persist_layer_norm=False`, and fp32 or bf16 params (no fp16 loss-scaling kernels);
- pass an explicit boolean attention mask, `[b, 1, s, s]`, True = masked out (Megatron's
  convention), for anything other than a plain causal mask; packed sequences (`PackedSeqParams`,
  THD) need transformer-engine, so on CPU express them as a block-diagonal causal mask;
- context parallelism needs a core attention other than the local `DotProductAttention`, which
  refuses CP (see `tests/harness/megatron.py` for a test-only one);
- torch-function modes are per thread: a thread other than the installing one that runs
  megatron code must call `install()` itself (cheap: it only pushes the mode there). Autograd's
  CPU backward runs on the calling thread, so hooks in backward are covered.
- the mode costs about 3 us per torch call: fine for tests and tiny CPU runs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
import types
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["install", "installed"]

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")
_MARKER = "_mcore_cpu_installed"
_THREAD = threading.local()


def installed() -> bool:
    """Whether `install()` has run in this process."""
    return bool(getattr(torch.cuda, _MARKER, False))


def install(*, pretend_cuda_available: bool = False) -> None:
    """Patch torch.cuda and megatron-core so that megatron-core runs on CPU (see module doc)."""
    _push_cpu_device_mode()  # per thread
    if not installed():
        _patch_current_device()
        _patch_sync_and_memory()
        _patch_streams_and_events()
        _patch_cuda_rng()
        _patch_grad_clipping()
        _patch_param_type_checks()
        setattr(torch.cuda, _MARKER, True)
        logger.info("mcore_cpu: megatron-core CUDA hard-codes redirected to CPU (torch %s)",
                    torch.__version__)
    if pretend_cuda_available and not getattr(torch.cuda, _MARKER + "_pretend", False):
        _patch_pretend_cuda_available()
        setattr(torch.cuda, _MARKER + "_pretend", True)
        logger.info("mcore_cpu: torch.cuda.is_available() now answers True")


# --- devices -------------------------------------------------------------------------------------

def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # a bare index means an accelerator
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CpuDeviceMode(TorchFunctionMode):
    """Rewrite CUDA device arguments of any torch function or tensor method to CPU.

    While the class attribute `cuda_type_names` > 0 (inside the optimizer constructors wrapped
    by `_patch_param_type_checks`), `Tensor.type()` names CPU tensors as CUDA ones.
    """

    cuda_type_names = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and self.cuda_type_names and len(args) == 1 and not kwargs:
            name = func(*args)  # e.g. 'torch.FloatTensor'
            on_cpu = args[0].device.type == "cpu"
            return name.replace("torch.", "torch.cuda.", 1) if on_cpu else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


def _patch_current_device() -> None:
    # megatron/core/utils.py GlobalMemoryBuffer.get_tensor, rotary_pos_embedding.py,
    # tensor_parallel/{layers,mappings}.py ...: device=torch.cuda.current_device().
    torch.cuda.current_device = lambda: 0


def _push_cpu_device_mode() -> None:
    # pipeline_parallel/schedules.py (total_num_tokens), p2p_communication.py (recv buffers),
    # optimizer/clip_grads.py, utils.local_multi_tensor_l2_norm, transformer/utils.py
    # get_default_causal_mask, distributed/param_and_grad_buffer.py: device="cuda" factories.
    if getattr(_THREAD, "mode", None) is None:
        _THREAD.mode = _CpuDeviceMode()
        _THREAD.mode.__enter__()  # stays on this thread's mode stack for the thread's life


def _patch_sync_and_memory() -> None:
    # parallel_state.py, timers.py, distributed_data_parallel.py: torch.cuda.synchronize();
    # memory reports of training loops: torch.cuda.memory_* / max_memory_*.
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.set_device = lambda device: None
    torch.cuda.empty_cache = lambda: None
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved",
                 "max_memory_reserved"):
        setattr(torch.cuda, name, lambda device=None: 0)
    torch.cuda.reset_peak_memory_stats = lambda device=None: None
    torch.cuda.reset_max_memory_allocated = lambda device=None: None
    torch.cuda.memory_stats = lambda device=None: {}
    torch.cuda.mem_get_info = lambda device=None: (0, 0)


class _Stream:
    """No-op stand-in for torch.cuda.Stream: CPU work is already ordered."""

    def __init__(self, device=None, priority=0, **kwargs):
        self.device = _CPU

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        event = event or _Event()
        event.record(self)
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _Event:
    """Stand-in for torch.cuda.Event; `elapsed_time` is host time in milliseconds."""

    def __init__(self, enable_timing=False, blocking=False, interprocess=False, **kwargs):
        self._t = None

    def record(self, stream=None) -> None:
        self._t = time.perf_counter()

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_Event") -> float:
        return (end._t - self._t) * 1000.0


_DEFAULT_STREAM = _Stream()


def _patch_streams_and_events() -> None:
    # distributed/distributed_data_parallel.py (communication_stream), param_and_grad_buffer.py
    # (wait_stream / torch.cuda.stream), timers.py and utils.py (torch.cuda.Event).
    torch.cuda.Stream = _Stream
    torch.cuda.Event = _Event
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    torch.cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    torch.cuda.set_stream = lambda stream: None


# --- RNG -----------------------------------------------------------------------------------------

def _cpu_get_rng_state(device=None, clone=False, graph_safe=False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed) -> None:
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, which would recurse here.
    torch.default_generator.manual_seed(int(seed))


class _DropForkWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_cuda_rng() -> None:
    # megatron/core/tensor_parallel/random.py: _get_cuda_rng_state / _set_cuda_rng_state (used by
    # CudaRNGStatesTracker.fork), torch.cuda.get_rng_state / manual_seed (CudaRNGStatesTracker.add,
    # model_parallel_cuda_manual_seed). On CPU the "CUDA" generator is the CPU default generator.
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.get_rng_state = _cpu_get_rng_state
    torch.cuda.random.get_rng_state = _cpu_get_rng_state
    torch.cuda.set_rng_state = _cpu_set_rng_state
    torch.cuda.random.set_rng_state = _cpu_set_rng_state
    torch.cuda.manual_seed = _cpu_manual_seed
    torch.cuda.manual_seed_all = _cpu_manual_seed
    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state
    # The tracker warns when the CPU state moves inside fork(); here that is the point.
    logging.getLogger(mcore_random.__name__).addFilter(_DropForkWarning())


# --- optimizer -----------------------------------------------------------------------------------

def _cpu_clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm,
                                      use_decoupled_grad: bool = False) -> None:
    """megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32 without its CUDA asserts."""
    from megatron.core.utils import to_local_if_dtensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = []
    for param in parameters:
        grad = getattr(param, attr, None)
        if grad is not None:
            assert grad.dtype in (torch.float32, torch.bfloat16), f"fp32/bf16 grad: {grad.dtype}"
            grads.append(to_local_if_dtensor(grad).detach())
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _patch_grad_clipping() -> None:
    # megatron/core/optimizer/clip_grads.py clip_grad_by_total_norm_fp32 (asserts
    # 'torch.cuda.FloatTensor'), also bound by name in megatron/core/optimizer/optimizer.py.
    from megatron.core.optimizer import clip_grads, optimizer

    _cpu_clip_grad_by_total_norm_fp32.__wrapped__ = clip_grads.clip_grad_by_total_norm_fp32
    clip_grads.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32


def _with_cuda_type_names(init):
    @functools.wraps(init)
    def wrapper(*args, **kwargs):
        _CpuDeviceMode.cuda_type_names += 1
        try:
            return init(*args, **kwargs)
        finally:
            _CpuDeviceMode.cuda_type_names -= 1
    return wrapper


def _patch_param_type_checks() -> None:
    # megatron/core/optimizer/optimizer.py Float16OptimizerWithFloat16Params.__init__ and
    # optimizer/distrib_optimizer.py DistributedOptimizer.__init__ (through
    # _build_model_and_main_param_groups) accept only params whose .type() is
    # 'torch.cuda.{Float,Half,BFloat16}Tensor'; inside them only, CPU tensors answer so.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for cls in (Float16OptimizerWithFloat16Params, DistributedOptimizer):
        cls.__init__ = _with_cuda_type_names(cls.__init__)


# --- opt-in --------------------------------------------------------------------------------------

def _patch_pretend_cuda_available() -> None:
    # Megatron-LM megatron/training/initialize.py asserts torch.cuda.is_available() and reads
    # device properties; megatron-core alone does not need this.
    props = types.SimpleNamespace(major=9, minor=0, name="cpu (mcore_cpu stand-in)",
                                  total_memory=0, multi_processor_count=1)
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.get_device_properties = lambda device=None: props
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
