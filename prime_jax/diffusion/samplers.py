"""The MDM-Prime ancestral sampler with caching (method.md §5.1, 6).

Dimension key: B batch, S token grid, K sub-tokens per token, C token classes.

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

Token draws (x0_hat), by `precision`:
  fp64        (default) probabilities in float64 under a scoped x64, one float64 uniform
              per position, inverse CDF. Exact to float64 resolution; C times fewer random numbers
              than the reference's exponential race over all C classes.
  fp32        the common naive form: exponential race argmax p_c / E_c with E = -log(U +
              1e-10), U a float32 uniform. U has 2**-23 resolution, so classes with p_c / p_max
              below ~1e-7 are (almost) never drawn: the tail is truncated (lower entropy, flattering
              generative PPL).
  fp32_hires  TPU-safe exact form: the race with V = 1 - U built from 64 random bits and
              E = -log1p(-V), which resolves E (and so probability ratios) down to ~1e-19.

Nucleus (top-p) follows the reference (BD3-LM's `_nucleus_sample`): classes sorted by probability
are kept while the INCLUSIVE cumulative sum is <= p (the class that crosses p is dropped), the top
class is always kept, and the kept mass is renormalised. It is not applied to the final
noise-removal draw.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from prime_jax.diffusion import parameterization
from prime_jax.diffusion import schedules as schedules_lib

PRECISIONS = ('fp64', 'fp32', 'fp32_hires')


class SampleOutput(NamedTuple):
  tokens: jax.Array  # (B, *S) decoded ids; ids >= C only possible with carry_over=False
  nfe: jax.Array  # () network evaluations actually made
  idle_steps: jax.Array  # () reverse steps in which no sub-token of the batch changed


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


def _hires_exponential(key: jax.Array, shape) -> jax.Array:
  """Exp(1) variates in float32 from 64 random bits: E = -log1p(-V), V in (0, 1] with fine
  resolution near 0, which is where the small E that let rare classes win live."""
  hi, lo = jax.random.bits(key, (2,) + tuple(shape), jnp.uint32)
  v = hi.astype(jnp.float32) * 2.0**-32 + (lo.astype(jnp.float32) + 1.0) * 2.0**-64
  return -jnp.log1p(-jnp.minimum(v, 1.0))


def draw_tokens(key: jax.Array, probs: jax.Array, precision: str) -> jax.Array:
  """x ~ Categorical(probs) over the last axis. probs are non-negative, rows sum to 1."""
  if precision == 'fp64':
    cdf = jnp.cumsum(probs, axis=-1)
    total = cdf[..., -1:]
    u = jax.random.uniform(key, total.shape, cdf.dtype) * total
    u = jnp.minimum(u, jnp.nextafter(total, jnp.zeros_like(total)))
    return jnp.sum(cdf <= u, axis=-1).astype(jnp.int32)
  if precision == 'fp32':
    e = 1e-10 - jnp.log(jax.random.uniform(key, probs.shape, jnp.float32) + 1e-10)
  elif precision == 'fp32_hires':
    e = _hires_exponential(key, probs.shape)
  else:
    raise ValueError(f'Unknown precision {precision!r}; choose one of {PRECISIONS}.')
  # argmax p/E, in log space so that tiny p do not underflow.
  return jnp.argmax(jnp.log(probs) - jnp.log(e), axis=-1).astype(jnp.int32)


# -- the sampler -----------------------------------------------------------------------------


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def sample(key: jax.Array, logits_fn: Callable[..., jax.Array], codec, *, shape,
           num_steps: int, schedule='linear', carry_over: bool = True, nucleus_p: float = 1.0,
           precision: str = 'fp64', cache: bool = True,
           condition: Optional[tuple[jax.Array, jax.Array]] = None, t_min: float = 1e-5,
           final: str = 'auto', params: Any = None, decode: bool = True) -> SampleOutput:
  """Draws token grids of `shape` = (B, *S) with the Prime ancestral sampler.

  Args:
    key: PRNG key. Randomness is a function of (key, step), so cache on/off give identical samples.
    logits_fn: y_t (B, *S, K) -> logits (B, *S, C); or logits_fn(params, y_t) when `params` is given
      (pass model weights that way so they are arguments of the compiled loop, not constants).
    codec: the sub-token `Codec`.
    num_steps: T reverse steps on the grid linspace(1, t_min, T + 1).
    schedule: the sampling schedule (name or `Schedule`); 'linear' is the reference text sampler.
    carry_over: filter predictions to classes consistent with the observed digits (then every
      decoded id is < C).
    nucleus_p: top-p mass kept (1.0 = off).
    precision: 'fp64' | 'fp32' | 'fp32_hires' (module docstring).
    cache: skip the network call in idle steps.
    condition: (tokens (B, *S), keep_mask (B, *S) bool): tokens where keep_mask is True are fixed
      (prefix conditioning, inpainting).
    t_min: last grid time; 0 reveals every remaining sub-token in the last step.
    final: noise removal for sub-tokens still masked at t_min: 'sample', 'argmax' (MDLM's), or
      'auto' (argmax when K == 1 as in MDLM, sample when K > 1 as in the Prime reference).
    params: optional pytree passed to logits_fn.
    decode: False returns the sub-tokens (B, *S, K) in `tokens` instead of decoded ids.

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
  static = dict(logits_fn=logits_fn, codec=codec, shape=shape,
                reveal_q=tuple(np.clip(reveal_q, 0.0, 1.0).tolist()),
                carry_over=bool(carry_over), nucleus_p=float(nucleus_p), precision=precision,
                cache=bool(cache), final=final, with_params=params is not None, decode=bool(decode))
  if condition is None:
    cond_tokens = jnp.zeros(shape, jnp.int32)
    cond_keep = jnp.zeros(shape, bool)
  else:
    cond_tokens, cond_keep = condition
    if tuple(cond_tokens.shape) != shape or tuple(cond_keep.shape) != shape:
      raise ValueError(f'condition arrays must have shape {shape}, got {cond_tokens.shape} and '
                       f'{cond_keep.shape}.')
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
    'cache', 'final', 'with_params', 'decode'))
