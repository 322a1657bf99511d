"""Accelerator benchmarks: run.sh, benchmark.py (README.md)."""
