"""Test-only stub of torch_memory_saver (CUDA memory pausing for colocated training): slime's
actor imports it at module load and calls it only with --offload-train, which the CPU test never
sets."""

import contextlib


class _TorchMemorySaver:
    _impl = None

    def pause(self, *args, **kwargs):
        raise RuntimeError("torch_memory_saver stub: --offload-train is not supported on CPU")

    resume = pause

    def disable(self):
        return contextlib.nullcontext()

    def region(self, *args, **kwargs):
        return contextlib.nullcontext()


torch_memory_saver = _TorchMemorySaver()
