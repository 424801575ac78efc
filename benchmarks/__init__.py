"""Micro-benchmarks: `python -m benchmarks.<name>`; results and commands in docs/benchmarks.md."""
