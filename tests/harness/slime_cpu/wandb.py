"""Test-only stub of wandb: slime imports it at module load; the CPU test never passes --use-wandb."""

run = None


def _off(*args, **kwargs):
    raise RuntimeError("wandb stub: --use-wandb is not supported by the CPU test")


init = log = finish = define_metric = _off
