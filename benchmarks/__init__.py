"""distserve's benchmarks: each prints a table and writes JSON (and plots) under
benchmarks/results. Run them from the repository root as modules: `python -m benchmarks.NAME`."""
