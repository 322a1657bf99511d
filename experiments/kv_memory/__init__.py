"""Discrete key-value bottleneck experiments (see README.md)."""
