"""A CPU backend for slime's accelerator registry (`slime.utils.accelerator.register_accelerator`,
selected with SLIME_ACCELERATOR=cpu), test-only: slime ships CUDA and MUSA backends only.

Tensors go to `cpu`, the process group uses gloo, memory queries answer from host memory."""

from __future__ import annotations

import psutil
import torch

NAME = "cpu"


def _accelerator_class():
    from slime.utils.accelerator.base import Accelerator

    class CPUAccelerator(Accelerator):
        name = NAME
        device_type = "cpu"
        communication_backend_name = "gloo"

        def is_available(self) -> bool:
            return True

        def device(self, index=None) -> torch.device:
            return torch.device("cpu")

        def device_name(self, index=None) -> str:
            return "cpu"

        def set_device(self, index) -> None:
            pass

        def current_device(self) -> str:
            return "cpu"

        def device_count(self) -> int:
            return 1

        def synchronize(self, device=None) -> None:
            pass

        def current_stream(self, device=None):
            return None

        def empty_cache(self) -> None:
            pass

        def mem_get_info(self, device=None) -> tuple[int, int]:
            vm = psutil.virtual_memory()
            return vm.available, vm.total

        def memory_allocated(self, device=None) -> int:
            return 0

        def memory_reserved(self, device=None) -> int:
            return 0

        def distributed_device_id(self, index=None):
            return None  # gloo: no device binding

        def communication_backend(self, default: str = "nccl") -> str:
            return "gloo"

    return CPUAccelerator


def register() -> None:
    """Register the `cpu` backend (idempotent); select it with SLIME_ACCELERATOR=cpu."""
    from slime.utils import accelerator

    accelerator.register_accelerator(NAME, _accelerator_class(), lambda: True,
                                     communication_backends=("gloo",))
