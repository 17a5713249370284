"""Q-Tuning for unmodified Megatron-LM scripts (`pretrain_gpt.py`, its `--sft` mode, forks of it).

Public API:
    python -m q_tuning.megatron_lm SCRIPT [SCRIPT FLAGS...]   (under torchrun)
        Runs SCRIPT as `__main__` after `install()`: its own flags plus ours
        (`--enable-q-tuning --q-tuning-sample-keep-ratio 0.25 ...`), nothing to edit.
    install() -> None
        For scripts you edit: call it before `pretrain(...)`. Idempotent, never applied on import.
    installed() -> bool
    add_q_tuning_args(parser) -> parser
        Megatron-LM's `extra_args_provider` signature; `install()` adds the flags by itself, so
        passing it to `pretrain(..., extra_args_provider=add_q_tuning_args)` is optional.

Tested with Megatron-LM tags `core_v0.16.1` and `core_v0.19.0` and slime's pinned commit
`1dcf0dafa884` (`patch.TESTED`; docs/compatibility.md). What `install()` patches and how the hook
points are found: `patch.py`. Without `--enable-q-tuning` both patches hand back Megatron-LM's own
objects: the run is unchanged. With it, a configuration the adapter cannot honour
(`step.unsupported_reason`) stops the run at start-up on every rank
(`step.UnsupportedConfiguration`, naming the setting and the fix); it never trains without
Q-Tuning.
"""

from q_tuning.config import add_q_tuning_args
from q_tuning.megatron_lm.patch import TESTED, install, installed, main
from q_tuning.megatron_lm.step import UnsupportedConfiguration

__all__ = ["TESTED", "UnsupportedConfiguration", "add_q_tuning_args", "install", "installed",
           "main"]
