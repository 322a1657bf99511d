"""CUR k-NN search for a trained cross-encoder (see README.md)."""
