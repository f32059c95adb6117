"""The MDM-Prime ancestral sampler with caching (method.md §5.1, 6).

Dimension key: B batch, S token grid, K sub-tokens per token, C token classes, N = B * |S| token
positions, R rows of a compacted chunk, D model width, b base.

One reverse step t -> s:
  1. every masked sub-token is revealed independently with probability (alpha(s) - alpha(t)) /
     (1 - alpha(t)), which is (t - s)/t for the reference's linear sampling schedule;
  2. every token with a revealed digit draws x0_hat ~ p(. | y_t) (carry-over filtered, nucleus), and
     its revealed digits are the digits of that single draw; observed digits never change.

The reveal decision does not depend on the model, so it is drawn first. A step in which no sub-token
of the batch is revealed ("idle step") leaves y unchanged; with `cache=True` it makes no network
call (a `lax.cond` on a scalar). Because the network is time-independent this is exactly the
reference's `ddpm_cache`: its cached prediction is only ever used by the first non-idle step after
it was made, so the number of network evaluations is (non-idle steps) + 1 (the final noise-removal
call, made when a mask is left at t_min).

Compaction (`compact=True`, the default). Only the positions that reveal a digit in this step need
x0_hat, and they are known before the network runs (about N K / T of them per step on the linear
grid, against N). They are gathered into chunks of a fixed capacity R (the schedule's expected
count plus a margin, `capacities`) and only those rows get the head, the carry-over filter and the
draw; a step with more rows than R runs further chunks (a `while_loop`), so the result is exact for
any count. Give the network as a `SplitNetwork` (trunk features + head weights) and the head's
(R, D) x (D, C) matmul replaces the (N, D) x (D, C) one; a plain logits_fn still saves the filter
and the draw. Under carry-over a row with exactly one masked digit is consistent with at most b
classes (the other digits are fixed), so it computes only those b logits and draws over them. Each
position's draw uses a key folded from (step, position) and every row goes through the same
fixed-size chunk computation, so `compact=False` (every position, in chunks) gives bit-identical
tokens for the same key (tested in fp64).

Token draws (x0_hat), by `precision`:
  fp64        (default) weights exp(z - max z) in float64 under a scoped x64, one float64 uniform
              per position, inverse CDF. Exact to float64 resolution; C times fewer random numbers
              than the reference's exponential race over all C classes.
  fp32        the common naive form: exponential race argmax z_c - log E_c with E = -log(U +
              1e-10), U a float32 uniform. U has 2**-23 resolution, so classes with p_c / p_max
              below ~1e-7 are (almost) never drawn: the tail is truncated (lower entropy, flattering
              generative PPL).
  fp32_hires  TPU-safe exact form: descent of a binary tree of float32 pairwise sums of the
              weights. At each node the LIGHTER child is taken iff u * (left + right) < lighter,
              with u a float32 uniform built from 64 random bits (relative resolution 2**-24 down to
              ~2**-64). Every decision has relative error ~2**-24, so every class, however rare, is
              drawn with its probability to relative error ~depth * 2**-24 (16 levels for C =
              50257). A float32 inverse CDF would instead round classes below ulp(cdf) ~ 6e-8 to
              zero or a full ulp, and the race needs C 64-bit uniforms and two logs per position;
              the tree needs ~2C additions and depth uniforms, so it costs about what fp64 does.

Nucleus (top-p) follows the reference (BD3-LM's `_nucleus_sample`): classes sorted by probability
are kept while the INCLUSIVE cumulative sum is <= p (the class that crosses p is dropped), the top
class is always kept, and the kept mass is renormalised. It is not applied to the final
noise-removal draw.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from prime_jax.diffusion import parameterization
from prime_jax.diffusion import schedules as schedules_lib

PRECISIONS = ('fp64', 'fp32', 'fp32_hires')
NEG_INF = parameterization.NEG_INF


class SampleOutput(NamedTuple):
  tokens: jax.Array  # (B, *S) decoded ids; ids >= C only possible with carry_over=False
  nfe: jax.Array  # () network evaluations actually made
  idle_steps: jax.Array  # () reverse steps in which no sub-token of the batch changed


class SplitNetwork(NamedTuple):
  """A network given as trunk and head, so that the sampler computes logits only where it draws:
  logits = features(y) @ kernel + bias, cast to float32 (as `models.dit.DiT.__call__` does).

  features: y (B, *S, K) -> h (B, *S, D), or features(params, y) when `params` is given.
  head:     () -> (kernel (D, C), bias (C,)), or head(params).
  """
  features: Callable[..., jax.Array]
  head: Callable[..., tuple[jax.Array, jax.Array]]


# -- token draws -----------------------------------------------------------------------------


def nucleus_filter(probs: jax.Array, top_p: float) -> jax.Array:
  """Zeroes the classes outside the reference's nucleus and renormalises (see module docstring)."""
  order = jnp.argsort(-probs, axis=-1)
  sorted_p = jnp.take_along_axis(probs, order, axis=-1)
  keep_sorted = jnp.cumsum(sorted_p, axis=-1) <= top_p
  keep_sorted = keep_sorted.at[..., 0].set(True)
  keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
  kept = jnp.where(keep, probs, 0.0)
  return kept / jnp.sum(kept, axis=-1, keepdims=True)


