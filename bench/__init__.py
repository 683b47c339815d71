"""Benchmarks: run each as `python -m bench.NAME` from the repository root; results go to bench/results/."""
