"""Q-Tuning in unmodified slime (THUDM/slime), through slime's own hooks.

Two ways in (docs/slime.md):
- hooks only: `--rollout-data-postprocess-path q_tuning.slime.postprocess` and the settings in the
  YAML of `--custom-config-path` (`enable_q_tuning: true`, `q_tuning_sample_keep_ratio: 0.25`,
  ...; optionally `q_tuning_postprocess_chain: my.module.hook` to run your own hook after ours);
- the launcher: `python -m q_tuning.slime train.py <slime flags> --enable-q-tuning
  --q-tuning-...` registers the flags with slime's parser, installs the hook (chaining any
  `--rollout-data-postprocess-path` of yours after it), validates at start-up and runs the script.

Public API:
    postprocess(args, rollout_id, rollout_data)   slime's postprocess hook
    check_args(args) -> QTuningConfig             the refusals and settings, naming the setting
    megatron_init(args)                           optional `--custom-megatron-init-path`: the
                                                  same checks when the actor starts
    set_model(model_chunks)                       when the hook cannot find the actor's model
    install(), main(argv)                         the launcher (q_tuning.slime.launcher)

slime itself is imported only by the launcher, when it runs; this package imports without it.
"""

from q_tuning.slime.hook import (HOOK_PATH, QTuningSlimeError, check_args, find_model,
                                 postprocess, set_model)


def megatron_init(args) -> None:
    """For `--custom-megatron-init-path q_tuning.slime.megatron_init`: refuse bad settings when
    the actor initialises (every rank), not at the first rollout."""
    check_args(args)


def install():
    from q_tuning.slime.launcher import install as _install

    return _install()


def main(argv=None) -> int:
    from q_tuning.slime.launcher import main as _main

    return _main(argv)


__all__ = ["HOOK_PATH", "QTuningSlimeError", "check_args", "find_model", "install", "main",
           "megatron_init", "postprocess", "set_model"]
