"""Experiment code outside the installed package: data preparation, grids and their tables."""
