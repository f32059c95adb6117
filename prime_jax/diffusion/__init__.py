"""The pure functional core of MDM-Prime: jax, jax.numpy, numpy and the standard library only."""
