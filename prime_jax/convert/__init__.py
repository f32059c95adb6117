"""Converting the authors' PyTorch checkpoints to prime_jax and back (docs/official.md)."""
