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
with exactly one masked sub-token is consistent with at most b classes. Each call counts the rows
each path needs and runs it on the smallest of a few fixed capacities that holds them (the dense
head above 7/8 of the rows), so no batch overflows and the result is exact for any batch. On a mesh
the kernel runs per batch shard (`jax.shard_map`), so the count and the capacity are per device.

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


def _on_accelerator() -> bool:
  """Whether the step is compiled for a TPU or GPU: the platform of the mesh set by
  `jax.set_mesh` (TPU devices when compiling ahead of time on a CPU machine), else the default
  backend's."""
  device = getattr(jax.sharding.get_abstract_mesh(), 'abstract_device', None)
  platform = getattr(device, 'platform', None) or jax.default_backend()
  return platform in ('tpu', 'gpu', 'cuda', 'rocm')


def _unroll():
  """The tile loop is unrolled on accelerators (XLA schedules the tiles' matmuls together, and its
  cost analysis, which counts a loop body once, sees every tile); on a CPU a loop keeps the
  working set of one tile in cache."""
  return True if _on_accelerator() else 1


def _tile_size(vocab_size: int, tile: int) -> int:
  """The vocabulary tile: `tile` on a CPU (cache-sized); on accelerators, whose memory holds far
  larger blocks, the vocabulary in ACCELERATOR_TILES equal tiles of a multiple of 128 lanes (fewer
  unrolled tiles compile faster)."""
  if not _on_accelerator():
    return tile
  per_tile = -(-vocab_size // ACCELERATOR_TILES)
  return max(tile, -(-per_tile // 128) * 128)


ACCELERATOR_TILES = 4


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
  (m, s, z_x0, S), z_T = jax.lax.scan(step, carry, _tiles(W, b, codec, tile),
                                      unroll=_unroll())
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


def _full_backward(h, W, b, x0, y, w, lse, P, z_T, g_paper, g_nelbo, codec, carry_over,
                   with_nelbo, tile):
  """(dh, dW, db) of the full head on rows (h, x0, y, w) with the forward's lse and marginals P;
  z_T (T, rows, V): the forward's logit tiles, or None to recompute them."""
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
                                  (W_T, b_T, classes, digits, z_T), unroll=_unroll())
  C = W.shape[1]
  dW = dW_T.transpose(1, 0, 2).reshape(D, -1)[:, :C].astype(W.dtype)
  db = db_T.reshape(-1)[:C].astype(b.dtype)
  return dh.astype(h.dtype), dW, db


@dataclasses.dataclass(frozen=True)
class Compaction:
  """Expected shares of a batch's rows per path of the kernel (static, hashable under jit).

  single: rows with exactly one masked sub-token, scored over their <= b candidate classes
          (`single_digit_losses`) when single >= full; otherwise (or 0) they go to the full head.
  full:   rows with two or more masked sub-tokens, which always need the full head.
  Fully visible rows cost nothing. The shares only decide whether the one-digit path runs: each
  call counts its rows per path and picks the smallest of `buckets` fixed capacities that holds
  them (`capacities`), so the work follows the batch's own noise levels and every batch is exact.
  """
  single: float
  full: float
  buckets: int = 8  # capacities per path: multiples of 1/buckets of the rows (and 0 and all)

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


def capacities(num_rows: int, count: int = 8, max_share: float = 0.875) -> tuple[int, ...]:
  """The static row capacities of a compacted path on `num_rows` rows, ascending: 0 (no row: the
  path is skipped), multiples of num_rows / count up to max_share of the rows (rounded up to
  multiples of 8, which keep the matmuls aligned), and num_rows (every row, no gather: a share
  above max_share saves too little to pay for the gather). Each call takes the smallest capacity
  that holds its rows, so the cost follows the batch's own count and no row ever overflows."""
  caps = {0, num_rows}
  for k in range(1, count):
    if k / count <= max_share:
      caps.add(min(num_rows, -(-k * num_rows // (count * 8)) * 8))
  return tuple(sorted(caps))


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What `_rows_losses` does, static under jit: the row capacities of the full head (full_caps;
  (N,) = every row, no compaction) and of the one-digit path (single_caps; () = off)."""
  codec: object
  carry_over: bool
  with_nelbo: bool
  tile: int
  keep: bool  # keep the forward's logit tiles for the backward pass
  full_caps: tuple[int, ...]
  single_caps: tuple[int, ...]


def _ranked(active_N):
  """(row indices (N,) with the active rows first, in order, then N for the unused slots; the
  number of active rows)."""
  N = active_N.shape[0]
  n = jnp.sum(active_N.astype(jnp.int32))
  rank_N = jnp.where(active_N, jnp.cumsum(active_N.astype(jnp.int32)) - 1, N)
  rows = jnp.full((N,), N, jnp.int32).at[rank_N].set(jnp.arange(N, dtype=jnp.int32), mode='drop')
  return rows, n


def _paths(y_NxK, w_N, plan: _Plan):
  """Per path (full, then single when on): (caps, rows (N,), bucket index, weights (N,) zero off
  the path). The bucket is the smallest capacity that holds the path's rows."""
  N = y_NxK.shape[0]
  if plan.full_caps == (N,) and not plan.single_caps:
    return [((N,), None, None, w_N)]
  n_masked_N = jnp.sum((y_NxK == plan.codec.mask_id).astype(jnp.int32), axis=-1)
  masks = [n_masked_N >= (2 if plan.single_caps else 1)]
  if plan.single_caps:
    masks.append(n_masked_N == 1)
  out = []
  for caps, active_N in zip((plan.full_caps, plan.single_caps), masks):
    rows, n = _ranked(active_N)
    index = jnp.sum((n > jnp.asarray(caps[:-1], jnp.int32)).astype(jnp.int32))
    out.append((caps, rows, index, jnp.where(active_N, w_N, 0.0)))
  return out


def _gather(rows, cap: int, N: int):
  """(take (N, ...) -> (cap, ...), put (cap, ...) -> (N, ...) zero elsewhere, used (cap,)) for the
  first `cap` ranked rows; the identity on every row when cap == N (no gather)."""
  if cap == N:
    return (lambda v: v), (lambda v: v), None
  r = rows[:cap]
  take = lambda v: jnp.take(v, r, axis=0, mode='clip')  # unused slots read row N - 1 ...
  put = lambda v: jnp.zeros((N,) + v.shape[1:], v.dtype).at[r].set(v, mode='drop')  # ... dropped
  return take, put, r < N


def _switch(index, branches, *operands):
  """lax.switch, or the one branch called directly."""
  if len(branches) == 1:
    return branches[0](*operands)
  return jax.lax.switch(index, branches, *operands)


def _rows_fwd(h, W, b, x0, y, w, plan: _Plan):
  """Both losses (N,) and the residuals of `_rows_losses`."""
  N, K = y.shape
  codec = plan.codec
  T = -(-codec.vocab_size // plan.tile)
  paths = _paths(y, w, plan)
  caps, rows, index, w_full = paths[0]

  def full(cap):
    def branch(h, W, b, x0, y, w_full, rows):
      z_shape = (T, N, plan.tile)
      if cap == 0:
        zero = jnp.zeros((N,), jnp.float32)
        return (zero, zero, zero, jnp.ones((N, K), jnp.float32),
                jnp.zeros(z_shape, jnp.float32) if plan.keep else None)
      take, put, used = _gather(rows, cap, N)
      w_r = take(w_full) if used is None else jnp.where(used, take(w_full), 0.0)
      y_r = take(y)
      log_joint, log_marg, lse, z_T = _forward(take(h), W, b, take(x0), y_r, codec,
                                               plan.carry_over, plan.with_nelbo, plan.tile,
                                               plan.keep)
      paper, nelbo = _weighted(log_joint, log_marg, y_r, w_r, codec, plan.with_nelbo)
      if z_T is not None and cap < N:
        z_T = jnp.pad(z_T, ((0, 0), (0, N - cap), (0, 0)))
      return put(paper), put(nelbo), put(lse), put(jnp.exp(log_marg)), z_T
    return branch

  paper, nelbo, lse, P, z_T = _switch(index, [full(c) for c in caps], h, W, b, x0, y, w_full,
                                      rows)
  if len(paths) > 1:
    caps, rows, index, w_single = paths[1]
    loss = _switch(index, [_single(c, plan, N) for c in caps], h, W, b, x0, y, w_single, rows)
    paper = paper + loss
    nelbo = nelbo + loss if plan.with_nelbo else nelbo
  return (paper, nelbo), (h, W, b, x0, y, w, lse, P, z_T)


def _single(cap: int, plan: _Plan, N: int, cotangent: bool = False):
  """The one-digit path on the first `cap` ranked rows: its loss (N,), or with `cotangent` the
  gradients (dh, dW, db) for a loss cotangent g (N,)."""
  def branch(h, W, b, x0, y, w_single, rows, g=None):
    if cap == 0:
      zero = jnp.zeros((N,), jnp.float32)
      return (jnp.zeros_like(h), jnp.zeros_like(W), jnp.zeros_like(b)) if cotangent else zero
    take, put, used = _gather(rows, cap, N)
    w_r = take(w_single) if used is None else jnp.where(used, take(w_single), 0.0)
    x0_r, y_r = take(x0), take(y)
    f = lambda h_r, W, b: single_digit_losses(h_r, W, b, x0_r, y_r, w_r, plan.codec)[0]
    if not cotangent:
      return put(f(take(h), W, b))
    _, vjp = jax.vjp(f, take(h), W, b)
    dh_r, dW, db = vjp(take(g))
    return put(dh_r), dW, db
  return branch


def _rows_bwd(plan: _Plan, res, cotangents):
  h, W, b, x0, y, w, lse, P, z_T = res
  g_paper, g_nelbo = cotangents
  N = y.shape[0]
  paths = _paths(y, w, plan)
  caps, rows, index, w_full = paths[0]

  def full(cap):
    def branch(h, W, b, x0, y, w_full, rows, lse, P, z_T, g_paper, g_nelbo):
      if cap == 0:
        return jnp.zeros_like(h), jnp.zeros_like(W), jnp.zeros_like(b)
      take, put, used = _gather(rows, cap, N)
      w_r = take(w_full) if used is None else jnp.where(used, take(w_full), 0.0)
      z_r = None if z_T is None else (z_T if cap == N else z_T[:, :cap])
      lse_r, P_r = take(lse), take(P)
      if used is not None:  # unused slots read a row off the path: p = 0 and 1 / P finite there
        lse_r, P_r = jnp.where(used, lse_r, jnp.inf), jnp.where(used[:, None], P_r, 1.0)
      dh, dW, db = _full_backward(take(h), W, b, take(x0), take(y), w_r, lse_r, P_r, z_r,
                                  take(g_paper), take(g_nelbo), plan.codec, plan.carry_over,
                                  plan.with_nelbo, plan.tile)
      return put(dh), dW, db
    return branch

  dh, dW, db = _switch(index, [full(c) for c in caps], h, W, b, x0, y, w_full, rows, lse, P, z_T,
                       g_paper, g_nelbo)
  if len(paths) > 1:
    caps, rows, index, w_single = paths[1]
    g = g_paper + g_nelbo if plan.with_nelbo else g_paper
    dh2, dW2, db2 = _switch(index, [_single(c, plan, N, cotangent=True) for c in caps], h, W, b,
                            x0, y, w_single, rows, g)
    dh, dW, db = dh + dh2, dW + dW2, db + db2
  return dh, dW, db, None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _rows_losses(h, W, b, x0, y, w, plan: _Plan):
  """(paper, nelbo) (N,) of rows (h (N, D), x0 (N,), y (N, K), w (N,)): the full head on the rows
  that need it, gathered into the smallest capacity that holds them (`plan.full_caps`), and the
  rows with one masked sub-token over their b candidates (`plan.single_caps`). Each path picks its
  capacity per call under `lax.switch`, in the forward and in the backward pass, and keeps
  residuals of one shape whatever it picked: per-row lse and marginals, and the logit tiles padded
  to N rows."""
  return _rows_fwd(h, W, b, x0, y, w, plan)[0]


_rows_losses.defvjp(lambda h, W, b, x0, y, w, plan: _rows_fwd(h, W, b, x0, y, w, plan),
                    _rows_bwd)


BATCH_AXES = ('data', 'fsdp')  # the mesh axes that split the batch (prime_jax.sharding)


def head_losses(h_BxLxD: jax.Array, kernel_DxC: jax.Array, bias_C: jax.Array, x0_BxL: jax.Array,
                y_BxLxK: jax.Array, w_B: jax.Array, codec, *, carry_over: bool = True,
                with_nelbo: bool = True, compaction: Compaction | None = None, tile: int = 2048,
                keep_logits_bytes: int = 2**30, mesh=None) -> dict[str, jax.Array]:
  """Per-token {'paper', 'nelbo'} (B, L) from the head's input, without (B, L, C) logits.

  Same values as objectives.fused_losses(h @ kernel + bias, ...) with per-sequence loss weights
  w_B = w(t_B). Gradients flow to h, kernel and bias. `tile` is the vocabulary tile (a (B*L, tile)
  float32 block should fit in cache). The forward pass keeps its logit tiles for the backward pass
  when they take at most `keep_logits_bytes` per device (saving one head matmul); larger batches
  recompute.

  `compaction` (carry-over only; `Compaction.expected`) runs the full head on the rows that need it
  alone: each call counts them and gathers them into the smallest of a few fixed capacities that
  holds them (`capacities`; above 7/8 of the rows, every row without a gather), so the work follows
  the batch's own noise levels and no batch overflows. None runs the full head on every row. The
  rows with one masked sub-token go over their b candidates when that takes at least as many rows
  off the full head as it keeps (compaction.single >= compaction.full: ell = 2 under the log-linear
  schedule, 1/3 and 1/3 of the rows; at ell = 4, 1/5 against 3/5, the extra gather and chunk were
  measured slower on a CPU). Every path gives the same values and gradients.

  Under a mesh (`mesh`, else the one set with `jax.set_mesh`, if any) the kernel runs on each
  device's share of the batch (`jax.shard_map` over the mesh axes 'data' and 'fsdp'; the kernel and
  bias are gathered whole onto every device and their gradients summed over the shards), so the
  compaction is per device and exact on every mesh; without one it runs on the whole batch. Either
  way it is the same function.
  """
  B, L, D = h_BxLxD.shape
  K = codec.ell
  if kernel_DxC.shape != (D, codec.vocab_size) or bias_C.shape != (codec.vocab_size,):
    raise ValueError(f'The head kernel {kernel_DxC.shape} and bias {bias_C.shape} must be '
                     f'({D}, {codec.vocab_size}) and ({codec.vocab_size},): the features\' width '
                     "and the codec's classes.")
  w_B = jnp.broadcast_to(jnp.asarray(w_B, jnp.float32), (B,))
  x0_BxL = jnp.asarray(x0_BxL).astype(jnp.int32)
  y_BxLxK = jnp.asarray(y_BxLxK).reshape(B, L, K).astype(jnp.int32)

  def per_shard(h_bxLxD, kernel_DxC, bias_C, x0_bxL, y_bxLxK, w_b):
    b = h_bxLxD.shape[0]
    N = b * L
    # Accelerators run every row through the full head: their matmul units make the skipped rows
    # cheap, while each capacity is another branch to compile (minutes for a TPU) and a gather.
    compact = compaction is not None and carry_over and not _on_accelerator()
    single = (compact and K > 1 and 0 < compaction.single
              and compaction.single >= compaction.full)
    plan = _Plan(codec=codec, carry_over=bool(carry_over), with_nelbo=bool(with_nelbo),
                 tile=_tile_size(codec.vocab_size, int(tile)),
                 keep=N * codec.vocab_size * 4 <= keep_logits_bytes,
                 full_caps=capacities(N, compaction.buckets) if compact else (N,),
                 single_caps=capacities(N, compaction.buckets) if single else ())
    w_N = jnp.broadcast_to(w_b[:, None], (b, L)).reshape(N)
    paper, nelbo = _rows_losses(h_bxLxD.reshape(N, D), kernel_DxC, bias_C, x0_bxL.reshape(N),
                                y_bxLxK.reshape(N, K), w_N, plan)
    return paper.reshape(b, L), nelbo.reshape(b, L)

  args = (h_BxLxD, kernel_DxC, bias_C, x0_BxL, y_BxLxK, w_B)
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty:
    paper, nelbo = per_shard(*args)
  else:
    axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
    shards = int(np.prod([mesh.shape[a] for a in axes]))
    if B % shards:
      raise ValueError(f'The head kernel splits the batch over the mesh axes {axes}: {B} '
                       f'sequences do not divide into {shards} shards.')
    P = jax.sharding.PartitionSpec
    batch = P(axes or None)
    paper, nelbo = jax.shard_map(per_shard, mesh=mesh,
                                 in_specs=(batch, P(), P(), batch, batch, batch),
                                 out_specs=(batch, batch), check_vma=False)(*args)
  out = {'paper': paper}
  if with_nelbo:
    out['nelbo'] = nelbo
  return out
