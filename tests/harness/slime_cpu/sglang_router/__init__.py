"""Test-only stub of sglang_router: slime imports `RouterArgs` at module load (its argument
parser); the CPU test starts no router (--debug-train-only)."""
