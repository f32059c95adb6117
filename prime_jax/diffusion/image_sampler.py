"""The MDM-Prime image samplers (method.md §5.3): Euler Prime, its per-digit-marginal variant, the
logit
temperature schedule, the corrector and the timestep map of the reference image code.

Dimension key: B batch, S token grid ((H, W, channels) for images: every colour channel of a pixel
is one token), K sub-tokens per token, C token classes (256 for pixels), b base, T steps.

Time. The reference image code runs flow-matching time u in [0, 1], u = 0 fully masked, u = 1
clean, with alpha(u) = u**n (n = 3). The rest of our core uses t = 1 - u (t = 0 clean) and the
'poly' schedule alpha(t) = (1 - t)**n, the same function: alpha'(u) = -Schedule.dalpha(1 - u) and
the reveal probability below is Schedule.reveal_prob(1 - u_k, 1 - u_{k+1}) (a test checks both).
The reference writes its three hyper-parameter families (temperature, corrector strength, timestep
map) as functions of u, so this module keeps its grid in u and published settings carry over as is.

  grid         u_k = k / T (k < T), optionally remapped by u -> 1 - a (1 - u)**b' + c;
  steps k<T-1  the model is called at u_k, then predictor (+ corrector) from u_k to u_{k+1};
  step T-1     the model is called at u_{T-1} and every still-masked sub-token is filled from it.
  T is the reference's `nfe`; its last grid point u_T = 1 is never used.

Predictor. The logits are divided by tau(u_k) = a u_k**b' + c and soft-maxed over C, with no
consistency filter (the reference image model has none). Each masked sub-token is revealed with
probability q_k = (alpha(u_{k+1}) - alpha(u_k)) / (1 - alpha(u_k)); observed ones never change.
  Euler (`carry_over` off): revealed digits are the digits of one draw x0_hat ~ p per token.
  marginal (`carry_over` on, the reference image code's name): every revealed sub-token draws its
    value independently from its digit marginal P(d_j = v) = sum_{c : d_j(c) = v} p(c). Unlike
    the text carry-over, nothing ties the draw to the observed digits.
The reference draws reveal and value together from the (b+1)-way mixture q delta_d + (1-q) delta_m;
drawing the reveal first is the same law, and it lets a step that reveals nothing skip the network.

Corrector (u = u_k, h = u_{k+1} - u_k, kappa(u) = c0 u**c1 (1 - u)**c1). After the predictor,
every sub-token that is not conditioned jumps with the rate over its b + 1 values
  r = alpha'/(1-alpha) delta_d + kappa alpha'/(alpha (1-alpha)) ((1-alpha) delta_m + alpha delta_d),
zeroed at its current value: with probability 1 - exp(-h sum r) it moves to d or m in proportion to
r. d is the digit of the predictor's x0_hat (Euler) or a fresh draw from the digit marginal
(marginal), as in the reference. Three details, all faithful to the reference:
  - c2 is accepted and ignored: the reference uses c1 for both exponents of kappa.
  - kappa = 0 does NOT switch the corrector off. The first term is the forward (unmasking) rate,
    so a c0 = 0 corrector is a second unmasking step towards d (and it moves revealed digits that
    disagree with d onto d). `use_corrector=False` is no corrector.
  - At alpha = 0 (u = 0) the remasking rate kappa alpha'/alpha is 0/0; the reference gets NaN
    there, so an unmasked sub-token never jumps at u = 0. We keep that rule explicitly.

Invalid codes (b**K > C, e.g. pixels with K = 3: b = 7, 343 codes). Neither variant filters by the
observed digits, so a token can end with digits of different draws that form a code >= C (the
reference then decodes an id >= 256). invalid='redraw' (default) replaces such a token by the last
step's joint draw x0_hat ~ p, a valid class; invalid='keep' returns the reference's ids >= C. For
K in {1, 2, 4, 8} with C = 256 every code is valid and the two agree.

Caching. `logits_fn` takes no time: the network must be time-independent (the reference UNet ignores
t) and the temperature is applied here. So without the corrector a step that reveals nothing is idle
and makes no call; with the corrector the last prediction is reused while y is unchanged. Samples
are identical with cache on or off (randomness is a function of (key, step)); `nfe` counts real
calls (T with cache=False, as in the reference).

Conditioning (inpainting, imputation): `condition=(tokens (B, *S), keep (B, *S) bool)`; kept tokens
start observed and are never changed by the predictor, the corrector or the repair.

Token draws use `samplers.draw_tokens` and its `precision` modes (fp64 | fp32 | fp32_hires).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from prime_jax.diffusion import parameterization, samplers
from prime_jax.diffusion.samplers import PRECISIONS, SampleOutput, draw_tokens

INVALID_MODES = ('redraw', 'keep')
Triple = tuple[float, float, float]


# -- the three reference schedules (flow time u: 0 masked, 1 clean) --------------------------------


def timestep_map(u, params: Triple):
  """u -> 1 - a (1 - u)**b' + c. The identity is (1, 1, 0); (1, 0, 0) maps every u to 0."""
  a, b, c = params
  return 1.0 - a * (1.0 - np.asarray(u, np.float64))**b + c


