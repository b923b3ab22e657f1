"""Layer 2: figures and plot data for `dvc plots` and the report."""
