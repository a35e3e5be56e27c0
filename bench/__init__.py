"""Benchmarks: each script starts what it needs, runs one workload and prints a table."""
