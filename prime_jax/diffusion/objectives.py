"""Training objectives and the valid likelihood bound (method.md §4).

Dimension key: B batch, S token grid, K sub-tokens per token, C token classes, b base.

`paper_loss` is the authors' objective: w(t) * -log p(x0 | y_t) with the token-level joint, counted
once per token. For K > 1 it is NOT an upper bound on -log p(x0) (method.md §4.3): at the exact
posterior
it undercounts by a weighted total correlation of the masked digits.

`nelbo` is the continuous-time NELBO of masked diffusion over the sub-token sequence: w(t) times the
sum over the MASKED digits j of a token of -log P(digit j | y_t), the digit's marginal under the
(filtered) joint. It upper-bounds the model's NLL and equals it at the exact posterior. Every
likelihood this project reports comes from it.

Both return per-token losses (B, *S); average them per original token with `token_mean`.
With K = 1 both equal MDLM's SUBS loss.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from prime_jax.diffusion import parameterization
from prime_jax.diffusion import schedules as schedules_lib


def _expand(t, ndim: int):
  t = jnp.asarray(t)
  return t.reshape(t.shape + (1,) * (ndim - t.ndim))


def _gather(x, index):
  return jnp.take_along_axis(x, index[..., None], axis=-1)[..., 0]


def token_nll(log_p: jax.Array, x0: jax.Array) -> jax.Array:
  """-log p(x0 | y_t) per token: (B, *S, C), (B, *S) -> (B, *S)."""
  return -_gather(log_p, x0.astype(jnp.int32))


def paper_loss(log_p: jax.Array, x0: jax.Array, t: jax.Array, *, schedule) -> jax.Array:
  """The authors' objective (method.md §4.1): w(t) * -log p(x0 | y_t), every token, joint over
  digits."""
  schedule = schedules_lib.as_schedule(schedule)
  nll = token_nll(log_p, x0)
  return _expand(schedule.weight(t), nll.ndim) * nll


def masked_digit_nll(log_p: jax.Array, x0: jax.Array, y_t: jax.Array, codec) -> jax.Array:
  """Sum over the masked digits j of a token of -log P(digit_j(x0) | y_t): (B, *S)."""
  log_marg = parameterization.digit_marginals(log_p, codec)  # (B, *S, K, b)
  digits = codec.encode(x0)  # (B, *S, K)
  nll_digits = -_gather(log_marg, digits)
  return jnp.sum(jnp.where(y_t == codec.mask_id, nll_digits, 0.0), axis=-1)


def nelbo(log_p: jax.Array, x0: jax.Array, y_t: jax.Array, t: jax.Array, codec, *,
          schedule) -> jax.Array:
  """The valid bound (method.md §4.3): w(t) * sum_{masked j} -log marginal_j(digit_j(x0)), per
  token."""
  schedule = schedules_lib.as_schedule(schedule)
  nll = masked_digit_nll(log_p, x0, y_t, codec)
  return _expand(schedule.weight(t), nll.ndim) * nll


def image_paper_loss(log_p: jax.Array, x0: jax.Array) -> jax.Array:
  """The reference image training loss (method.md §4.1): unweighted -log p(x0 | y_t) at every
  token."""
  return token_nll(log_p, x0)


def token_mean(loss: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Mean per ORIGINAL token (never per sub-token): sum(loss * w) / sum(w)."""
  if weights is None:
    return jnp.mean(loss)
  weights = weights.astype(loss.dtype)
  return jnp.sum(loss * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def nats_to_bits(nats):
  return nats / math.log(2.0)


def perplexity(mean_nll_nats):
  """exp of the per-token mean NLL in nats. From `nelbo` it is an upper bound on the model's PPL."""
  return jnp.exp(mean_nll_nats)


def bits_per_dim(mean_nll_nats):
  """Bits per token (per colour channel for images, where each channel is a token)."""
  return nats_to_bits(mean_nll_nats)


def fused_losses(logits: jax.Array, x0: jax.Array, y_t: jax.Array, t: jax.Array, codec, *,
                 schedule, carry_over: bool = True, with_nelbo: bool = True) -> dict:
  """`paper_loss` and `nelbo` straight from logits (B, *S, C), for training.

  Equal to log_probs -> paper_loss / nelbo, but with ONE exponential pass over (B, *S, C) and
  nothing of that size materialised except the exponentials kept for the backward pass: the
  joint needs log sum_c p_c, each digit marginal at the true digit a masked sum of the same p_c.
  (On CPU, exp over a 50257-way head costs as much as the head's matmul.)
  """
  schedule = schedules_lib.as_schedule(schedule)
  x0 = x0.astype(jnp.int32)
  z = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  if carry_over:
    z = jnp.where(parameterization.consistent(y_t, codec), z, parameterization.NEG_INF)
  m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  p = jnp.exp(z - m)
  log_total = jnp.log(jnp.sum(p, axis=-1))
  z_x0 = _gather(z, x0) - m[..., 0]
  log_joint = z_x0 - log_total
  w = _expand(schedule.weight(t), log_joint.ndim)
  out = {'paper': -w * log_joint}
  if with_nelbo:
    digits = codec.encode(x0)  # (B, *S, K)
    nll = jnp.zeros_like(log_joint)
    for j in range(codec.ell):
      same = jnp.asarray(codec.digits[:, j]) == digits[..., j:j + 1]
      s_j = jnp.sum(jnp.where(same, p, 0.0), axis=-1)
      # s_j >= p(x0); the max keeps the value finite if every term underflowed.
      log_marg = jnp.maximum(jnp.log(s_j), z_x0) - log_total
      nll = nll - jnp.where(y_t[..., j] == codec.mask_id, log_marg, 0.0)
    out['nelbo'] = w * nll
  return out
