"""Learning-to-hash training (BPR, JPQ) evaluated as compressed indexes
(experiments/lth/README.md)."""
