"""Sub-token embedding: one shared (b+1) x (D/K) table, K vectors concatenated per token (method.md
§8.1).

Dimension key:
  B: batch    L: tokens    K: sub-tokens per token (ell)    D: model width    E: D / K
  V: input symbols, b + 1 (the b digit values and the mask symbol m = b)

Concatenating in digit order (most significant first) is the only place the digit index j enters
the model: the table is shared across j, so the slot in the concatenation tells digits apart.
With K = 1 and V = C + 1 this is MDLM's token embedding, mask row included.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from prime_jax.models.layers import Initializer, make_param, uniform_init


class SubtokenEmbed(nnx.Module):
  """Embeds y (B, L, K) to (B, L, D) through one shared table of V = num_symbols rows.

  By default the table is U(-1/sqrt(E), +1/sqrt(E)), which is what the text reference's
  kaiming_uniform(a=sqrt(5)) on a raw (V, E) parameter amounts to; `init` replaces it (the image
  UNet passes N(0, 1), PyTorch's nn.Embedding default).
  """

  def __init__(self, num_symbols: int, ell: int, dim: int, *, init: Optional[Initializer] = None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if ell < 1:
      raise ValueError(f'ell (sub-tokens per token) must be >= 1, got {ell}.')
    if dim % ell != 0:
      lower, upper = dim - dim % ell, dim + ell - dim % ell
      raise ValueError(
          f'Model width dim={dim} is not divisible by ell={ell}: each token concatenates ell '
          f'sub-token vectors of dim/ell features. Pick an ell that divides {dim}, or a width that '
          f'is a multiple of {ell} (e.g. {lower} or {upper}).')
    self.num_symbols = num_symbols
    self.ell = ell
    self.dim = dim
    sub_dim = dim // ell
    if init is None:
      init = uniform_init(1.0 / math.sqrt(sub_dim))
    self.table = make_param(init, ('vocab', 'embed'), (num_symbols, sub_dim), rngs, param_dtype)

  def __call__(self, y_BxLxK: jax.Array) -> jax.Array:
    if y_BxLxK.shape[-1] != self.ell:
      raise ValueError(f'Expected sub-tokens with a trailing axis of ell={self.ell}, got shape '
                       f'{y_BxLxK.shape}.')
    e_BxLxKxE = jnp.take(self.table[...], y_BxLxK, axis=0)
    return e_BxLxKxE.reshape(*y_BxLxK.shape[:-1], self.dim)
