"""Schedules and the forward process (method.md §2, 13.8, 13.9)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prime_jax.diffusion import forward, schedules

_times = jax.jit(forward.sample_times, static_argnums=1, static_argnames=('eps', 'antithetic'))

# name -> (schedule, numpy reference alpha(t)); t = 0 clean, t = 1 all masked.
SCHEDULES = {
    'loglinear': (schedules.get('loglinear'), lambda t: 1 - (1 - 1e-3) * t),
    'linear': (schedules.get('linear'), lambda t: 1 - t),
    'poly3': (schedules.get('poly', n=3), lambda t: (1 - t)**3),  # image alpha = t'**3, t' = 1-t
    'cosine': (schedules.get('cosine'), lambda t: np.cos(np.pi * t / 2)),
}


def _all_quantities(sched, t, s):
  return dict(alpha=sched.alpha(t), dalpha=sched.dalpha(t), weight=sched.weight(t),
              reveal=sched.reveal_prob(t, s), mask=sched.mask_prob(t),
              grad=jax.vmap(jax.grad(sched.alpha))(t), ends=sched.alpha(jnp.array([0.0, 1.0])))


@pytest.mark.parametrize('name', list(SCHEDULES))
def test_schedule_calculus(name):
  sched, alpha_np = SCHEDULES[name]
  with jax.enable_x64(True):
    t = np.linspace(1e-3, 1.0, 201)
    s = 0.7 * t
    q = jax.jit(_all_quantities, static_argnums=0)(sched, t, s)
    q = {k: np.asarray(v) for k, v in q.items()}
  alpha = q['alpha']
  assert alpha.dtype == np.float64
  np.testing.assert_allclose(alpha, alpha_np(t), rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(q['ends'], [1.0, alpha_np(1.0)], rtol=0, atol=1e-12)
  assert (np.diff(alpha) < 0).all()
  np.testing.assert_allclose(q['dalpha'], q['grad'], rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(q['weight'], -q['dalpha'] / (1.0 - alpha), rtol=1e-10)
  np.testing.assert_allclose(q['reveal'], (alpha_np(s) - alpha) / (1.0 - alpha), rtol=1e-12)
  np.testing.assert_allclose(q['mask'], 1.0 - alpha, rtol=1e-12)
  # fp32 path agrees too.
  t32 = np.linspace(0.05, 0.95, 19, dtype=np.float32)
  q32 = jax.jit(_all_quantities, static_argnums=0)(sched, t32, 0.5 * t32)
  assert q32['alpha'].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(q32['dalpha']), np.asarray(q32['grad']), rtol=1e-5)
  expected_weight = -np.asarray(q32['dalpha']) / (1 - alpha_np(t32))
  np.testing.assert_allclose(np.asarray(q32['weight']), expected_weight, rtol=1e-4)


def test_loglinear_spec_13_8():
  sched = schedules.get('loglinear')
  with jax.enable_x64(True):
    t = np.geomspace(1e-3, 1.0, 400)
    sigma = np.asarray(sched.sigma(t))
    np.testing.assert_allclose(-np.expm1(-sigma) / ((1 - 1e-3) * t), 1.0, rtol=1e-12)
    np.testing.assert_allclose(t * np.asarray(sched.dsigma(t)) / np.expm1(sigma), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(sched.weight(t)) * t, 1.0, rtol=1e-15)
    np.testing.assert_allclose(np.asarray(sched.mask_prob(t)), (1 - 1e-3) * t, rtol=1e-12)


def test_linear_reveal_and_grid():
  sched = schedules.get('linear')
  with jax.enable_x64(True):
    t = np.array([1.0, 0.5, 0.3, 0.01])
    s = np.array([0.75, 0.1, 0.29, 0.0])
    np.testing.assert_allclose(np.asarray(sched.reveal_prob(t, s)), (t - s) / t, rtol=1e-12)
  np.testing.assert_array_equal(schedules.sampling_grid(4, 1e-5), np.linspace(1, 1e-5, 5))
  grid = schedules.sampling_grid(1)
  assert grid.shape == (2,) and grid[0] == 1.0 and grid[1] == 1e-5


def test_schedule_errors():
  for name, kwargs in [('nope', {}), ('loglinear', {'eps': 1.0}), ('loglinear', {'eps': -0.1}),
                       ('linear', {'eps': 1e-3}), ('poly', {'n': 0}), ('cosine', {'n': 2})]:
    with pytest.raises(ValueError):
      schedules.get(name, **kwargs)
  with pytest.raises(ValueError):
    schedules.sampling_grid(0)
  assert schedules.get('loglinear', eps=1e-2).eps == 1e-2
  assert hash(schedules.get('poly', n=3)) == hash(schedules.get('poly', n=3.0))


@pytest.mark.parametrize('n', [1, 2, 3, 7, 64, 256, 1024, 4096])
def test_antithetic_strata(n):
  eps = 1e-3
  for seed in range(4):
    t = np.asarray(_times(jax.random.key(seed), n)).astype(np.float64)
    assert t.shape == (n,) and (t >= eps).all() and (t < 1).all()
    pos = (np.sort(t) - eps) / (1 - eps) * n
    np.testing.assert_array_equal(np.floor(pos), np.arange(n))
    if n >= 7:  # an independent offset in each stratum, not one shared offset
      frac = pos - np.arange(n)
      assert np.ptp(frac) > 0.1 and abs(frac.mean() - 0.5) < 5 / np.sqrt(12 * n)


def test_iid_times():
  t = np.asarray(_times(jax.random.key(0), 20000, antithetic=False, eps=0.1))
  assert (t >= 0.1).all() and (t < 1).all()
  # U(0.1, 1): mean 0.55, sd 0.9/sqrt(12); 5 standard errors.
  assert abs(t.mean() - 0.55) < 5 * 0.9 / np.sqrt(12 * 20000)
  assert abs(np.mean(t < 0.55) - 0.5) < 5 * 0.5 / np.sqrt(20000)
  # Not stratified: the sorted times are not one per stratum.
  stratum = np.floor((np.sort(t[:64]) - 0.1) / 0.9 * 64)
  assert not np.array_equal(stratum, np.arange(64))


def _within_binomial(count, n, p, z=5.0):
  return abs(count - n * p) <= z * np.sqrt(n * p * (1 - p)) + 1e-9


# One y0 shape throughout, and eager forward.mask: the uniform sampler then compiles only once.
Y0_SHAPE = (64, 256, 4)


@pytest.mark.parametrize('name', list(SCHEDULES))
def test_mask_rate_scalar_t(name):
  sched, alpha_np = SCHEDULES[name]
  mask_id = 9
  y0 = np.random.default_rng(1).integers(0, mask_id, Y0_SHAPE).astype(np.int32)
  for i, t in enumerate([0.05, 0.3, 0.6, 0.9]):
    y_t = np.asarray(forward.mask(jax.random.key(10 + i), y0, t, schedule=sched, mask_id=mask_id))
    masked = y_t == mask_id
    np.testing.assert_array_equal(y_t[~masked], y0[~masked])
    p = 1 - alpha_np(t)
    assert _within_binomial(masked.sum(), masked.size, p), (name, t, masked.mean(), p)


def test_mask_per_sequence_t_and_name():
  t = np.resize(np.array([0.0, 0.1, 0.5, 0.9, 1.0], np.float32), Y0_SHAPE[0])
  y0 = np.zeros(Y0_SHAPE, np.int32)
  y_t = np.asarray(forward.mask(jax.random.key(3), y0, t, schedule='linear', mask_id=2))
  assert set(np.unique(y_t)) <= {0, 2}
  masked = (y_t == 2).reshape(len(t), -1)
  assert masked[t == 0].sum() == 0 and masked[t == 1].all()
  for p in (0.1, 0.5, 0.9):
    rows = masked[np.isclose(t, p)]
    assert _within_binomial(rows.sum(), rows.size, p)
    assert all(_within_binomial(row.sum(), row.size, p) for row in rows)


def test_mask_independent_across_subtokens():
  p = 0.4  # linear: mask prob = t
  y0 = np.ones(Y0_SHAPE, np.int32)
  y_t = np.asarray(forward.mask(jax.random.key(4), y0, p, schedule='linear', mask_id=5))
  masked = (y_t == 5).reshape(-1, Y0_SHAPE[-1])
  n = masked.shape[0]
  assert _within_binomial(masked[:, :2].all(-1).sum(), n, p**2)
  assert _within_binomial((masked[:, 0] & ~masked[:, 1]).sum(), n, p * (1 - p))
  assert _within_binomial(masked.all(-1).sum(), n, p**4)
  assert _within_binomial((~masked).all(-1).sum(), n, (1 - p)**4)
