"""Flax NNX models: plain constructor arguments in, logits out; no diffusion, training or config."""

from prime_jax.models.dit import DiT, flops_per_token, param_counts, preset
from prime_jax.models.embed import SubtokenEmbed
from prime_jax.models.unet import UNet

__all__ = ['DiT', 'SubtokenEmbed', 'UNet', 'flops_per_token', 'param_counts', 'preset']
