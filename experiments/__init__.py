"""Experiments outside the package: the reproduction grids, their data generators and records."""
