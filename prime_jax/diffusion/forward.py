"""Forward process: diffusion times and independent sub-token masking (method.md §2.1).

Dimension key: B batch, S token grid, K sub-tokens per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prime_jax.diffusion import schedules as schedules_lib


def sample_times(key: jax.Array, batch: int, *, eps: float = 1e-3,
                 antithetic: bool = True) -> jax.Array:
  """t (B,) in [eps, 1).

  antithetic=True is the reference's stratified sampler: one t in each of the B strata
  [eps + (1-eps) i/B, eps + (1-eps)(i+1)/B), in order (s_i = (u_i + i)/B).
  """
  u_B = jax.random.uniform(key, (batch,))
  if not antithetic:
    return (1.0 - eps) * u_B + eps
  i_B = jnp.arange(batch, dtype=u_B.dtype)
  t_B = eps + (1.0 - eps) * (u_B + i_B) / batch
  # Rounding can push t onto a stratum edge: keep every t one float step inside its own stratum
  # (edges are themselves rounded, hence the step on both sides). The bias is ~1e-7 of a stratum.
  lo_B = eps + (1.0 - eps) * i_B / batch
  hi_B = eps + (1.0 - eps) * (i_B + 1.0) / batch
  lo_B = jnp.nextafter(lo_B, jnp.inf)
  hi_B = jnp.nextafter(jnp.nextafter(hi_B, 0.0), 0.0)
  return jnp.clip(t_B, lo_B, hi_B)

def _expand(t, ndim: int):
  t = jnp.asarray(t)
  return t.reshape(t.shape + (1,) * (ndim - t.ndim))


def mask(key: jax.Array, y0: jax.Array, t: jax.Array, *, schedule, mask_id: int) -> jax.Array:
  """Replaces every sub-token of y0 (B, *S, K) by mask_id independently with prob 1 - alpha(t).

  t is a scalar or (B,) and is shared by all sub-tokens of a sequence.
  """
  schedule = schedules_lib.as_schedule(schedule)
  p_mask = _expand(schedule.mask_prob(t), y0.ndim)
  masked = jax.random.uniform(key, y0.shape) < p_mask
  return jnp.where(masked, jnp.asarray(mask_id, y0.dtype), y0)
