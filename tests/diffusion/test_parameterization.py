"""Carry-over filter and digit marginals (method.md §3, 13.5-13.7, 13.21)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from prime_jax.diffusion import parameterization as param
from prime_jax.diffusion.subtokens import Codec

GPT2 = Codec(50257, 2)

# Jitted once per codec: far cheaper on CPU than compiling every eager op.
_consistent = jax.jit(param.consistent, static_argnums=1)
_log_probs = jax.jit(param.log_probs, static_argnums=2, static_argnames='carry_over')
_marginals = jax.jit(param.digit_marginals, static_argnums=1)


def _log_softmax_np(z):
  return z - logsumexp(z, axis=-1, keepdims=True)


def _consistent_np(y_t, codec):
  """Brute force: (..., C) class c agrees with every observed digit."""
  d = codec.digits  # (C, K)
  y = np.asarray(y_t)[..., None, :]
  return ((y == codec.mask_id) | (y == d)).all(-1)


def test_consistent_counts_gpt2():
  m = GPT2.mask_id
  v = np.arange(225)
  first = np.stack([v, np.full_like(v, m)], -1)   # first digit observed, second masked
  second = np.stack([np.full_like(v, m), v], -1)  # second digit observed, first masked
  extra = np.array([[m, m], [223, 81], [0, 0]])  # fully masked, fully observed
  counts = np.asarray(_consistent(np.concatenate([first, second, extra]), GPT2).sum(-1))
  np.testing.assert_array_equal(counts[:225], np.r_[np.full(223, 225), 82, 0])
  np.testing.assert_array_equal(counts[225:450], np.r_[np.full(82, 224), np.full(143, 223)])
  np.testing.assert_array_equal(counts[450:], [50257, 1, 1])


@pytest.mark.parametrize('codec', [Codec(20, 3), Codec(20, 3, shuffle_seed=0), Codec(16, 4)])
def test_consistent_brute_force(codec):
  # Every noisy token in (Y u {m})^K, including invalid digit combinations.
  y = np.array(list(itertools.product(range(codec.base + 1), repeat=codec.ell)))
  got = np.asarray(_consistent(y, codec))
  np.testing.assert_array_equal(got, _consistent_np(y, codec))


def _noisy_tokens(seed, codec, n):
  """n tokens encoded, each with a random subset of digits masked (all patterns appear)."""
  rng = np.random.default_rng(seed)
  x0 = rng.integers(0, codec.vocab_size, n)
  hide = rng.random((n, codec.ell)) < 0.5
  hide[0], hide[1] = True, False  # one fully masked, one fully observed
  y_t = np.where(hide, codec.mask_id, codec.digits[x0])
  return x0, y_t, hide


def _normal(seed, shape, scale=1.0, dtype=np.float32):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


@pytest.mark.parametrize('codec,x64', [
    (GPT2, False), (GPT2, True), (Codec(27, 3), True), (Codec(100, 4, shuffle_seed=0), False),
    (Codec(300, 2, shuffle_seed=1), True)])
def test_carry_over_normalization(codec, x64):
  with jax.enable_x64(x64):
    x0, y_t, hide = _noisy_tokens(0, codec, 16)
    logits = _normal(1, (16, codec.vocab_size), 3.0, np.float64 if x64 else np.float32)
    log_p = _log_probs(logits, y_t, codec)
    assert log_p.dtype == logits.dtype and log_p.shape == logits.shape
    p = np.exp(np.asarray(log_p, np.float64))
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=0, atol=1e-12 if x64 else 1e-5)
    cons = _consistent_np(y_t, codec)
    assert (p[~cons] == 0.0).all() and (p[cons] > 0).all()
    log_p0 = np.take_along_axis(np.asarray(log_p), np.asarray(x0)[:, None], -1)[:, 0]
    observed = ~hide.any(-1)
    assert observed.any() and (log_p0[observed] == 0.0).all()
    masked = hide.all(-1)
    plain = np.asarray(jax.jit(jax.nn.log_softmax)(logits))
    np.testing.assert_allclose(np.asarray(log_p)[masked], plain[masked], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(_log_probs(logits, y_t, codec, carry_over=False)),
                                  plain)
    # method.md §13.7: filtering raises log p(x0) by exactly -log sum_{consistent} softmax.
    plain0 = np.take_along_axis(plain, np.asarray(x0)[:, None], -1)[:, 0]
    assert (log_p0 >= plain0).all()
    mass = logsumexp(np.where(cons, plain.astype(np.float64), -np.inf), axis=-1)
    np.testing.assert_allclose(log_p0 - plain0, -mass, rtol=1e-5, atol=1e-5 if not x64 else 1e-10)


def test_logits_class_mismatch():
  with pytest.raises(ValueError, match='classes'):
    param.log_probs(jnp.zeros((2, 26)), jnp.zeros((2, 3), jnp.int32), Codec(27, 3))


def test_ell_one_is_mdlm_subs():
  codec = Codec(50, 1)
  assert codec.mask_id == 50
  rng = np.random.default_rng(0)
  x0 = rng.integers(0, 50, (4, 8))
  hide = rng.random((4, 8)) < 0.5
  y_t = np.where(hide, 50, x0)[..., None]
  logits = _normal(2, (4, 8, 50))
  log_p = np.asarray(_log_probs(logits, y_t, codec))
  np.testing.assert_allclose(log_p[hide], _log_softmax_np(logits)[hide], rtol=1e-5, atol=1e-6)
  obs = log_p[~hide]
  np.testing.assert_array_equal(np.take_along_axis(obs, x0[~hide][:, None], -1), 0.0)
  assert (np.exp(obs) == 0).sum() == obs.size - obs.shape[0]


def _marginals_np(log_p, codec):
  """Brute force (..., K, b) log P(digit j = v) by summing class probabilities by digit value."""
  p = np.exp(np.asarray(log_p, np.float64))
  out = np.zeros(p.shape[:-1] + (codec.ell, codec.base))
  for j in range(codec.ell):
    for v in range(codec.base):
      out[..., j, v] = p[..., codec.digits[:, j] == v].sum(-1)
  return out


FULL_PERM = Codec(20, 5, permutation=np.random.default_rng(1).permutation(32))  # codes >= C used


@pytest.mark.parametrize('codec', [Codec(20, 3), Codec(20, 3, shuffle_seed=0), Codec(256, 2),
                                   Codec(300, 2, shuffle_seed=1), Codec(20, 1), FULL_PERM],
                         ids=repr)
def test_digit_marginals_brute_force(codec):
  _, y_t, _ = _noisy_tokens(3, codec, 6)
  logits = _normal(4, (2, 3, codec.vocab_size), 2.0)
  log_p = _log_probs(logits, y_t.reshape(2, 3, -1), codec)
  marg = _marginals(log_p, codec)
  assert marg.shape == (2, 3, codec.ell, codec.base)
  np.testing.assert_allclose(np.exp(np.asarray(marg, np.float64)).sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.exp(np.asarray(marg, np.float64)), _marginals_np(log_p, codec),
                             atol=1e-6)


def test_digit_marginals_uniform_gpt2():
  """Uniform over the 50257 classes: digit counts of method.md §1.1; first digit 224 never
  occurs."""
  marg = np.exp(np.asarray(_marginals(np.full(50257, -np.log(50257), np.float32), GPT2),
                           np.float64))
  expected_first = np.r_[np.full(223, 225), 82, 0] / 50257
  expected_second = np.r_[np.full(82, 224), np.full(143, 223)] / 50257
  np.testing.assert_allclose(marg[0], expected_first, rtol=1e-5, atol=0)
  np.testing.assert_allclose(marg[1], expected_second, rtol=1e-5)
  assert marg[0, 224] == 0.0


@pytest.mark.parametrize('codec', [Codec(16, 4), Codec(256, 2), Codec(16, 4, shuffle_seed=2)],
                         ids=repr)
def test_digit_marginals_factorized_joint(codec):
  """method.md §13.21: marginals of a product of digit distributions recover the factors and the
  joint."""
  assert codec.num_invalid == 0
  with jax.enable_x64(True):
    log_q = _log_softmax_np(_normal(5, (3, codec.ell, codec.base), 1.0, np.float64))
    d = codec.digits  # (C, K): the code digits of every class
    log_joint = log_q[:, np.arange(codec.ell), d].sum(-1)  # (3, C)
    np.testing.assert_allclose(logsumexp(log_joint, -1), 0.0, atol=1e-12)
    marg = np.asarray(_marginals(log_joint, codec))
    np.testing.assert_allclose(marg, log_q, atol=1e-10)
    recombined = marg[:, np.arange(codec.ell), d].sum(-1)
    np.testing.assert_allclose(recombined, log_joint, atol=1e-10)


def test_digit_marginals_finite_grad():
  codec = Codec(20, 3)
  _, y_t, _ = _noisy_tokens(6, codec, 8)
  logits = jnp.asarray(_normal(7, (8, 20)))

  def f(logits):
    return param.digit_marginals(param.log_probs(logits, y_t, codec, carry_over=True), codec)

  grad = np.asarray(jax.jit(jax.grad(lambda z: f(z).sum()))(logits))
  assert np.isfinite(grad).all() and np.abs(grad).sum() > 0
  # Gradients reach only consistent classes.
  assert (grad[~_consistent_np(y_t, codec)] == 0).all()
