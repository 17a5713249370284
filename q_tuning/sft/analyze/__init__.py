"""`q-tuning-analyze`: where a data set falls on the EU plane: entry point, statistics, outputs."""