def _sample_jit(key, cond_tokens, cond_keep, params, *, logits_fn, codec, shape, reveal_q,
                carry_over, nucleus_p, precision, cache, final, with_params,
                decode) -> SampleOutput:
  mask_id = codec.mask_id
  dtype = jnp.float64 if precision == 'fp64' else jnp.float32
  num_steps = len(reveal_q)
  reveal_q = jnp.asarray(reveal_q, dtype)

  def predict(y, top_p):
    logits = logits_fn(params, y) if with_params else logits_fn(y)
    log_p = parameterization.log_probs(logits.astype(dtype), y, codec, carry_over=carry_over)
    probs = jnp.exp(log_p)
    return nucleus_filter(probs, top_p) if top_p < 1.0 else probs

  y0 = jnp.where(cond_keep[..., None], codec.encode(cond_tokens),
                 jnp.full(shape + (codec.ell,), mask_id, jnp.int32))

  def step(k, carry):
    y, nfe, idle = carry
    k_reveal, k_draw = jax.random.split(jax.random.fold_in(key, k))
    reveal = (y == mask_id) & (jax.random.uniform(k_reveal, y.shape, dtype) < reveal_q[k])
    changed = jnp.any(reveal)

    def update(y):
      x_hat = draw_tokens(k_draw, predict(y, nucleus_p), precision)
      return jnp.where(reveal, codec.encode(x_hat), y)

    if cache:
      y = jax.lax.cond(changed, update, lambda y: y, y)
      nfe = nfe + changed.astype(jnp.int32)
    else:
      y = update(y)
      nfe = nfe + 1
    return y, nfe, idle + (~changed).astype(jnp.int32)

  zero = jnp.zeros((), jnp.int32)
  y, nfe, idle = jax.lax.fori_loop(0, num_steps, step, (y0, zero, zero))

  # Noise removal at t_min: fill what is still masked from one more prediction (no nucleus).
  remaining = y == mask_id

  def finish(y):
    probs = predict(y, 1.0)
    if final == 'argmax':
      x_hat = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    else:
      x_hat = draw_tokens(jax.random.fold_in(key, num_steps), probs, precision)
    return jnp.where(remaining, codec.encode(x_hat), y)

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
