"""Passes that run megatron-core's schedules: scoring, the gradient step, micro-batches."""
