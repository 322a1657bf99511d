"""Vector compression baselines (experiments/compression/README.md)."""
