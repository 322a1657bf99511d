"""NNX modules only: encoders, heads and the key-value memory."""
