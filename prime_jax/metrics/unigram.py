"""The context-free baseline: the training unigram's cross-entropy and, exactly, its NELBO integrand
and the expectation of the evaluator's estimate for it (the control variate's known mean).

Dimension key: C token classes, K sub-tokens per token.
"""

from __future__ import annotations

import warnings

import numpy as np


def cross_entropy(log_p_C: np.ndarray, counts_C: np.ndarray) -> float:
  """Cross-entropy (nats/token) of the unigram log p on tokens with histogram counts_C."""
  counts = np.asarray(counts_C, np.float64)
  return float(-(counts * np.asarray(log_p_C, np.float64)).sum() / counts.sum())


def integrand_coefficients(log_p_C: np.ndarray, counts_C: np.ndarray,
                                   codec) -> np.ndarray:
  """(ell + 1,) A_k: the unigram integrand is w(t) sum_k m^k (1 - m)^(ell - k) A_k (see below).

  A_k = sum over visible sets V with k masked digits M of the token mean (weights counts_C) of
  sum_{j in M} [log S_V(x) - log S_{V + j}(x)], S_V(x) = p(tokens whose digits in V equal x's).
  Enumerates the 2^ell visible sets once, O(2^ell C).
  """
  p = np.exp(np.asarray(log_p_C, np.float64))
  p = p / p.sum()
  counts = np.asarray(counts_C, np.float64)
  digits = np.asarray(codec.digits, np.int64)  # (C, K)
  C, K = digits.shape
  if p.shape != (C,) or counts.shape != (C,):
    raise ValueError(f'log_p_C {p.shape} and counts_C {counts.shape} must both be ({C},).')
  if counts.sum() <= 0:
    raise ValueError('counts_C is empty: the unigram integrand needs the evaluated tokens.')
  log_S = {}
  for v in range(2**K):
    cols = [j for j in range(K) if v >> j & 1]
    if not cols:
      log_S[v] = np.zeros(C)
      continue
    key = np.zeros(C, np.int64)
    for j in cols:
      key = key * codec.base + digits[:, j]
    _, inv = np.unique(key, return_inverse=True)
    log_S[v] = np.log(np.bincount(inv, weights=p)[inv])
  coef = np.zeros(K + 1)
  for v in range(2**K):  # v: the visible set, M = the rest
    masked = [j for j in range(K) if not v >> j & 1]
    if masked:
      per_token = sum(log_S[v] - log_S[v | 1 << j] for j in masked)
      coef[len(masked)] += (counts * per_token).sum() / counts.sum()
  return coef


def _integrand_from(coef: np.ndarray, schedule, t: float) -> float:
  K = coef.size - 1
  m, w = float(schedule.mask_prob(t)), float(schedule.weight(t))
  return w * sum(m**k * (1.0 - m)**(K - k) * coef[k] for k in range(1, K + 1))


def integrand(log_p_C: np.ndarray, counts_C: np.ndarray, codec, schedule,
                      t: float) -> float:
  """Exact NELBO integrand at time t (nats per token) of the unigram model p, over tokens counts_C.

  With tokens independent, the unigram with carry-over is the exact posterior, so this is the
  floor a model without context reaches at t: a trained model above it at small t uses no context.
  Per token x, with V the visible digits (each masked independently with prob m = 1 - alpha(t)),
    w(t) sum_M m^|M| (1 - m)^(ell - |M|) sum_{j in M} [log S_V(x) - log S_{V + j}(x)],
  S_V(x) = p(tokens whose digits in V equal those of x). Integrated over t it is -log p(x): the
  NELBO is tight for this model (tested). Enumerates the 2^ell visible sets, O(2^ell C).
  """
  return _integrand_from(integrand_coefficients(log_p_C, counts_C, codec), schedule, t)


def expected_estimate(log_p_C: np.ndarray, counts_C: np.ndarray, codec, schedule,
                              eps: float) -> float:
  """The exact expectation (nats/token) of the evaluator's Monte Carlo bound for the unigram
  model p on tokens counts_C: the mean of the integrand over t ~ U[eps, 1), by quadrature.

  It is -log p(x) up to the part of the t-integral below eps. `evaluate.Evaluator` subtracts the
  unigram's estimate on its own draws and adds this back (a control variate).
  """
  from scipy import integrate  # pylint: disable=import-outside-toplevel
  coef = integrand_coefficients(log_p_C, counts_C, codec)
  f = lambda t: _integrand_from(coef, schedule, t)
  # Split at a few points: w(t) ~ 1/t varies fastest near eps.
  edges = [eps] + [x for x in (1e-2, 1e-1, 0.5) if eps < x < 1.0] + [1.0]
  with warnings.catch_warnings():  # quad warns of roundoff at tolerances far below the SE
    warnings.simplefilter('ignore', integrate.IntegrationWarning)
    total = sum(integrate.quad(f, a, b, epsabs=1e-10, epsrel=1e-9, limit=200)[0]
                for a, b in zip(edges[:-1], edges[1:]))
  return total / (1.0 - eps)
