"""Exact expectations by enumeration, for tiny codecs (numpy, float64).

These are the ground truth the objectives are checked against (method.md §4.3, 13.13):
- - every mask pattern of n units (sub-tokens) is enumerated and weighted by its probability at time
  t;
- the integral over t is Gauss-Legendre quadrature;
- a model's own exact NLL is computed from its continuous-time generative process, which reveals the
  masked units one at a time in a uniformly random order, each drawn from its marginal given the
  current state (a dynamic programme over revealed subsets instead of the n! orders).
"""

from __future__ import annotations

import itertools
from typing import Callable

import numpy as np


def mask_patterns(num_units: int) -> np.ndarray:
  """(2**n, n) bool, True = masked. Row r is the binary expansion of r."""
  return np.array(list(itertools.product([False, True], repeat=num_units)), dtype=bool)


def pattern_probs(patterns: np.ndarray, alpha: float) -> np.ndarray:
  """P(pattern | t) when each unit is masked independently with probability 1 - alpha."""
  m = patterns.sum(-1)
  return (1.0 - alpha)**m * alpha**(patterns.shape[-1] - m)


def time_average(integrand: Callable[[float], float], t_lo: float = 0.0, t_hi: float = 1.0,
                 num_nodes: int = 64) -> float:
  """E_{t ~ U(t_lo, t_hi)} integrand(t) by Gauss-Legendre quadrature."""
  x, w = np.polynomial.legendre.leggauss(num_nodes)
  t = 0.5 * (t_hi - t_lo) * x + 0.5 * (t_hi + t_lo)
  return float(0.5 * np.sum(w * np.array([integrand(float(ti)) for ti in t])))


def expected_objective(loss_at: Callable[[float], np.ndarray], patterns: np.ndarray, schedule,
                       t_lo: float = 0.0, t_hi: float = 1.0, num_nodes: int = 64) -> float:
  """E_t E_{pattern | t}[loss], where loss_at(t) returns the (P,) loss of every pattern at time t
  (including any weight w(t))."""
  def integrand(t):
    return float(np.sum(pattern_probs(patterns, float(schedule.alpha(t))) * loss_at(t)))
  return time_average(integrand, t_lo, t_hi, num_nodes)


def posterior_token_probs(q: np.ndarray, codec, y: np.ndarray) -> np.ndarray:
  """Exact posterior p(x^i = c | y) of a distribution q over sequences of L tokens.

  q: (C,)*L probabilities. y: (L, K) digits with codec.mask_id for masked ones. Returns (L, C).
  """
  L = q.ndim
  ok = np.ones((L, codec.vocab_size), dtype=bool)
  for i in range(L):
    for j in range(codec.ell):
      if y[i, j] != codec.mask_id:
        ok[i] &= codec.digits[:, j] == y[i, j]
  post = q.copy()
  for i in range(L):
    shape = [1] * L
    shape[i] = -1
    post = post * ok[i].reshape(shape)
  post = post / max(post.sum(), 1e-300)  # impossible states (q = 0) give an all-zero row
  out = np.zeros((L, codec.vocab_size))
  for i in range(L):
    out[i] = post.sum(axis=tuple(a for a in range(L) if a != i))
  return out


def any_order_log_likelihood(x_digits: np.ndarray, unit_probs: Callable[[np.ndarray], np.ndarray],
                             mask_id: int) -> float:
  """log p(x) under the reveal-one-unit-at-a-time process, averaged over all orders.

  x_digits: (n,) the target digits. unit_probs(y) -> (n, b) the model's marginal of every unit given
  the current state y (n,) (masked units hold mask_id). Dynamic programme over revealed subsets:
  f(S + u) += f(S) * P(u = x_u | y_S) / (n - |S|).
  """
  n = x_digits.shape[0]
  f = np.zeros(2**n)
  f[0] = 1.0
  for subset in sorted(range(2**n), key=lambda s: bin(s).count('1')):
    if f[subset] == 0.0:
      continue
    revealed = np.array([(subset >> u) & 1 for u in range(n)], dtype=bool)
    remaining = n - revealed.sum()
    if remaining == 0:
      continue
    y = np.where(revealed, x_digits, mask_id)
    probs = unit_probs(y)
    for u in np.nonzero(~revealed)[0]:
      f[subset | (1 << u)] += f[subset] * probs[u, x_digits[u]] / remaining
  return float(np.log(f[-1]))
