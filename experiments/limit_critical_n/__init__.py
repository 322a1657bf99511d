"""LIMIT: free-embedding critical n against the dimension (see README.md)."""
