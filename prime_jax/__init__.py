"""prime_jax: MDM-Prime (masked diffusion with partial masking) in JAX and Flax NNX."""
