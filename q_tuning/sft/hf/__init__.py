"""HF checkpoints: config and weight conversion to megatron-core, files, installed assets."""
