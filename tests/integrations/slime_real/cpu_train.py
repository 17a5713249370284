"""slime's `train.py` loop for one torchrun process on CPU, without Ray (test-only).

    torchrun --nproc-per-node N tests/integrations/slime_real/cpu_train.py <slime flags>
    torchrun --nproc-per-node N -m q_tuning.slime tests/integrations/slime_real/cpu_train.py <slime flags>

Everything that trains is slime's own code, unmodified: `slime.utils.arguments.parse_args` (so
the launcher's wrap applies), `MegatronTrainRayActor.__init__`/`.init(args, "actor")`/`.train`
(-> `train_actor` -> the `--rollout-data-postprocess-path` hook -> `train`), and on the rollout
side `RolloutManager._get_rollout_data` (`--load-debug-rollout-data`),
`_convert_samples_to_train_data` and `_split_train_data_by_dp` (`build_dp_schedule`).

What replaces Ray, and nothing else:
- the actor class is instantiated directly in each torchrun process (Ray would make it a remote
  actor per GPU); `ray.get_gpu_ids()` answers this process's LOCAL_RANK;
- the rollout manager's methods run in every process on a manager object built without its
  `__init__` (which starts SGLang servers), with `ray.put`/`ray.get` as identity: each process
  computes the same per-DP-rank `Box`es (deterministic) and the actor picks its own, as it would
  from the object store.

Instrumentation (printed, read by tests/integrations/slime_real/harness.py): the tokens of every training
micro-batch `get_batch` builds (`[harness] forwarded`), the samples each rank trains after the
hook (`[harness] trained`), and with Q_TUNING_SLIME_REFERENCE=1 on a single process, the
decision of a plain `QTuningPruner` on the actor's model before the first step
(`[harness] reference`).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from unittest import mock


def _print(tag: str, payload) -> None:
    print(f"[harness] {tag} {json.dumps(payload)}", flush=True)


def _rollout_manager(args, train_parallel_config):
    """slime's RolloutManager (the class inside the Ray actor class) without its __init__."""
    from slime.ray.rollout import RolloutManager

    cls = RolloutManager.__ray_metadata__.modified_class
    manager = cls.__new__(cls)
    manager.args = args
    manager.custom_reward_post_process_func = None
    manager.custom_convert_samples_to_train_data_func = None
    manager.train_parallel_config = train_parallel_config
    return manager


def _count_forwarded(model_module) -> None:
    """Wrap `get_batch` of slime's training step to print each micro-batch's real tokens."""
    original = model_module.get_batch

    @functools.wraps(original)
    def get_batch(data_iterator, keys, *a, **kw):
        batch = original(data_iterator, keys, *a, **kw)
        from megatron.core import mpu

        _print("forwarded", {"dp_rank": mpu.get_data_parallel_rank(),
                             "tokens": sum(int(t.numel()) for t in batch["unconcat_tokens"])})
        return batch

    model_module.get_batch = get_batch


def _record_trained(actor) -> None:
    """Wrap the actor's postprocess hook (if any) to print what each rank trains after it."""
    from megatron.core import mpu

    hook = actor.rollout_data_postprocess
    if hook is None:
        return

    def recorded(args, rollout_id, rollout_data):
        hook(args, rollout_id, rollout_data)
        _print("trained", {
            "rollout_id": rollout_id, "dp_rank": mpu.get_data_parallel_rank(),
            "tp_rank": mpu.get_tensor_model_parallel_rank(),
            "sample_indices": [int(i) for i in rollout_data["sample_indices"]],
            "loss_masks": [m.tolist() for m in rollout_data["loss_masks"]],
            "total_lengths": [int(t.numel()) for t in rollout_data["tokens"]],
            "response_lengths": [int(r) for r in rollout_data["response_lengths"]],
            "num_microbatches": list(rollout_data["num_microbatches"])})

    actor.rollout_data_postprocess = recorded


def _reference(args, model, samples) -> None:
    """A plain QTuningPruner on the actor's model and the whole rollout (one process, global
    sample order), before any training step: what the hook's decision must equal."""
    import torch

    from q_tuning import QTuningConfig, QTuningPruner, RunShape

    tokens, masks = [], []
    for s in samples:
        prompt = len(s.tokens) - s.response_length
        tokens.append(torch.tensor(s.tokens, dtype=torch.long))
        masks.append(torch.tensor([0] * prompt + list(s.loss_mask), dtype=torch.long))
    longest = max(t.numel() for t in tokens)
    run = RunShape(micro_batch_size=args.micro_batch_size,
                   max_tokens_per_row=max(args.max_tokens_per_gpu, longest))
    pruner = QTuningPruner(QTuningConfig.from_args(args), run, log=False)
    new, _ = pruner.prune(model, {"tokens": tokens, "loss_masks": masks,
                                  "uid": [s.index for s in samples]})
    d = pruner.last_decision
    _print("reference", {"kept": sorted(int(u) for u in new["uid"]),
                         "loss_masks": {int(u): m.tolist() for u, m in zip(new["uid"],
                                                                             new["loss_masks"])},
                         "ppl": d.sample_ppl.tolist()})


def _allow_numpy_2() -> None:
    """slime's `initialize.init` asserts numpy 1.x, citing NVIDIA/Megatron-LM#1563 (Megatron's
    dataset code under numpy 2). The actor step uses no Megatron dataset, and this repository's
    Megatron-LM tests already train under numpy 2: that one assertion sees a version string
    starting with "1." (the `np` name of that module only; numpy itself is untouched)."""
    import types

    import numpy

    import slime.backends.megatron_utils.initialize as initialize

    proxy = types.SimpleNamespace(**{k: getattr(numpy, k) for k in ("random",)})
    proxy.__version__ = "1.x (numpy " + numpy.__version__ + ", see tests/integrations/slime_real/cpu_train.py)"
    initialize.np = proxy


def main() -> None:
    import ray

    from slime.utils.arguments import parse_args  # after the launcher's wrap, as train.py

    args = parse_args()

    import slime.backends.megatron_utils.model as model_module
    from slime.backends.megatron_utils.actor import MegatronTrainRayActor

    _allow_numpy_2()
    _count_forwarded(model_module)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    with mock.patch.object(ray, "get_gpu_ids", lambda: [int(os.environ["LOCAL_RANK"])]):
        actor = MegatronTrainRayActor(world, rank, os.environ["MASTER_ADDR"],
                                      int(os.environ["MASTER_PORT"]))
    start_rollout_id = actor.init(args, "actor")
    if args.start_rollout_id is None:  # as create_training_models does
        args.start_rollout_id = start_rollout_id
    start_rollout_id = args.start_rollout_id
    _record_trained(actor)
    manager = _rollout_manager(args, actor.train_parallel_config)
    identity = lambda x, *a, **kw: x  # noqa: E731
    with mock.patch.object(ray, "put", identity), mock.patch.object(ray, "get", identity):
        for rollout_id in range(start_rollout_id, args.num_rollout):
            samples, _ = manager._get_rollout_data(rollout_id)
            if rollout_id == start_rollout_id and os.environ.get("Q_TUNING_SLIME_REFERENCE") == "1":
                _reference(args, actor.model, samples)
            boxes = manager._split_train_data_by_dp(manager._convert_samples_to_train_data(samples))
            actor.train(rollout_id, boxes)
    _print("done", {"rank": rank})
    sys.stdout.flush()


if __name__ == "__main__":
    main()
