"""Test-only: every Python process started with this directory on PYTHONPATH (torchrun and its
workers) runs Megatron-LM on CPU when Q_TUNING_MEGATRON_LM_CPU=1. Set up by
tests/harness/megatron_lm.py `launch_env()`, which explains each shim; never used in production.

Self-contained on purpose: Megatron-LM's checkout has its own `tests` package, which shadows ours.
"""

import os
import sys

if os.environ.get("Q_TUNING_MEGATRON_LM_CPU") == "1" and sys.version_info < (3, 12):
    # Megatron-LM core_v0.19.0's megatron/training/models/gpt.py imports typing.override (3.12+).
    # Test-only: on Python 3.11 the typing_extensions backport stands in for it.
    import typing as _typing

    import typing_extensions as _typing_extensions

    if not hasattr(_typing, "override"):
        _typing.override = _typing_extensions.override

if os.environ.get("Q_TUNING_MEGATRON_LM_CPU") == "1":
    import torch.utils.cpp_extension as _cpp_extension

    import mcore_cpu

    # megatron/training/initialize.py asserts torch.cuda.is_available().
    mcore_cpu.install(pretend_cuda_available=True)
    # megatron/legacy/fused_kernels/__init__.py load() runs `$CUDA_HOME/bin/nvcc -V` even when it
    # builds nothing; a CPU torch leaves cpp_extension.CUDA_HOME unset.
    if os.environ.get("CUDA_HOME") and _cpp_extension.CUDA_HOME is None:
        _cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]

    if os.environ.get("Q_TUNING_HARNESS_LOG_TOKENS") == "1":
        # Print each training step's loss-token count (global, after finalize_model_grads's
        # all-reduce over DP x CP), so tests can check that a step trains on the kept tokens only.
        # megatron/training/training.py imports this name after we replace it.
        import functools as _functools

        import megatron.core.distributed as _mcore_distributed

        _finalize = _mcore_distributed.finalize_model_grads

        @_functools.wraps(_finalize)
        def _finalize_and_log(model, num_tokens=None, *args, **kwargs):
            out = _finalize(model, num_tokens, *args, **kwargs)
            import torch.distributed as _dist

            if num_tokens is not None and _dist.get_rank() == 0:
                print(f"[harness] trained tokens: {int(num_tokens)}", flush=True)
            return out

        _mcore_distributed.finalize_model_grads = _finalize_and_log
