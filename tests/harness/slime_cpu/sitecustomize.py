"""Test-only: every Python process started with this directory on PYTHONPATH (torchrun and its
workers) runs slime's Megatron actor on CPU when Q_TUNING_SLIME_CPU=1 (set by
tests/integrations/slime_real/harness.py `launch_env()`); never used in production.

1. the Megatron-LM CPU shims of tests/harness/megatron_lm_site/sitecustomize.py (megatron-core's
   CUDA hard-codes redirected to CPU, `torch.cuda.is_available()` answering True, as
   Megatron-LM's training code asserts it), run from here because a process imports only one
   `sitecustomize`;
2. slime's accelerator registry gets a `cpu` backend (cpu_accelerator.py), selected by
   SLIME_ACCELERATOR=cpu: `slime.backends.megatron_utils` selects the accelerator at import.
"""

import os

if os.environ.get("Q_TUNING_SLIME_CPU") == "1":
    import runpy as _runpy

    os.environ["Q_TUNING_MEGATRON_LM_CPU"] = "1"
    _here = os.path.dirname(os.path.abspath(__file__))
    _runpy.run_path(os.path.join(os.path.dirname(_here), "megatron_lm_site", "sitecustomize.py"))

    import cpu_accelerator as _cpu_accelerator

    _cpu_accelerator.register()