def hires_uniform(hi: jax.Array, lo: jax.Array) -> jax.Array:
  """float32 uniforms in (0, 1] from two uint32 words: v = hi 2**-32 + (lo + 1) 2**-64, whose
  relative resolution is float32's 2**-24 all the way down to 2**-64 (a float32 uniform has steps of
  2**-24 near 0, so P(u < r) would be wrong for r below ~1e-7)."""
  return hi.astype(jnp.float32) * 2.0**-32 + (lo.astype(jnp.float32) + 1.0) * 2.0**-64


def tree_draw(u_RxH: jax.Array, w_Rxn: jax.Array) -> jax.Array:
  """Index ~ w (R, n) non-negative weights, by descent of a binary tree of float32 sums.

  u (R, H) are uniforms in (0, 1], H >= ceil(log2 n), one per level from the root. The leaves are
  padded to 2**depth; a level of size s is the sum of the two halves of the level below, so node i
  has children i and i + s. At a node with children sums (l, r) the lighter child is taken iff
  u (l + r) < min(l, r): relative error ~2**-24 per decision whatever the ratio, so the tail
  keeps its mass (module docstring).
  """
  R, n = w_Rxn.shape
  depth = max(1, math.ceil(math.log2(n)))
  levels = [jnp.pad(w_Rxn, ((0, 0), (0, 2**depth - n)))]
  for _ in range(depth - 1):
    half = levels[-1].shape[1] // 2
    levels.append(levels[-1][:, :half] + levels[-1][:, half:])
  node_R = jnp.zeros((R, 1), jnp.int32)
  for i, level in enumerate(reversed(levels)):
    s = level.shape[1] // 2
    left = jnp.take_along_axis(level, node_R, axis=1)
    right = jnp.take_along_axis(level, node_R + s, axis=1)
    take_lighter = u_RxH[:, i:i + 1] * (left + right) < jnp.minimum(left, right)
    node_R = node_R + s * ((left <= right) != take_lighter).astype(jnp.int32)
  return node_R[:, 0]


