"""q_tuning.sft: a megatron-core SFT trainer with Q-Tuning (data, model import, training loop).

The trainer is separate from the plugin core (`q_tuning`): it only calls the public API above it.
"""
