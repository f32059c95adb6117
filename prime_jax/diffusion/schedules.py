"""Masking schedules (method.md §2) in one convention: t = 0 is clean, t = 1 is fully masked.

alpha(t) is the probability that a sub-token is still unmasked at time t. The continuous-time NELBO
weight is w(t) = -alpha'(t) / (1 - alpha(t)); for the reference text schedule it is exactly 1/t.

The image code of the reference runs time the other way (t' = 0 masked, alpha = t'**n); `poly` is
that schedule with t = 1 - t'.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A masking schedule. Frozen and hashable, so it can be a static argument of `jax.jit`.

  name: 'loglinear' | 'linear' | 'poly' | 'cosine'.
  eps:  loglinear only: masking probability is (1 - eps) * t.
  n:    poly only: alpha(t) = (1 - t)**n.
  """
  name: str
  eps: float = 0.0
  n: float = 1.0

  def alpha(self, t):
    t = jnp.asarray(t)
    if self.name in ('loglinear', 'linear'):
      return 1.0 - (1.0 - self.eps) * t
    if self.name == 'poly':
      return (1.0 - t)**self.n
    if self.name == 'cosine':
      return jnp.cos(0.5 * math.pi * t)
    raise AssertionError(self.name)

  def dalpha(self, t):
    """d alpha / dt, in closed form (equal to jax.grad(alpha))."""
    t = jnp.asarray(t)
    if self.name in ('loglinear', 'linear'):
      return jnp.full_like(t, -(1.0 - self.eps), dtype=jnp.result_type(t, float))
    if self.name == 'poly':
      return -self.n * (1.0 - t)**(self.n - 1.0)
    if self.name == 'cosine':
      return -0.5 * math.pi * jnp.sin(0.5 * math.pi * t)
    raise AssertionError(self.name)

  def weight(self, t):
    """w(t) = -alpha'(t) / (1 - alpha(t)), the per-masked-unit NELBO weight."""
    t = jnp.asarray(t)
    if self.name in ('loglinear', 'linear'):
      return 1.0 / t  # (1-eps) / ((1-eps) t), written exactly
    if self.name == 'poly':
      return self.n * (1.0 - t)**(self.n - 1.0) / -jnp.expm1(self.n * jnp.log1p(-t))
    return -self.dalpha(t) / (1.0 - self.alpha(t))

  def mask_prob(self, t):
    return 1.0 - self.alpha(t)

  def sigma(self, t):
    """MDLM's total noise sigma(t) = -log alpha(t)."""
    return -jnp.log(self.alpha(t))

  def dsigma(self, t):
    return -self.dalpha(t) / self.alpha(t)

  def reveal_prob(self, t, s):
    """P(a sub-token masked at t is unmasked at s < t) = (alpha(s) - alpha(t)) / (1 - alpha(t))."""
    return (self.alpha(s) - self.alpha(t)) / (1.0 - self.alpha(t))


def get(name: str, **kwargs) -> Schedule:
  """Builds a schedule: 'loglinear' (eps=1e-3, the reference text one), 'linear', 'poly' (n=3,
  the reference image one), 'cosine'."""
  if name == 'loglinear':
    eps = float(kwargs.pop('eps', 1e-3))
    if not 0.0 <= eps < 1.0:
      raise ValueError(f'loglinear eps must lie in [0, 1), got {eps}.')
    sched = Schedule('loglinear', eps=eps)
  elif name == 'linear':
    sched = Schedule('linear')
  elif name == 'poly':
    n = float(kwargs.pop('n', 3.0))
    if n <= 0:
      raise ValueError(f'poly exponent n must be > 0, got {n}.')
    sched = Schedule('poly', n=n)
  elif name == 'cosine':
    sched = Schedule('cosine')
  else:
    raise ValueError(f'Unknown schedule {name!r}; choose loglinear, linear, poly or cosine.')
  if kwargs:
    raise ValueError(f'Unexpected arguments for schedule {name!r}: {sorted(kwargs)}.')
  return sched


def as_schedule(schedule) -> Schedule:
  return schedule if isinstance(schedule, Schedule) else get(schedule)


def sampling_grid(num_steps: int, t_min: float = 1e-5) -> np.ndarray:
  """Reverse-time grid t_0 = 1 > ... > t_T = t_min (the reference text sampler: linspace))."""
  if num_steps < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}.')
  if not 0.0 <= t_min < 1.0:
    raise ValueError(f't_min must lie in [0, 1), got {t_min}.')
  return np.linspace(1.0, t_min, num_steps + 1)
