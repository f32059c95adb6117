"""The output head, the carry-over filter and both objectives, tiled over the vocabulary.

Dimension key: N tokens (B * L flattened), D model width, C token classes, V vocabulary tile,
K sub-tokens per token, R compacted rows.

`objectives.fused_losses(h @ W + b, ...)` materialises (N, C) logits, their exponentials and their
gradient: with C = 50257 each of those passes over memory costs as much as the head's matmul on a
CPU. Here the head is applied one vocabulary tile at a time inside a scan (an online logsumexp, as
in flash attention), and a custom VJP recomputes each tile in the backward pass, so nothing of size
(N, C) ever exists and each tile stays in cache. Values and gradients equal
`objectives.fused_losses` (tested).

Rows that need no logits are skipped inside the kernel (`Compaction`): under carry-over a fully
visible token has one consistent class (both losses and their gradients are exactly 0), and a token
with exactly one masked sub-token is consistent with at most b classes. The caller says only what
share of rows to expect (`Compaction.expected`); the result is exact for any batch.

Gradients, per token with weight w, p_c = softmax over the consistent classes, P_j the marginal of
digit j at the true digit and M the masked digits:
  d paper / dz_c = -w (1[c = x0] - p_c)
  d nelbo / dz_c = -w (p_c sum_{j in M} 1[d_j(c) = d_j(x0)] / P_j - |M| p_c)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from prime_jax.diffusion import parameterization

NEG_INF = parameterization.NEG_INF


def _tiles(W, b, codec, tile: int):
  """The scan inputs, one vocabulary tile each: kernel (T, D, V), bias (T, V), class ids (T, V)
  and digit table (T, V, K). Padding classes get the id C (never a target, always masked out) and
  digits -1."""
  C, K = codec.vocab_size, codec.ell
  if W.shape[1] != C or b.shape != (C,):
    raise ValueError(f'The head kernel {W.shape} and bias {b.shape} must cover the codec\'s {C} '
                     'classes: (D, C) and (C,).')
  num = -(-C // tile)
  pad = num * tile - C
  ids = np.arange(num * tile)
  ids[C:] = C
  digits = np.full((num * tile, K), -1, np.int32)
  digits[:C] = codec.digits
  W_T = jnp.pad(W, ((0, 0), (0, pad))).reshape(W.shape[0], num, tile).transpose(1, 0, 2)
  b_T = jnp.pad(b, (0, pad)).reshape(num, tile)
  classes = jnp.asarray(ids.astype(np.int32).reshape(num, tile))
  return W_T, b_T, classes, jnp.asarray(digits.reshape(num, tile, K))


def _tile_logits(h_NxD, W_DxV, b_V, cls_V, dig_VxK, y_NxK, codec, carry_over):
  z = jnp.dot(h_NxD, W_DxV, preferred_element_type=jnp.float32) + b_V.astype(jnp.float32)
  valid = cls_V < codec.vocab_size
  if carry_over:
    for j in range(codec.ell):
      y_j = y_NxK[:, j:j + 1]
      valid = valid & ((y_j == codec.mask_id) | (dig_VxK[:, j] == y_j))
  return jnp.where(valid, z, NEG_INF)


def _forward(h, W, b, x0, y, codec, carry_over, with_nelbo, tile, keep_logits=False):
  """One online-logsumexp pass over the vocabulary tiles of h @ W + b."""
  N = h.shape[0]
  K = codec.ell
  x0_digits = codec.encode(x0)  # (N, K)

  def step(carry, xs):
    m, s, z_x0, S = carry
    W_t, b_t, cls, dig = xs
    z = _tile_logits(h, W_t, b_t, cls, dig, y, codec, carry_over)
    m_new = jnp.maximum(m, jnp.max(z, axis=-1))
    scale = jnp.exp(m - m_new)
    e = jnp.exp(z - m_new[:, None])
    s = s * scale + jnp.sum(e, axis=-1)
    z_x0 = z_x0 + jnp.sum(jnp.where(cls == x0[:, None], z, 0.0), axis=-1)
    if with_nelbo:
      same = [(dig[:, j] == x0_digits[:, j:j + 1]) for j in range(K)]
      S = S * scale[:, None] + jnp.stack([jnp.sum(jnp.where(sm, e, 0.0), -1) for sm in same], -1)
    return (m_new, s, z_x0, S), (z if keep_logits else None)

  carry = (jnp.full((N,), -jnp.inf, jnp.float32), jnp.zeros((N,), jnp.float32),
           jnp.zeros((N,), jnp.float32), jnp.zeros((N, K), jnp.float32))
  (m, s, z_x0, S), z_T = jax.lax.scan(step, carry, _tiles(W, b, codec, tile))
  lse = m + jnp.log(s)
  log_joint = z_x0 - lse
  # S_j >= exp(z_x0 - m); the max keeps log P_j finite if every term underflowed.
  log_marg = jnp.maximum(jnp.log(S), (z_x0 - m)[:, None]) - jnp.log(s)[:, None]
  return log_joint, log_marg, lse, z_T


def _weighted(log_joint, log_marg, y, w, codec, with_nelbo):
  paper = -w * log_joint
  masked = y == codec.mask_id
  nelbo = -w * jnp.sum(jnp.where(masked, log_marg, 0.0), axis=-1) if with_nelbo else paper * 0
  return paper, nelbo


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _losses(h, W, b, x0, y, w, codec, carry_over, with_nelbo, tile, keep_logits):
  log_joint, log_marg, _, _ = _forward(h, W, b, x0, y, codec, carry_over, with_nelbo, tile)
  return _weighted(log_joint, log_marg, y, w, codec, with_nelbo)


def _losses_fwd(h, W, b, x0, y, w, codec, carry_over, with_nelbo, tile, keep_logits):
  log_joint, log_marg, lse, z_T = _forward(h, W, b, x0, y, codec, carry_over, with_nelbo, tile,
                                           keep_logits)
  return (_weighted(log_joint, log_marg, y, w, codec, with_nelbo),
          (h, W, b, x0, y, w, lse, jnp.exp(log_marg), z_T))


def _losses_bwd(codec, carry_over, with_nelbo, tile, keep_logits, res, cotangents):
  h, W, b, x0, y, w, lse, P, z_T = res
  g_paper, g_nelbo = cotangents
  K = codec.ell
  x0_digits = codec.encode(x0)
  masked = (y == codec.mask_id).astype(jnp.float32)  # (N, K)
  a = (-w * g_paper)[:, None]
  c = (-w * g_nelbo)[:, None] if with_nelbo else None
  inv_P = jnp.where(masked > 0, 1.0 / jnp.maximum(P, 1e-38), 0.0) if with_nelbo else None
  n_masked = jnp.sum(masked, axis=-1, keepdims=True)

  def step(dh, xs):
    W_t, b_t, cls, dig, z = xs
    if z is None:  # recompute the tile rather than keep (N, C) logits alive
      z = _tile_logits(h, W_t, b_t, cls, dig, y, codec, carry_over)
    p = jnp.exp(z - lse[:, None])
    dz = a * (jnp.where(cls == x0[:, None], 1.0, 0.0) - p)
    if with_nelbo:
      r = sum(jnp.where(dig[:, j] == x0_digits[:, j:j + 1], inv_P[:, j:j + 1], 0.0)
              for j in range(K))
      dz = dz + c * p * (r - n_masked)
    dz_h = dz.astype(h.dtype)
    dh = dh + jnp.dot(dz_h, W_t.T, preferred_element_type=jnp.float32)
    dW_t = jnp.dot(h.T, dz_h, preferred_element_type=jnp.float32)
    return dh, (dW_t, jnp.sum(dz, axis=0))

  N, D = h.shape
  W_T, b_T, classes, digits = _tiles(W, b, codec, tile)
  dh, (dW_T, db_T) = jax.lax.scan(step, jnp.zeros((N, D), jnp.float32),
                                  (W_T, b_T, classes, digits, z_T))
  C = W.shape[1]
  dW = dW_T.transpose(1, 0, 2).reshape(D, -1)[:, :C].astype(W.dtype)
  db = db_T.reshape(-1)[:C].astype(b.dtype)
  return dh.astype(h.dtype), dW, db, None, None, None


_losses.defvjp(_losses_fwd, _losses_bwd)


@dataclasses.dataclass(frozen=True)
class Compaction:
  """Expected shares of a batch's rows per path of the kernel (static, hashable under jit).

  single: rows with exactly one masked sub-token, scored over their <= b candidate classes
          (`single_digit_losses`) when single >= full; otherwise (or 0) they go to the full head.
  full:   rows with two or more masked sub-tokens, which always need the full head.
  Fully visible rows cost nothing. The shares size fixed row capacities (`capacity`); a batch
  above them takes an exact overflow path, so they buy speed, never correctness.
  """
  single: float
  full: float

  @classmethod
  def expected(cls, schedule, ell: int, eps: float, n: int = 4096) -> Compaction:
    """The shares under t ~ U[eps, 1) for a schedule: with alpha = alpha(t), a row has a masked
    sub-token with probability 1 - alpha^ell and exactly one with ell (1 - alpha) alpha^(ell-1)."""
    t = eps + (1.0 - eps) * (np.arange(n) + 0.5) / n
    alpha = np.asarray(schedule.alpha(jnp.asarray(t, jnp.float32)), np.float64)
    active = float(np.mean(1.0 - alpha**ell))
    if ell == 1:
      return cls(single=0.0, full=active)
    one = float(np.mean(ell * (1.0 - alpha) * alpha**(ell - 1)))
    return cls(single=one, full=active - one)


def single_digit_losses(h_RxD, kernel_DxC, bias_C, x0_R, y_RxK, w_R, codec):
  """Both losses of tokens with exactly ONE masked sub-token, from their b candidate classes.

  Under carry-over such a token is consistent with the b classes that share its visible digits
  (codes code(x0) + (k - d_j) b^(K-1-j), k < b, for the masked digit j; invalid codes and, with
  index shuffling, codes >= C drop out), so its softmax needs b kernel columns, not C: they are
  gathered per row. With one masked digit the joint is that digit's marginal, so paper = nelbo =
  -w log p(x0 | y_t). Rows must have exactly one masked digit (others give garbage). (R,) each.
  """
  b, C = codec.base, codec.vocab_size
  powers = jnp.asarray(codec.powers.astype(np.int32))
  j_R = jnp.argmax(y_RxK == codec.mask_id, axis=-1)
  digits_RxK = codec.encode(x0_R)
  d_R = jnp.take_along_axis(digits_RxK, j_R[:, None], axis=-1)[:, 0]
  p_R = powers[j_R]
  code_R = jnp.sum(digits_RxK * powers, axis=-1)
  codes_Rxb = (code_R - d_R * p_R)[:, None] + jnp.arange(b, dtype=jnp.int32)[None, :] * p_R[:, None]
  cls_Rxb = jnp.asarray(codec.token_of_code)[codes_Rxb]
  valid = cls_Rxb < C
  cls_Rxb = jnp.where(valid, cls_Rxb, 0)
  head_rows = kernel_DxC.T[cls_Rxb]  # (R, b, D)
  z = jnp.einsum('rd,rbd->rb', h_RxD, head_rows.astype(h_RxD.dtype),
                 preferred_element_type=jnp.float32)
  z = jnp.where(valid, z + bias_C.astype(jnp.float32)[cls_Rxb], NEG_INF)
  log_p = jnp.take_along_axis(z, d_R[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(z, axis=-1)
  loss = -w_R * log_p
  return loss, loss


def capacity(num_rows: int, share: float) -> int:
  """Rows of a compacted chunk for a batch of `num_rows` tokens whose expected share is `share`:
  the mean plus a margin of 2 % and 5 binomial standard deviations (the rows of an overflowing
  batch beyond it go through a second chunk, so the margin buys speed, not correctness).
  num_rows = off."""
  if share <= 0.0:
    return num_rows
  cap = share * num_rows + 0.02 * num_rows + 5.0 * np.sqrt(num_rows * 0.25)
  cap = int(np.ceil(cap / 8.0) * 8)  # a multiple of 8 keeps the matmuls aligned
  return num_rows if cap >= 0.95 * num_rows else cap


def _compacted(active_N, cap: int, run_rows):
  """Runs `run_rows(rows, used, may_keep) -> (paper, nelbo)` on the active rows only: the first
  `cap` of them in one chunk of fixed size, the rest (rare: a batch above the expected share plus
  the margin) in an overflow chunk under `lax.cond`, skipped otherwise. Unused slots point at row 0
  and must get weight 0. Returns (paper, nelbo) (N,), zero on inactive rows."""
  N = active_N.shape[0]
  n_active = jnp.sum(active_N.astype(jnp.int32))
  # Rank of each active row among the active rows; row indices ordered by it.
  rank_N = jnp.where(active_N, jnp.cumsum(active_N.astype(jnp.int32)) - 1, N)
  rows_R = jnp.zeros((N,), jnp.int32).at[rank_N].set(jnp.arange(N, dtype=jnp.int32), mode='drop')
  used_R = jnp.arange(N) < n_active

  def chunk(lo, hi, may_keep=True):
    r, u = rows_R[lo:hi], used_R[lo:hi]
    p_R, n_R = run_rows(r, u, may_keep)
    scatter = lambda v_R: jnp.zeros((N,), jnp.float32).at[r].add(jnp.where(u, v_R, 0.0))
    return scatter(p_R), scatter(n_R)

  paper, nelbo = chunk(0, cap)
  if cap < N:
    zeros = lambda: (jnp.zeros((N,), jnp.float32), jnp.zeros((N,), jnp.float32))
    # The overflow chunk recomputes in the backward pass, so no (rows, C) residual crosses the
    # lax.cond (a linearised cond carries the residuals of both branches).
    p2, n2 = jax.lax.cond(n_active > cap, lambda: chunk(cap, N, may_keep=False), zeros)
    paper, nelbo = paper + p2, nelbo + n2
  return paper, nelbo


def head_losses(h_BxLxD: jax.Array, kernel_DxC: jax.Array, bias_C: jax.Array, x0_BxL: jax.Array,
                y_BxLxK: jax.Array, w_B: jax.Array, codec, *, carry_over: bool = True,
                with_nelbo: bool = True, compaction: Compaction | None = None, tile: int = 2048,
                keep_logits_bytes: int = 2**30) -> dict[str, jax.Array]:
  """Per-token {'paper', 'nelbo'} (B, L) from the head's input, without (B, L, C) logits.

  Same values as objectives.fused_losses(h @ kernel + bias, ...) with per-sequence loss weights
  w_B = w(t_B). Gradients flow to h, kernel and bias. `tile` is the vocabulary tile (a (B*L, tile)
  float32 block should fit in cache). The forward pass keeps its logit tiles for the backward pass
  when they take at most `keep_logits_bytes` (saving one head matmul); larger batches recompute.

  `compaction` (carry-over only; `Compaction.expected`) runs the full head on the rows that need it
  alone, gathered into a fixed capacity; None runs the full head on every row. The rows with one
  masked sub-token go over their b candidates when that takes at least as many rows off the full
  head as it keeps (compaction.single >= compaction.full: ell = 2 under the log-linear schedule, 1/3
  and 1/3 of the rows; at ell = 4, 1/5 against 3/5, the extra gather and chunk were measured
  slower on a CPU). Every path gives the same values and gradients.
  """
  B, L, D = h_BxLxD.shape
  N, K = B * L, codec.ell
  if kernel_DxC.shape != (D, codec.vocab_size) or bias_C.shape != (codec.vocab_size,):
    raise ValueError(f'The head kernel {kernel_DxC.shape} and bias {bias_C.shape} must be '
                     f'({D}, {codec.vocab_size}) and ({codec.vocab_size},): the features\' width '
                     "and the codec's classes.")
  w_N = jnp.broadcast_to(jnp.asarray(w_B, jnp.float32)[:, None], (B, L)).reshape(-1)
  h_NxD = h_BxLxD.reshape(N, D)
  x0_N = jnp.asarray(x0_BxL).reshape(-1).astype(jnp.int32)
  y_NxK = jnp.asarray(y_BxLxK).reshape(N, K).astype(jnp.int32)

  def full(h, x0, y, w, may_keep=True):
    keep = may_keep and h.shape[0] * codec.vocab_size * 4 <= keep_logits_bytes
    return _losses(h, kernel_DxC, bias_C, x0, y, w, codec, bool(carry_over), bool(with_nelbo),
                   int(tile), keep)

  def single(h, x0, y, w, may_keep):
    f = lambda h, x0, y, w, W, b: single_digit_losses(h, W, b, x0, y, w, codec)
    # Remat in the overflow chunk: its (rows, b, D) residuals must not cross the lax.cond.
    return (f if may_keep else jax.checkpoint(f))(h, x0, y, w, kernel_DxC, bias_C)

  def on_rows(fn):
    # Unused slots point at row 0 with weight 0: no loss and no gradient from them.
    return lambda r, u, may_keep: fn(h_NxD[r], x0_N[r], y_NxK[r], jnp.where(u, w_N[r], 0.0),
                                     may_keep)

  n_masked_N = jnp.sum((y_NxK == codec.mask_id).astype(jnp.int32), axis=-1)
  if compaction is None or not carry_over:
    paper, nelbo = full(h_NxD, x0_N, y_NxK, w_N)
  elif K > 1 and 0 < compaction.single and compaction.single >= compaction.full:
    paper, nelbo = _compacted(n_masked_N == 1, capacity(N, compaction.single), on_rows(single))
    p2, n2 = _compacted(n_masked_N >= 2, capacity(N, compaction.full), on_rows(full))
    paper, nelbo = paper + p2, nelbo + n2
  elif capacity(N, compaction.full + compaction.single) >= N:
    paper, nelbo = full(h_NxD, x0_N, y_NxK, w_N)
  else:  # every row with a masked sub-token through the full head
    cap = capacity(N, compaction.full + compaction.single)
    paper, nelbo = _compacted(n_masked_N >= 1, cap, on_rows(full))
  out = {'paper': paper.reshape(B, L)}
  if with_nelbo:
    out['nelbo'] = nelbo.reshape(B, L)
  return out
