"""ANN benchmark at 1M x 384 (experiments/ann/README.md)."""
