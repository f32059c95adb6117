"""From network logits over the C token classes to log p(x0 | y_t) and per-digit marginals
(method.md §3).

Dimension key:
  B batch, S token grid, K sub-tokens per token, C token classes, b base, N = b**K codes.

The network predicts one categorical over the C valid token classes per token (the joint over its K
digits). The carry-over filter gives probability exactly 0 to classes whose digits contradict an
observed (unmasked) digit; for K = 1 it is MDLM's SUBS parameterization.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Inconsistent classes get this logit instead of -inf: exp() still underflows to exactly 0, and
# logsumexp over a group with no consistent class stays finite, so gradients never see inf - inf.
NEG_INF = -1e9


def consistent(y_t: jax.Array, codec) -> jax.Array:
  """(B, *S, C) bool: class c agrees with every observed digit of y_t (B, *S, K).

  Built digit by digit from one (C,) column of the digit table at a time, so no (B, *S, C, K)
  tensor is ever materialised.
  """
  ok = None
  for j in range(codec.ell):
    y_j = y_t[..., j:j + 1]
    col_C = jnp.asarray(codec.digits[:, j])
    ok_j = (y_j == codec.mask_id) | (col_C == y_j)
    ok = ok_j if ok is None else ok & ok_j
  return ok


def log_probs(logits: jax.Array, y_t: jax.Array, codec, *, carry_over: bool = True) -> jax.Array:
  """log p(x0 = c | y_t): (B, *S, C) logits and (B, *S, K) noisy digits -> (B, *S, C) log-probs.

  Computed in at least float32. With carry_over=False it is a plain log_softmax over C.
  """
  if logits.shape[-1] != codec.vocab_size:
    raise ValueError(f'logits have {logits.shape[-1]} classes, the codec has '
                     f'C = {codec.vocab_size}.')
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  if carry_over:
    logits = jnp.where(consistent(y_t, codec), logits, NEG_INF)
  return jax.nn.log_softmax(logits, axis=-1)


def to_code_order(log_p: jax.Array, codec) -> jax.Array:
  """(B, *S, C) class log-probs -> (B, *S, N) log-probs by code (invalid codes get NEG_INF)."""
  if codec.shuffled:
    # token_of_code >= C marks an invalid code: point it at a padding slot.
    padded = jnp.concatenate(
        [log_p, jnp.full(log_p.shape[:-1] + (1,), NEG_INF, log_p.dtype)], axis=-1)
    index = jnp.asarray(codec.token_of_code.clip(max=codec.vocab_size))
    return jnp.take(padded, index, axis=-1)
  pad = codec.num_codes - codec.vocab_size
  if pad == 0:
    return log_p
  return jnp.concatenate([log_p, jnp.full(log_p.shape[:-1] + (pad,), NEG_INF, log_p.dtype)], -1)


def digit_marginals(log_p: jax.Array, codec) -> jax.Array:
  """(B, *S, C) log p(x0 | y_t) -> (B, *S, K, b) log P(digit j = v | y_t).

  The code axis is reshaped into K axes of size b (most significant first), and each digit's
  marginal is a logsumexp over the other K - 1 axes.
  """
  lead = log_p.shape[:-1]
  b, K = codec.base, codec.ell
  grid = to_code_order(log_p, codec).reshape(lead + (b,) * K)
  n = len(lead)
  marginals = []
  for j in range(K):
    others = tuple(n + i for i in range(K) if i != j)
    marginals.append(jax.nn.logsumexp(grid, axis=others) if others else grid)
  return jnp.stack(marginals, axis=-2)
