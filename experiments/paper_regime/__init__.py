"""The paper's regime (issue 29): LoRA SFT on a general instruction mix, scored on benchmarks it
was not trained for. `prepare.py` builds the data, `grid.py` runs the grid, `tables.py` the tables."""