def inverse_cdf(u_R: jax.Array, w_Rxn: jax.Array, block: int = 256) -> jax.Array:
  """Index ~ w (R, n) non-negative weights for uniforms u (R,) in [0, 1): the first class whose
  cumulative weight exceeds u * total, found in two levels (blocks of `block` classes, then within
  the chosen block), so that only (R, n / block) and (R, block) cumulative sums are computed."""
  R, n = w_Rxn.shape
  nb = -(-n // block)
  w_Rxbxv = jnp.pad(w_Rxn, ((0, 0), (0, nb * block - n))).reshape(R, nb, block)
  cdf_blocks = jnp.cumsum(jnp.sum(w_Rxbxv, axis=-1), axis=-1)
  total = cdf_blocks[:, -1:]
  t = jnp.minimum(u_R[:, None] * total, jnp.nextafter(total, jnp.zeros_like(total)))
  j_R = jnp.minimum(jnp.sum(cdf_blocks <= t, axis=-1), nb - 1)
  before = jnp.where(j_R > 0, jnp.take_along_axis(cdf_blocks, jnp.maximum(j_R - 1, 0)[:, None],
                                                  axis=-1)[:, 0], 0.0)
  w_Rxv = jnp.take_along_axis(w_Rxbxv, j_R[:, None, None], axis=1)[:, 0]
  cdf = before[:, None] + jnp.cumsum(w_Rxv, axis=-1)
  i_R = jnp.sum(cdf <= t, axis=-1)
  # The block's own sum and its cumulative sum may differ in the last bit: past the end of the
  # block, take its last class of positive weight.
  last = block - 1 - jnp.argmax(w_Rxv[:, ::-1] > 0, axis=-1)
  return (j_R * block + jnp.minimum(i_R, last)).astype(jnp.int32)


def draw_rows(keys_R: jax.Array, logw_Rxn: jax.Array, precision: str) -> jax.Array:
  """x_r ~ softmax(logw_r) for each row r, using only that row's key (so a row's draw does not
  depend on which other rows are drawn with it). logw are unnormalised log-weights in the
  precision's dtype; -inf or NEG_INF marks an excluded class."""
  n = logw_Rxn.shape[-1]
  if precision == 'fp64':
    w = jnp.exp(logw_Rxn - jnp.max(logw_Rxn, axis=-1, keepdims=True))
    u = jax.vmap(lambda k: jax.random.uniform(k, (), w.dtype))(keys_R)
    return inverse_cdf(u, w)
  if precision == 'fp32':
    u = jax.vmap(lambda k: jax.random.uniform(k, (n,), jnp.float32))(keys_R)
    e = 1e-10 - jnp.log(u + 1e-10)
    return jnp.argmax(logw_Rxn - jnp.log(e), axis=-1).astype(jnp.int32)
  if precision == 'fp32_hires':
    depth = max(1, math.ceil(math.log2(n)))
    bits = jax.vmap(lambda k: jax.random.bits(k, (2, depth), jnp.uint32))(keys_R)
    w = jnp.exp(logw_Rxn - jnp.max(logw_Rxn, axis=-1, keepdims=True)).astype(jnp.float32)
    return tree_draw(hires_uniform(bits[:, 0], bits[:, 1]), w)
  raise ValueError(f'Unknown precision {precision!r}; choose one of {PRECISIONS}.')


def row_keys(key: jax.Array, rows_R: jax.Array) -> jax.Array:
  """One key per row: fold_in(key, row index)."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(rows_R)


def draw_tokens(key: jax.Array, probs: jax.Array, precision: str) -> jax.Array:
  """x ~ Categorical(probs) over the last axis, each row keyed by its flat index. probs are
  non-negative; rows need not be normalised."""
  lead = probs.shape[:-1]
  n_rows = math.prod(lead)
  keys = row_keys(key, jnp.arange(n_rows, dtype=jnp.int32))
  x = draw_rows(keys, jnp.log(probs.reshape(n_rows, probs.shape[-1])), precision)
  return x.reshape(lead)


# -- compaction ------------------------------------------------------------------------------


def capacities(reveal_q, ell: int, rows: int, free_rows: Optional[int] = None, *,
               single: bool = True) -> tuple[int, int]:
  """Chunk capacities (full, single) for `rows` positions of which `free_rows` can be masked.

  In a step with reveal probability q, a free sub-token is still masked with probability m (the
  product of (1 - q) over the earlier steps), independently. A row needs the full head when it has
  >= 2 masked digits and reveals one (all rows that reveal one if not `single`), the b-candidate
  path when it has exactly one and reveals it. The expected counts change along the chain (on the
  linear grid the full-head count falls from ~N K / T to 0 while the single count rises), so one
  capacity for every step is a trade: each capacity is half the largest expected count over the
  steps and the final fill, rounded up to a multiple of 8 (at least 8, at most `rows`). Steps near
  the peak take two chunks, the others one, and no step computes more than half a peak of unused
  rows; sized for the peak plus a margin instead, the chunks of the many steps far from it are
  mostly empty (measured 1.5x slower per batch at the configuration of docs/performance.md). A count
  above the capacity costs another chunk, never correctness.
  """
  free = rows if free_rows is None else free_rows
  q = np.append(np.clip(np.asarray(reveal_q, np.float64), 0.0, 1.0), 1.0)
  m = np.concatenate([[1.0], np.cumprod(1.0 - q[:-1])])
  j = np.arange(ell + 1)[:, None]
  binom = np.asarray([math.comb(ell, int(i)) for i in j[:, 0]])[:, None]
  p_j = binom * m**j * (1.0 - m)**(ell - j)  # (K + 1, steps): P(j masked digits)
  p_reveal = 1.0 - (1.0 - q)**j
  use_single = single and ell > 1
  share_one = p_j[1] * p_reveal[1] if use_single else np.zeros_like(q)
  share_full = np.sum((p_j * p_reveal)[2 if use_single else 1:], axis=0)

  def cap(share):
    return int(min(rows, max(8, np.ceil(0.5 * free * np.max(share) / 8.0) * 8)))
  return cap(share_full), cap(share_one)


def _chunked(select_N: jax.Array, cap: int, rows_fn, out_N: jax.Array) -> jax.Array:
  """out[n] = rows_fn(rows)[...] for every selected n, in chunks of `cap` rows: as many chunks as
  needed (usually one; none if nothing is selected). Unused slots point at row N - 1, are computed
  and dropped."""
  N = select_N.shape[0]
  num = -(-N // cap)
  idx = jnp.nonzero(select_N, size=num * cap, fill_value=N)[0].astype(jnp.int32)
  count = jnp.sum(select_N.astype(jnp.int32))

  def body(c, out):
    rows_R = jax.lax.dynamic_slice_in_dim(idx, c * cap, cap)
    x_R = rows_fn(jnp.minimum(rows_R, N - 1))
    return out.at[rows_R].set(x_R, mode='drop')

  return jax.lax.fori_loop(0, (count + cap - 1) // cap, body, out_N)


def _pick(keys_R, z_Rxn, precision: str, top_p: float, argmax: bool) -> jax.Array:
  if top_p < 1.0:
    z_Rxn = jnp.log(nucleus_filter(jax.nn.softmax(z_Rxn, axis=-1), top_p))
  if argmax:
    return jnp.argmax(z_Rxn, axis=-1).astype(jnp.int32)
  return draw_rows(keys_R, z_Rxn, precision)


def single_candidates(y_RxK: jax.Array, codec) -> tuple[jax.Array, jax.Array]:
  """Rows with exactly one masked digit j: the b classes that share their visible digits, in
  digit order (R, b), and which of them are valid (codes that no token maps to drop out)."""
  powers = jnp.asarray(codec.powers.astype(np.int32))
  masked = y_RxK == codec.mask_id
  base_R = jnp.sum(jnp.where(masked, 0, y_RxK) * powers, axis=-1)
  step_R = jnp.sum(jnp.where(masked, powers, 0), axis=-1)
  codes_Rxb = base_R[:, None] + jnp.arange(codec.base, dtype=jnp.int32) * step_R[:, None]
  cls_Rxb = jnp.asarray(codec.token_of_code)[codes_Rxb]
  valid = cls_Rxb < codec.vocab_size
  return jnp.where(valid, cls_Rxb, 0), valid


def draw_positions(key, net, y_NxK, active_N, codec, *, head, carry_over: bool, top_p: float,
                   precision: str, argmax: bool, caps: tuple[int, int]) -> jax.Array:
  """x0_hat (N,) at every active position (0 elsewhere).

  net: logits (N, C) from a plain logits_fn, or trunk features (N, D) when `head` = (kernel (D, C),
  bias (C,)[, kernel transposed (C, D)]). Rows with >= 2 masked digits (all rows without
  carry-over, or at K = 1) get C logits, the carry-over filter (needed only at K > 2: at K <= 2 such
  a row is fully masked) and a draw over C; rows with one masked digit under carry-over get their b
  candidate logits and a draw over b. Row n draws with fold_in(key, n).
  """
  N, K = y_NxK.shape
  dtype = jnp.float64 if precision == 'fp64' else jnp.float32

  if head is not None:
    kernel_DxC, bias_C = head[:2]
    kernel_CxD = head[2] if len(head) > 2 else kernel_DxC.T

  def full_rows(rows_R):
    if head is None:
      z = net[rows_R]
    else:
      z = (jnp.dot(net[rows_R], kernel_DxC) + bias_C).astype(jnp.float32)
    z = z.astype(dtype)
    # With K <= 2 (and the single path on) every row here that draws is fully masked: no filter.
    if carry_over and K > 2:
      z = jnp.where(parameterization.consistent(y_NxK[rows_R], codec), z, NEG_INF)
    return _pick(row_keys(key, rows_R), z, precision, top_p, argmax)

  def single_rows(rows_R):
    cls_Rxb, valid = single_candidates(y_NxK[rows_R], codec)
    if head is None:
      z = jnp.take_along_axis(net[rows_R], cls_Rxb, axis=-1)
    else:
      z = jnp.einsum('rd,rbd->rb', net[rows_R], kernel_CxD[cls_Rxb]) + bias_C[cls_Rxb]
      z = z.astype(jnp.float32)
    z = jnp.where(valid, z.astype(dtype), NEG_INF)
    d_R = _pick(row_keys(key, rows_R), z, precision, top_p, argmax)
    return jnp.take_along_axis(cls_Rxb, d_R[:, None], axis=-1)[:, 0]

  x_N = jnp.zeros((N,), jnp.int32)
  if carry_over and K == 1:  # only masked rows draw; their one digit is masked: no filter either
    return _chunked(active_N, caps[0], full_rows, x_N)
  if carry_over:
    one_N = jnp.sum((y_NxK == codec.mask_id).astype(jnp.int32), axis=-1) == 1
    x_N = _chunked(active_N & ~one_N, caps[0], full_rows, x_N)
    return _chunked(active_N & one_N, caps[1], single_rows, x_N)
  return _chunked(active_N, caps[0], full_rows, x_N)


# -- the sampler -----------------------------------------------------------------------------


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def sample(key: jax.Array, logits_fn: Union[Callable[..., jax.Array], SplitNetwork], codec, *,
           shape, num_steps: int, schedule='linear', carry_over: bool = True,
           nucleus_p: float = 1.0, precision: str = 'fp64', cache: bool = True,
           condition: Optional[tuple[jax.Array, jax.Array]] = None, t_min: float = 1e-5,
           final: str = 'auto', params: Any = None, decode: bool = True, compact: bool = True,
           capacity: Optional[Union[int, tuple[int, int]]] = None) -> SampleOutput:
  """Draws token grids of `shape` = (B, *S) with the Prime ancestral sampler.

  Args:
    key: PRNG key. Randomness is a function of (key, step, position), so cache on/off and compact
      on/off give identical samples.
    logits_fn: y_t (B, *S, K) -> logits (B, *S, C); or logits_fn(params, y_t) when `params` is given
      (pass model weights that way so they are arguments of the compiled loop, not constants); or
      a `SplitNetwork`, whose head is then applied only to the rows that draw.
    codec: the sub-token `Codec`.
    num_steps: T reverse steps on the grid linspace(1, t_min, T + 1).
    schedule: the sampling schedule (name or `Schedule`); 'linear' is the reference text sampler.
    carry_over: filter predictions to classes consistent with the observed digits (then every
      decoded id is < C).
    nucleus_p: top-p mass kept (1.0 = off).
    precision: 'fp64' | 'fp32' | 'fp32_hires' (module docstring).
    cache: skip the network call in idle steps.
    condition: (tokens (B, *S), keep_mask (B, *S) bool): tokens where keep_mask is True are fixed
      (prefix conditioning, inpainting). Kept positions never draw; when keep_mask is concrete the
      capacities are sized for the free positions only.
    t_min: last grid time; 0 reveals every remaining sub-token in the last step.
    final: noise removal for sub-tokens still masked at t_min: 'sample', 'argmax' (MDLM's), or
      'auto' (argmax when K == 1 as in MDLM, sample when K > 1 as in the Prime reference).
    params: optional pytree passed to logits_fn.
    decode: False returns the sub-tokens (B, *S, K) in `tokens` instead of decoded ids.
    compact: head, filter and draw only at the positions that reveal a digit (module docstring);
      False runs them at every position (the dense sampler; same tokens).
    capacity: rows per chunk (an int for both paths, or (full, single)); None sizes them from the
      schedule (`capacities`). Any value gives the same tokens.

  Runs as one compiled program (it jits itself; calling it inside a jit works too, except for fp64
  without jax_enable_x64, which needs its own x64 scope and so must be called outside jit).
  """
  if precision not in PRECISIONS:
    raise ValueError(f'Unknown precision {precision!r}; choose one of {PRECISIONS}.')
  if not 0.0 < nucleus_p <= 1.0:
    raise ValueError(f'nucleus_p must lie in (0, 1], got {nucleus_p}.')
  if final not in ('auto', 'sample', 'argmax'):
    raise ValueError(f"final must be 'auto', 'sample' or 'argmax', got {final!r}.")
  if final == 'auto':
    final = 'argmax' if codec.ell == 1 else 'sample'
  shape = tuple(int(d) for d in shape)
  grid = schedules_lib.sampling_grid(num_steps, t_min)
  with jax.ensure_compile_time_eval():
    reveal_q = np.asarray(schedules_lib.as_schedule(schedule).reveal_prob(grid[:-1], grid[1:]))
  reveal_q = np.clip(reveal_q, 0.0, 1.0)
  if condition is None:
    cond_tokens = jnp.zeros(shape, jnp.int32)
    cond_keep = jnp.zeros(shape, bool)
  else:
    cond_tokens, cond_keep = condition
    if tuple(cond_tokens.shape) != shape or tuple(cond_keep.shape) != shape:
      raise ValueError(f'condition arrays must have shape {shape}, got {cond_tokens.shape} and '
                       f'{cond_keep.shape}.')
  rows = math.prod(shape)
  if capacity is None:
    free = None if _is_traced(cond_keep) else int(np.sum(~np.asarray(cond_keep)))
    caps = capacities(reveal_q, codec.ell, rows, free, single=carry_over)
  else:
    caps = (capacity, capacity) if isinstance(capacity, int) else tuple(capacity)
    caps = tuple(min(rows, int(c)) for c in caps)
    if min(caps) < 1:
      raise ValueError(f'capacity must be >= 1, got {capacity}.')
  static = dict(logits_fn=logits_fn, codec=codec, shape=shape,
                reveal_q=tuple(reveal_q.tolist()),
                carry_over=bool(carry_over), nucleus_p=float(nucleus_p), precision=precision,
                cache=bool(cache), final=final, with_params=params is not None, decode=bool(decode),
                compact=bool(compact), caps=caps)
  return run_in_precision(functools.partial(_sample_jit, **static), precision, key, cond_tokens,
                          cond_keep, params)


def run_in_precision(run: Callable[..., SampleOutput], precision: str, key, cond_tokens,
                     cond_keep, params) -> SampleOutput:
  """run(key, cond_tokens, cond_keep, params), in a scoped x64 for 'fp64' (shared by samplers)."""
  if precision == 'fp64' and not jax.config.jax_enable_x64:
    if _is_traced(key) or _is_traced(cond_tokens):
      raise ValueError(
          "precision='fp64' runs in its own x64 scope, which cannot be entered inside jax.jit: "
          "call sample() outside jit (it compiles itself), enable jax_enable_x64 globally, or use "
          "precision='fp32_hires'.")
    with jax.enable_x64(True):
      out = run(key, cond_tokens, cond_keep, params)
      return jax.tree.map(lambda a: a.astype(jnp.int32), out)
  return run(key, cond_tokens, cond_keep, params)


@functools.partial(jax.jit, static_argnames=(
    'logits_fn', 'codec', 'shape', 'reveal_q', 'carry_over', 'nucleus_p', 'precision',
    'cache', 'final', 'with_params', 'decode', 'compact', 'caps'))
def _sample_jit(key, cond_tokens, cond_keep, params, *, logits_fn, codec, shape, reveal_q,
                carry_over, nucleus_p, precision, cache, final, with_params, decode, compact,
                caps) -> SampleOutput:
  mask_id, K = codec.mask_id, codec.ell
  dtype = jnp.float64 if precision == 'fp64' else jnp.float32
  num_steps = len(reveal_q)
  reveal_q = jnp.asarray(reveal_q, dtype)
  N = math.prod(shape)
  split = isinstance(logits_fn, SplitNetwork)
  args = (params,) if with_params else ()

  def update(y, reveal, k_draw, top_p, argmax):
    """y with x0_hat's digits written where `reveal` (B, *S, K)."""
    net = logits_fn.features(*args, y) if split else logits_fn(*args, y)
    net = net.reshape(N, net.shape[-1])
    active_N = jnp.any(reveal, axis=-1).reshape(N) if compact else jnp.ones((N,), bool)
    x_N = draw_positions(k_draw, net, y.reshape(N, K), active_N, codec, head=head,
                         carry_over=carry_over, top_p=top_p, precision=precision, argmax=argmax,
                         caps=caps)
    return jnp.where(reveal, codec.encode(x_N.reshape(shape)), y)

  head = None
  if split:  # loop-invariant: the head weights and their transpose (the single path's gathers)
    kernel_DxC, bias_C = logits_fn.head(*args)
    head = (kernel_DxC, bias_C, kernel_DxC.T)

  y0 = jnp.where(cond_keep[..., None], codec.encode(cond_tokens),
                 jnp.full(shape + (K,), mask_id, jnp.int32))

  def step(k, carry):
    y, nfe, idle = carry
    k_reveal, k_draw = jax.random.split(jax.random.fold_in(key, k))
    reveal = (y == mask_id) & (jax.random.uniform(k_reveal, y.shape, dtype) < reveal_q[k])
    changed = jnp.any(reveal)
    run = lambda y: update(y, reveal, k_draw, nucleus_p, False)
    if cache:
      y = jax.lax.cond(changed, run, lambda y: y, y)
      nfe = nfe + changed.astype(jnp.int32)
    else:
      y = run(y)
      nfe = nfe + 1
    return y, nfe, idle + (~changed).astype(jnp.int32)

  zero = jnp.zeros((), jnp.int32)
  y, nfe, idle = jax.lax.fori_loop(0, num_steps, step, (y0, zero, zero))

  # Noise removal at t_min: fill what is still masked from one more prediction (no nucleus).
  remaining = y == mask_id
  finish = lambda y: update(y, remaining, jax.random.fold_in(key, num_steps), 1.0,
                            final == 'argmax')
  needed = jnp.any(remaining)
  if cache:
    y = jax.lax.cond(needed, finish, lambda y: y, y)
    nfe = nfe + needed.astype(jnp.int32)
  else:
    y = finish(y)
    nfe = nfe + 1
  return SampleOutput(codec.decode(y) if decode else y, nfe, idle)


def expected_idle_fraction(num_units: int, num_steps: int, t_min: float = 1e-5) -> float:
  """(1 - dt)**num_units with dt = (1 - t_min)/T: each unit changes in a given step of the linear
  grid with probability exactly dt, independently of the model (method.md §6). num_units = B * L *
  K for
  batch-level caching."""
  return (1.0 - (1.0 - t_min) / num_steps)**num_units