def temperature_at(u, params: Triple):
  """tau(u) = a u**b' + c (0**0 = 1, so (1, 0, 0) is tau = 1)."""
  a, b, c = params
  return a * np.asarray(u, np.float64)**b + c


def kappa_at(u, params: tuple[float, ...]):
  """kappa(u) = c0 u**c1 (1 - u)**c1; c2 = params[2] is unused, as in the reference."""
  c0, c1 = params[0], params[1]
  u = np.asarray(u, np.float64)
  return c0 * u**c1 * (1.0 - u)**c1


def corrector_rates(u, n: float, params: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
  """The corrector's rates towards the drawn digit d and towards the mask, at flow time u.

  to_digit = (1 + kappa) alpha'/(1 - alpha); to_mask = kappa alpha'/alpha, NaN where alpha = 0
  (the reference's 0/0, which freezes unmasked sub-tokens there).
  """
  u = np.asarray(u, np.float64)
  alpha, dalpha = u**n, n * u**(n - 1.0)
  kappa = kappa_at(u, params)
  with np.errstate(divide='ignore', invalid='ignore'):
    to_digit = (1.0 + kappa) * dalpha / (1.0 - alpha)
    to_mask = np.where(alpha > 0, kappa * dalpha / np.where(alpha > 0, alpha, 1.0), np.nan)
  return to_digit, to_mask


# -- settings --------------------------------------------------------------------------------------


def _triple(name: str, value) -> Triple:
  value = tuple(float(v) for v in value)
  if len(value) != 3:
    raise ValueError(f'{name} takes three numbers (as the reference\'s --{name}_parameters), got '
                     f'{value}.')
  return value


@dataclasses.dataclass(frozen=True)
class ImageSamplerSettings:
  """Sampler settings, frozen and hashable. Only num_steps, carry_over, use_corrector and precision
  shape the compiled loop; everything else enters it as data (per-step tables and two switches), so
  sweeping temperature, corrector or timestep numbers does not recompile.

  num_steps:   T, network calls without caching (the reference's --nfe, default 512).
  schedule_n:  n in alpha(u) = u**n (method.md §9.2: 3; the super-token run used 2).
  carry_over:  the per-digit-marginal variant (the reference image code's --carry_over).
  temperature: (a, b', c) of tau(u) = a u**b' + c; None is tau = 1 (exactly the untempered law).
  use_corrector, corrector: the corrector step and (c0, c1, c2).
  use_timestep_scheduler, timestep: the grid map (a, b', c); (1, 1, 0) is the identity.
  precision:   token-draw precision (samplers.PRECISIONS).
  cache:       skip/reuse network calls when y is unchanged (module docstring).
  invalid:     'redraw' | 'keep': what to do with tokens whose code is >= C (module docstring).
  """
  num_steps: int = 512
  schedule_n: float = 3.0
  carry_over: bool = False
  temperature: Optional[Triple] = (1.0, 0.0, 0.0)
  use_corrector: bool = False
  corrector: Triple = (0.0, 0.0, 0.0)
  use_timestep_scheduler: bool = False
  timestep: Triple = (1.0, 1.0, 0.0)
  precision: str = 'fp64'
  cache: bool = True
  invalid: str = 'redraw'

  def __post_init__(self):
    put = functools.partial(object.__setattr__, self)
    if int(self.num_steps) != self.num_steps or self.num_steps < 1:
      raise ValueError(f'num_steps must be an integer >= 1, got {self.num_steps}.')
    put('num_steps', int(self.num_steps))
    put('schedule_n', float(self.schedule_n))
    if self.schedule_n <= 0:
      raise ValueError(f'schedule_n must be > 0 (alpha(u) = u**n), got {self.schedule_n}.')
    put('carry_over', bool(self.carry_over))
    put('use_corrector', bool(self.use_corrector))
    put('use_timestep_scheduler', bool(self.use_timestep_scheduler))
    put('cache', bool(self.cache))
    if self.temperature is not None:
      put('temperature', _triple('temperature', self.temperature))
    put('corrector', _triple('corrector', self.corrector))
    put('timestep', _triple('timestep', self.timestep))
    if self.precision not in PRECISIONS:
      raise ValueError(f'Unknown precision {self.precision!r}; choose one of {PRECISIONS}.')
    if self.invalid not in INVALID_MODES:
      raise ValueError(f'invalid must be one of {INVALID_MODES}, got {self.invalid!r}.')
    u = self.grid()
    if self.temperature is not None:
      tau = temperature_at(u, self.temperature)
      if not np.all(np.isfinite(tau) & (tau > 0)):
        k = int(np.argmin(np.where(np.isfinite(tau), tau, -np.inf)))
        raise ValueError(f'temperature {self.temperature} gives tau(u={u[k]:.4g}) = {tau[k]:.4g}; '
                         'tau must be finite and > 0 at every step.')

  def grid(self) -> np.ndarray:
    """(T,) flow times u_0 < ... < u_{T-1} at which the model is called (module docstring)."""
    T = self.num_steps
    u = np.arange(T, dtype=np.float64) / T
    if self.use_timestep_scheduler:
      u = timestep_map(u, self.timestep)
      ok = np.all(np.isfinite(u)) and u[0] >= 0.0 and u[-1] < 1.0 and np.all(np.diff(u) > 0)
      if not ok:
        raise ValueError(
            f'timestep {self.timestep} maps the grid k/T to {np.round(u[:4], 4).tolist()}...'
            f'{np.round(u[-2:], 4).tolist()}, which is not strictly increasing inside [0, 1). '
            'The identity is (1, 1, 0); the tables of the paper list (1, 0, 0) for runs with the '
            'scheduler off, which would map every time to 0.')
    return u

  def step_tables(self) -> dict[str, np.ndarray]:
    """Per-step float64 inputs of the loop: reveal (T-1,), h (T-1,), tau (T,), and the corrector
    rates to_digit, to_mask (T-1,)."""
    u = self.grid()
    n = self.schedule_n
    alpha = u**n
    # (alpha(s) - alpha(t)) / (1 - alpha(t)) = Schedule('poly').reveal_prob(1 - u_k, 1 - u_{k+1}).
    reveal = np.clip((alpha[1:] - alpha[:-1]) / (1.0 - alpha[:-1]), 0.0, 1.0)
    tau = np.ones_like(u) if self.temperature is None else temperature_at(u, self.temperature)
    to_digit, to_mask = corrector_rates(u[:-1], n, self.corrector)
    return dict(reveal=reveal, h=np.diff(u), tau=tau, to_digit=to_digit, to_mask=to_mask)


# -- the corrector jump ----------------------------------------------------------------------------


def corrector_jump(key: jax.Array, y_BxSxK: jax.Array, d_BxSxK: jax.Array,
                   free_BxSxK: jax.Array, *, to_digit, to_mask, h, mask_id: int) -> jax.Array:
  """One corrector jump of every free sub-token (module docstring).

  Rates are zeroed at the current value: a masked sub-token can only move to d, one equal to d only
  to the mask, any other to either. A NaN rate (alpha = 0) means no jump, as in the reference.
  """
  dtype = jnp.result_type(jnp.asarray(to_digit).dtype, jnp.float32)
  u_jump, u_target = jax.random.uniform(key, (2,) + y_BxSxK.shape, dtype)
  is_mask = y_BxSxK == mask_id
  is_digit = y_BxSxK == d_BxSxK
  rate_digit = jnp.where(is_digit, 0.0, to_digit).astype(dtype)
  rate_mask = jnp.where(is_mask, 0.0, to_mask).astype(dtype)
  total = rate_digit + rate_mask
  p_jump = -jnp.expm1(-h * total)
  jump = free_BxSxK & (u_jump < p_jump)  # a NaN rate compares False: no jump
  to_d = is_mask | (~is_digit & (u_target * total < rate_digit))
  return jnp.where(jump, jnp.where(to_d, d_BxSxK, mask_id), y_BxSxK)


# -- the sampler -----------------------------------------------------------------------------------


def sample(key: jax.Array, logits_fn: Callable[..., jax.Array], codec, *, shape,
           settings: ImageSamplerSettings = ImageSamplerSettings(),
           condition: Optional[tuple[jax.Array, jax.Array]] = None, params: Any = None,
           decode: bool = True) -> SampleOutput:
  """Draws token grids of `shape` = (B, *S) with the reference image sampler (module docstring).

  Args:
    key: PRNG key; randomness is a function of (key, step).
    logits_fn: y (B, *S, K) -> logits (B, *S, C), or logits_fn(params, y) when `params` is given.
    codec: the sub-token `Codec` (C = 256 for pixels).
    settings: `ImageSamplerSettings`.
    condition: (tokens (B, *S), keep (B, *S) bool): kept tokens are given and never change.
    params: optional pytree passed to logits_fn (an argument of the compiled loop, not a constant).
    decode: False returns the sub-tokens (B, *S, K) instead of ids.

  Returns SampleOutput(tokens, nfe, idle_steps): idle_steps counts the steps k < T-1 in which no
  sub-token of the batch changed. Compiles itself; with precision='fp64' and jax_enable_x64 off it
  must be called outside jit (it opens its own x64 scope), like `samplers.sample`.
  """
  if not isinstance(settings, ImageSamplerSettings):
    raise TypeError(f'settings must be an ImageSamplerSettings, got {type(settings).__name__}.')
  shape = tuple(int(d) for d in shape)
  if condition is None:
    cond_tokens = jnp.zeros(shape, jnp.int32)
    cond_keep = jnp.zeros(shape, bool)
  else:
    cond_tokens, cond_keep = condition
    if tuple(cond_tokens.shape) != shape or tuple(cond_keep.shape) != shape:
      raise ValueError(f'condition arrays must have shape {shape}, got {cond_tokens.shape} and '
                       f'{cond_keep.shape}.')
  st = settings
  compiled = functools.partial(
      _sample_jit, logits_fn=logits_fn, codec=codec, shape=shape, num_steps=st.num_steps,
      carry_over=st.carry_over, use_corrector=st.use_corrector, precision=st.precision,
      with_params=params is not None, decode=bool(decode))

  def run(*args):
    # Only the switches that change the program are static. The step tables (temperature,
    # corrector, timestep and schedule numbers, which the reference grid-searched), `cache` and
    # `invalid` are arguments, so sweeping them reuses one compiled program.
    dtype = jnp.float64 if st.precision == 'fp64' else jnp.float32
    tables = {k: jnp.asarray(v, dtype) for k, v in st.step_tables().items()}
    return compiled(*args, tables, jnp.asarray(st.cache), jnp.asarray(st.invalid == 'redraw'))

  return samplers.run_in_precision(run, settings.precision, key, cond_tokens, cond_keep, params)


@functools.partial(jax.jit, static_argnames=(
    'logits_fn', 'codec', 'shape', 'num_steps', 'carry_over', 'use_corrector', 'precision',
    'with_params', 'decode'))
def _sample_jit(key, cond_tokens, cond_keep, params, tables, cache, repair, *, logits_fn, codec,
                shape, num_steps, carry_over, use_corrector, precision, with_params,
                decode) -> SampleOutput:
  T, mask_id = num_steps, codec.mask_id
  dtype = jnp.float64 if precision == 'fp64' else jnp.float32
  has_invalid = codec.num_invalid > 0  # else there is nothing to repair

  def call(y_BxSxK):
    logits_BxSxC = logits_fn(params, y_BxSxK) if with_params else logits_fn(y_BxSxK)
    return logits_BxSxC.astype(dtype)

  def log_p_at(logits_BxSxC, y_BxSxK, k):
    # tau = 1 without a temperature: x / 1.0 == x exactly, so no switch is needed.
    return parameterization.log_probs(logits_BxSxC / tables['tau'][k], y_BxSxK, codec,
                                      carry_over=False)

  def marginal_draw(k_draw, log_p_BxSxC):
    probs_BxSxKxb = jnp.exp(parameterization.digit_marginals(log_p_BxSxC, codec))
    return draw_tokens(k_draw, probs_BxSxKxb, precision)

  free_BxSxK = jnp.broadcast_to(~cond_keep[..., None], shape + (codec.ell,))
  y0_BxSxK = jnp.where(cond_keep[..., None], codec.encode(cond_tokens),
                       jnp.full(shape + (codec.ell,), mask_id, jnp.int32))

  # Per-step keys: one split per step keeps the number of PRNG kernels (and compile time) small.
  def step_keys(k):
    return jax.random.split(jax.random.fold_in(key, k), 4)  # reveal, draw, corrector, second draw

  def update(y, logits, k, keys, reveal):
    """Predictor (+ corrector) from u_k to u_k+1 given the logits at y."""
    log_p = log_p_at(logits, y, k)
    if carry_over:
      d = marginal_draw(keys[1], log_p)
    else:
      d = codec.encode(draw_tokens(keys[1], jnp.exp(log_p), precision))
    y = jnp.where(reveal, d, y)
    if use_corrector:
      if carry_over:
        d = marginal_draw(keys[3], log_p)
      y = corrector_jump(keys[2], y, d, free_BxSxK,
                         to_digit=tables['to_digit'][k], to_mask=tables['to_mask'][k],
                         h=tables['h'][k], mask_id=mask_id)
    return y

  # The logits of the last call are carried only with the corrector: without it every call is
  # followed by a change of y, so they could never be reused.
  def get_logits(y, cached, valid):
    """(logits at y, whether the network was called)."""
    if not use_corrector:
      return call(y), jnp.asarray(True)
    reuse = cache & valid
    return jax.lax.cond(reuse, lambda y, c: c, lambda y, c: call(y), y, cached), ~reuse

  def step(k, carry):
    y, cached, valid, nfe, idle = carry
    keys = step_keys(k)
    reveal = (y == mask_id) & (jax.random.uniform(keys[0], y.shape, dtype) < tables['reveal'][k])
    if use_corrector:
      logits, called = get_logits(y, cached, valid)
      y_new = update(y, logits, k, keys, reveal)
      changed = jnp.any(y_new != y)
      cached, valid = logits, ~changed
    else:
      changed = jnp.any(reveal)  # known before the call: an idle step needs no prediction
      called = changed | ~cache
      y_new = jax.lax.cond(called, lambda y: update(y, call(y), k, keys, reveal), lambda y: y, y)
    nfe, idle = nfe + called.astype(jnp.int32), idle + (~changed).astype(jnp.int32)
    return y_new, cached, valid, nfe, idle

  zero = jnp.zeros((), jnp.int32)
  if use_corrector:
    cached0 = jnp.zeros(jax.eval_shape(call, y0_BxSxK).shape, dtype)
  else:
    cached0 = jnp.zeros((), dtype)
  carry = (y0_BxSxK, cached0, jnp.zeros((), bool), zero, zero)
  if T > 1:
    carry = jax.lax.fori_loop(0, T - 1, step, carry)
  y, cached, valid, nfe, idle = carry

  # Last step at u_{T-1}: fill every remaining mask; repair invalid codes.
  keys = step_keys(T - 1)
  remaining = y == mask_id

  def finish(y):
    logits, called = get_logits(y, cached, valid)
    log_p = log_p_at(logits, y, T - 1)
    x_hat = draw_tokens(keys[1], jnp.exp(log_p), precision)
    if carry_over:
      fill = marginal_draw(keys[3], log_p)
    else:
      fill = codec.encode(x_hat)
    y = jnp.where(remaining, fill, y)
    if has_invalid:
      bad = (codec.decode(y) >= codec.vocab_size) & ~cond_keep & repair
      y = jnp.where(bad[..., None], codec.encode(x_hat), y)
    return y, called

  needed = jnp.any(remaining) | ~cache
  if has_invalid:
    needed = needed | repair
  y, called = jax.lax.cond(needed, finish, lambda y: (y, jnp.asarray(False)), y)
  nfe = nfe + called.astype(jnp.int32)
  return SampleOutput(codec.decode(y) if decode else y, nfe, idle)
