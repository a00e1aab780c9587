"""Benchmarks: kernels, end-to-end merges, roofs (see bench/README.md)."""
