"""The trainer (`q-tuning-train`): entry point, flags, presets, loop, components, metrics, Ray."""
