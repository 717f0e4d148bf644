"""Benchmarks: `make bench` runs them all against real processes and writes BENCHMARKS.md."""
