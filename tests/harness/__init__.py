"""Test infrastructure (not product code): multi-process gloo launching and megatron-core on CPU."""
