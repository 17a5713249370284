"""Checkpoints: writing and reading them (files), what they hold (state), when to save (policy)."""
