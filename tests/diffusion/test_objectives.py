"""The objectives against exact enumeration (method.md §4.3, 13.10-13.13).

Every mask pattern of a token (or of a 2-token sequence) is enumerated, the JAX objectives are
evaluated on all of them at once, and the time integral is Gauss-Legendre quadrature.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prime_jax.diffusion import exact, forward, objectives, parameterization, schedules, subtokens

LINEAR = schedules.get('linear')


@pytest.fixture(autouse=True, scope='module')
def _x64():
  with jax.enable_x64(True):
    yield


def _all_cases(codec, L):
  """Every (x, pattern) pair: x (R, L), y_t (R, L, K), pattern (R, L*K) for R = C**L * 2**(L*K)."""
  xs = np.array(list(itertools.product(range(codec.vocab_size), repeat=L)))
  pats = exact.mask_patterns(L * codec.ell)
  x = np.repeat(xs, len(pats), axis=0)
  pat = np.tile(pats, (len(xs), 1))
  y0 = np.asarray(codec.encode(x))
  y_t = np.where(pat.reshape(y0.shape), codec.mask_id, y0)
  return xs, pats, x, y_t


def _expectations(codec, q, logits_of, L, schedule=LINEAR, carry_over=True):
  """Exact E_{x~q} E_t E_pattern of nelbo and paper_loss (per sequence, summed over tokens)."""
  xs, pats, x, y_t = _all_cases(codec, L)
  log_p = parameterization.log_probs(jnp.asarray(logits_of(y_t)), jnp.asarray(y_t), codec,
                                     carry_over=carry_over)
  ones = jnp.ones(x.shape[0])
  # With the linear schedule w(1) = 1, so these are the unweighted per-pattern losses.
  raw_nelbo = np.asarray(objectives.nelbo(log_p, x, y_t, ones, codec, schedule=LINEAR)).sum(-1)
  raw_paper = np.asarray(objectives.paper_loss(log_p, x, ones, schedule=LINEAR)).sum(-1)
  out = {}
  for name, raw in (('nelbo', raw_nelbo), ('paper', raw_paper)):
    raw = raw.reshape(len(xs), len(pats))
    per_x = np.array([
        exact.expected_objective(lambda t, r=r: float(schedule.weight(t)) * r, pats, schedule)
        for r in raw])
    out[name] = per_x
  q_flat = q.reshape(-1)
  nll = -np.sum(q_flat[q_flat > 0] * np.log(q_flat[q_flat > 0]))
  return {k: float(np.sum(q_flat * v)) for k, v in out.items()}, nll, out


def _posterior_logits(codec, q):
  def logits_of(y_t):
    post = np.stack([exact.posterior_token_probs(q, codec, y) for y in y_t])
    return np.where(post > 0, np.log(np.maximum(post, 1e-300)), -1e9)
  return logits_of


@pytest.mark.parametrize('name,probs,nll,paper', [
    ('independent bits', [0.25, 0.25, 0.25, 0.25], math.log(4), math.log(4)),
    ('identical bits', [0.5, 0.0, 0.0, 0.5], math.log(2), 0.346574),
])
def test_spec_identity_values(name, probs, nll, paper):
  codec = subtokens.Codec(4, 2)
  q = np.array(probs)
  vals, exact_nll, _ = _expectations(codec, q, _posterior_logits(codec, q), L=1)
  assert exact_nll == pytest.approx(nll, abs=1e-12)
  assert vals['nelbo'] == pytest.approx(nll, abs=1e-6), name
  assert vals['paper'] == pytest.approx(paper, abs=1e-6), name


@pytest.mark.parametrize('C,ell,L', [(7, 2, 1), (16, 4, 1), (27, 3, 1), (20, 3, 1), (7, 2, 2),
                                     (5, 2, 2)])
def test_exact_posterior_nelbo_equals_nll_and_paper_is_below(C, ell, L):
  rng = np.random.default_rng(C * 10 + ell + L)
  codec = subtokens.Codec(C, ell)
  q = rng.dirichlet(0.3 * np.ones(C**L)).reshape((C,) * L)
  vals, nll, _ = _expectations(codec, q, _posterior_logits(codec, q), L=L)
  assert vals['nelbo'] == pytest.approx(nll, abs=1e-6)
  # The authors' objective is not a bound: it undercuts the true NLL when digits are dependent.
  assert vals['paper'] < nll - 1e-3


def test_shuffled_codec_exact_posterior():
  codec = subtokens.Codec(20, 3, shuffle_seed=3)
  q = np.random.default_rng(0).dirichlet(0.5 * np.ones(20))
  vals, nll, _ = _expectations(codec, q, _posterior_logits(codec, q), L=1)
  assert vals['nelbo'] == pytest.approx(nll, abs=1e-6)


def _state_index(y, base):
  """Index of noisy states y (R, n) over the symbols 0..base (mask = base)."""
  return np.sum(y * (base + 1)**np.arange(y.shape[-1])[::-1], axis=-1)


@pytest.mark.parametrize('C,ell,L,carry_over', [(20, 3, 1, True), (20, 3, 1, False),
                                                 (7, 2, 2, True), (16, 4, 1, True)])
def test_nelbo_bounds_a_random_models_own_nll(C, ell, L, carry_over):
  """A random model: a fixed table from the whole noisy state to logits for every token. Its own
  exact NLL (reveal-one-digit-at-a-time in uniformly random order) is below nelbo for every x."""
  codec = subtokens.Codec(C, ell)
  n = L * ell
  rng = np.random.default_rng(C + ell + L)
  table = 2.0 * rng.normal(size=((codec.base + 1)**n, L, C))

  def logits_of(y_t):
    return table[_state_index(np.asarray(y_t).reshape(len(y_t), n), codec.base)]

  vals_q = np.ones((C,) * L) / C**L  # the data distribution does not matter for per-x checks
  _, _, per_x = _expectations(codec, vals_q, logits_of, L=L, carry_over=carry_over)

  def unit_probs(y_flat):
    y = y_flat.reshape(1, L, ell)
    log_p = parameterization.log_probs(jnp.asarray(logits_of(y)), jnp.asarray(y), codec,
                                       carry_over=carry_over)[0]
    p = np.exp(np.asarray(log_p))  # (L, C)
    out = np.zeros((L, ell, codec.base))
    for j in range(ell):  # marginals by brute force from the digit table, not digit_marginals
      for v in range(codec.base):
        out[:, j, v] = p[:, codec.digits[:, j] == v].sum(-1)
    return out.reshape(n, codec.base)

  xs = np.array(list(itertools.product(range(C), repeat=L)))
  gaps = []
  for i, x in enumerate(xs):
    nll = -exact.any_order_log_likelihood(np.asarray(codec.encode(x)).reshape(-1), unit_probs,
                                          codec.mask_id)
    gaps.append(per_x['nelbo'][i] - nll)
  assert min(gaps) >= -1e-9
  assert max(gaps) > 1e-3  # a random model is far from its own posterior: the bound is not tight


def test_ell1_equals_mdlm_subs():
  """method.md §13.10: with K = 1 both objectives are MDLM's: -log softmax(x0)/t if masked, else
  0."""
  codec = subtokens.Codec(50, 1)
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(4, 8, 50)) * 3)
  x0 = jnp.asarray(rng.integers(0, 50, size=(4, 8)))
  t = jnp.asarray([0.1, 0.4, 0.7, 0.99])
  masked = jnp.asarray(rng.random((4, 8)) < 0.5)
  y_t = jnp.where(masked, codec.mask_id, x0)[..., None]
  log_p = parameterization.log_probs(logits, y_t, codec, carry_over=True)
  sched = schedules.get('loglinear')
  mdlm = jnp.where(masked, -jnp.take_along_axis(jax.nn.log_softmax(logits), x0[..., None], -1)[
      ..., 0] / t[:, None], 0.0)
  np.testing.assert_allclose(objectives.nelbo(log_p, x0, y_t, t, codec, schedule=sched), mdlm,
                             atol=1e-12)
  np.testing.assert_allclose(objectives.paper_loss(log_p, x0, t, schedule=sched), mdlm, atol=1e-12)


def test_loss_at_initialisation():
  """method.md §13.11: uniform logits, t ~ U(1e-3, 1), loglinear masking (exact integral over t)."""
  sched = schedules.get('loglinear')
  C = 50257
  cases = [(1, True, 'nelbo', 10.81408), (2, False, 'paper', 74.85065)]
  for ell, carry_over, key, expected in cases:
    codec = subtokens.Codec(C, ell)
    x0 = np.array([12345])
    pats = exact.mask_patterns(ell)
    y_t = np.where(pats, codec.mask_id, np.asarray(codec.encode(x0)))
    log_p = parameterization.log_probs(jnp.zeros((len(pats), C)), jnp.asarray(y_t), codec,
                                       carry_over=carry_over)
    xs = np.repeat(x0, len(pats))
    if key == 'nelbo':
      raw = objectives.nelbo(log_p, xs, y_t, jnp.ones(len(pats)), codec, schedule='linear')
    else:
      raw = objectives.paper_loss(log_p, xs, jnp.ones(len(pats)), schedule='linear')
    raw = np.asarray(raw)

    def integrand(t, raw=raw):
      return float(np.sum(exact.pattern_probs(pats, float(sched.alpha(t))) * raw) / t)

    # 1/t varies over three decades: integrate piecewise on a log grid of panels.
    edges = np.geomspace(1e-3, 1.0, 13)
    total = sum(exact.time_average(integrand, a, b, 32) * (b - a) for a, b in zip(edges, edges[1:]))
    assert total / (1 - 1e-3) == pytest.approx(expected, abs=2e-5)


def test_per_token_normalisation_and_units():
  loss = jnp.arange(6.0).reshape(2, 3)
  assert float(objectives.token_mean(loss)) == pytest.approx(2.5)
  w = jnp.array([[1, 1, 0], [1, 0, 0]])
  assert float(objectives.token_mean(loss, w)) == pytest.approx((0 + 1 + 3) / 3)
  assert float(objectives.perplexity(jnp.log(2.0))) == pytest.approx(2.0)
  assert float(objectives.nats_to_bits(jnp.log(8.0))) == pytest.approx(3.0)
  # The count is per original token: nelbo returns (B, L) whatever K is.
  for ell in (1, 2, 4):
    codec = subtokens.Codec(256, ell)
    x0 = jnp.zeros((2, 5), jnp.int32)
    y_t = jnp.full((2, 5, ell), codec.mask_id)
    log_p = parameterization.log_probs(jnp.zeros((2, 5, 256)), y_t, codec)
    out = objectives.nelbo(log_p, x0, y_t, jnp.ones(2), codec, schedule='linear')
    assert out.shape == (2, 5)
    # Fully masked, uniform model: the bound is ln 256 whatever K (no invalid codes).
    np.testing.assert_allclose(out, math.log(256), rtol=1e-10)


def test_nelbo_jit_matches_eager_and_has_finite_gradients():
  codec = subtokens.Codec(20, 3)
  rng = np.random.default_rng(1)
  x0 = jnp.asarray(rng.integers(0, 20, size=(3, 6)))
  key = jax.random.key(0)
  t = forward.sample_times(key, 3)
  y_t = forward.mask(jax.random.key(1), codec.encode(x0), t, schedule='loglinear',
                     mask_id=codec.mask_id)
  logits = jnp.asarray(rng.normal(size=(3, 6, 20)), jnp.float32)

  def loss(logits):
    log_p = parameterization.log_probs(logits, y_t, codec)
    return objectives.token_mean(objectives.nelbo(log_p, x0, y_t, t, codec, schedule='loglinear'))

  np.testing.assert_allclose(jax.jit(loss)(logits), loss(logits), rtol=1e-6)
  g = jax.grad(loss)(logits)
  assert bool(jnp.all(jnp.isfinite(g)))
  assert float(jnp.abs(g).sum()) > 0


def test_image_paper_loss_is_unweighted_cross_entropy():
  codec = subtokens.Codec(256, 2)
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 3, 256)))
  x0 = jnp.zeros((2, 4, 4, 3), jnp.int32)
  y_t = jnp.full(x0.shape + (2,), codec.mask_id)
  log_p = parameterization.log_probs(logits, y_t, codec)
  np.testing.assert_allclose(objectives.image_paper_loss(log_p, x0),
                             -jax.nn.log_softmax(logits)[..., 0], rtol=1e-12)
