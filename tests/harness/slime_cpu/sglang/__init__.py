"""Test-only stub of the parts of SGLang that slime's Megatron actor imports at module load
(slime/backends/megatron_utils/sglang.py). The CPU test runs no inference engine
(--debug-train-only): these names exist so the imports succeed; calling them is an error."""
