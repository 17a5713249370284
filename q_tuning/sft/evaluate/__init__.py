"""Held-out evaluation (`q-tuning-eval`): entry point, rows, batched greedy decoding."""
