"""The vocabulary-tiled head + objectives equal the plain composition, in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prime_jax.diffusion import forward, fused_head, objectives, parameterization, subtokens


@pytest.mark.parametrize('C,ell,shuffle,carry_over,keep', [
    (50, 2, None, True, True), (50, 2, None, False, False), (20, 3, 3, True, True),
    (50, 1, None, True, False), (1000, 4, None, True, True), (1000, 4, None, True, False)])
def test_head_losses_match_composition(C, ell, shuffle, carry_over, keep):
  codec = subtokens.Codec(C, ell, shuffle_seed=shuffle)
  rng = np.random.default_rng(C + ell)
  B, L, D = 3, 5, 8
  h = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  W = jnp.asarray(rng.normal(size=(D, C)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(C,)), jnp.float32)
  x0 = jnp.asarray(rng.integers(0, C, (B, L)))
  t = jnp.asarray([0.2, 0.5, 0.9])
  y = forward.mask(jax.random.key(0), codec.encode(x0), t, schedule='loglinear',
                   mask_id=codec.mask_id)

  def composed(h, W, b):
    log_p = parameterization.log_probs(jnp.einsum('bld,dc->blc', h, W) + b, y, codec,
                                       carry_over=carry_over)
    o = {'paper': objectives.paper_loss(log_p, x0, t, schedule='loglinear'),
         'nelbo': objectives.nelbo(log_p, x0, y, t, codec, schedule='loglinear')}
    return 0.7 * o['paper'].sum() + 1.3 * o['nelbo'].sum(), o

  def tiled(h, W, b):
    o = fused_head.head_losses(h, W, b, x0, y, t, codec, schedule='loglinear',
                               carry_over=carry_over, tile=16,
                               keep_logits_bytes=2**30 if keep else 0)
    return 0.7 * o['paper'].sum() + 1.3 * o['nelbo'].sum(), o

  def fused(h, W, b):
    o = objectives.fused_losses(jnp.einsum('bld,dc->blc', h, W) + b, x0, y, t, codec,
                                schedule='loglinear', carry_over=carry_over)
    return 0.7 * o['paper'].sum() + 1.3 * o['nelbo'].sum(), o

  (_, o_ref), g_ref = jax.value_and_grad(composed, argnums=(0, 1, 2), has_aux=True)(h, W, b)
  for fn in (tiled, fused):
    (_, o), g = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))(h, W, b)
    for k in ('paper', 'nelbo'):
      np.testing.assert_allclose(o[k], o_ref[k], rtol=1e-5, atol=1e-5)
    for a, c in zip(g, g_ref):
      np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5 * float(jnp.abs(c).max()))


def test_paper_only_skips_nelbo():
  codec = subtokens.Codec(30, 2)
  h = jnp.ones((1, 2, 4))
  out = fused_head.head_losses(h, jnp.zeros((4, 30)), jnp.zeros(30), jnp.zeros((1, 2), jnp.int32),
                               jnp.full((1, 2, 2), codec.mask_id), jnp.ones(1), codec,
                               schedule='linear', with_nelbo=False)
  assert set(out) == {'paper'}
  np.testing.assert_allclose(out['paper'], np.log(30), rtol=1e-6)  # uniform over 30 classes


_COMPACT_CASES = [(ell, nelbo, single, t_range)
                  for ell, nelbo, single in [(2, True, False), (1, False, False), (3, True, False),
                                             (2, True, True), (3, False, True)]
                  # Compact branch, overflow of the full head's chunk, and with the one-digit
                  # path (0.4, 0.6): overflow of the one-digit chunk.
                  for t_range in [(0.01, 0.2), (0.9, 1.0)] + ([(0.4, 0.6)] if single else [])]


@pytest.mark.parametrize('ell,with_nelbo,single,t_range', _COMPACT_CASES)
def test_compact_head_equals_full_head(ell, with_nelbo, single, t_range):
  """Running the head only on tokens with a masked sub-token (and, with `single`, the tokens with
  exactly one through their b candidates) changes no value and no gradient, whether the rows fit
  their capacity (compacted) or not (the overflow chunks)."""
  C, B, L, D = 300, 16, 64, 8
  codec = subtokens.Codec(C, ell)
  rng = np.random.default_rng(ell)
  h = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  W = jnp.asarray(rng.normal(size=(D, C)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(C,)), jnp.float32)
  x0 = jnp.asarray(rng.integers(0, C, (B, L)))
  t = jnp.asarray(np.linspace(*t_range, B), jnp.float32)
  y = forward.mask(jax.random.key(1), codec.encode(x0), t, schedule='loglinear',
                   mask_id=codec.mask_id)
  fraction = 0.3
  cap = fused_head.head_capacity(B * L, fraction)
  n_masked = jnp.sum(y == codec.mask_id, axis=-1)
  n_full = int(jnp.sum(n_masked >= (2 if single else 1)))
  n_single = int(jnp.sum(n_masked == 1))
  assert cap < B * L
  if t_range != (0.4, 0.6):
    assert (n_full <= cap) == (t_range[1] < 0.5), (n_full, cap)
  if single:  # the one-digit chunk overflows at t ~ 1/2, where ell t (1 - t)^(ell - 1) peaks
    assert (n_single > cap) == (t_range == (0.4, 0.6) and ell == 2), (n_single, cap)

  def loss(h, W, b, fraction):
    o = fused_head.head_losses(h, W, b, x0, y, t, codec, schedule='loglinear', tile=64,
                               with_nelbo=with_nelbo, active_fraction=fraction,
                               single_fraction=fraction if single else 0.0)
    total = o['paper'].sum() + (1.3 * o['nelbo'].sum() if with_nelbo else 0.0)
    return total, o

  grad = lambda f: jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                           static_argnums=3)(h, W, b, f)
  (_, o_ref), g_ref = grad(0.0)
  (_, o), g = grad(fraction)
  for k in o_ref:
    np.testing.assert_allclose(o[k], o_ref[k], rtol=1e-5, atol=1e-5)
  for a, c in zip(g, g_ref):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5 * float(jnp.abs(c).max()))
  # Fully visible tokens contribute nothing, so their features get no gradient.
  visible = np.asarray(~jnp.any(y == codec.mask_id, axis=-1))
  assert visible.any() or t_range[0] > 0.5
  assert np.all(np.asarray(g[0])[visible] == 0)


def test_active_fraction_and_capacity():
  # Log-linear schedule: 1 - alpha = t (up to eps), so E[1 - (1 - t)^ell] = ell / (ell + 1), and
  # E[ell t (1 - t)^(ell - 1)] = 1 / (ell + 1) tokens have exactly one masked sub-token.
  for ell in (1, 2, 4):
    f = fused_head.active_fraction('loglinear', ell, eps=0.0)
    assert abs(f - ell / (ell + 1)) < 2e-3, (ell, f)
    one = fused_head.active_fraction('loglinear', ell, eps=0.0, exactly_one=True)
    assert abs(one - 1 / (ell + 1)) < 2e-3, (ell, one)
    two = fused_head.active_fraction('loglinear', ell, eps=0.0, at_least_two=True)
    assert abs(two - (ell - 1) / (ell + 1)) < 2e-3, (ell, two)
  assert fused_head.head_capacity(2048, 0.0) == 2048  # off
  assert fused_head.head_capacity(2048, 0.9) == 2048  # too little to gain
  cap = fused_head.head_capacity(2048, 2 / 3)
  assert 2 / 3 * 2048 < cap < 0.8 * 2048 and cap % 8 == 0


@pytest.mark.parametrize('ell,with_nelbo,fraction,keep', [(2, True, 0.0, True), (2, True, 0.4, False),
                                                          (1, False, 0.4, True), (3, True, 0.0, False)])
def test_low_rank_tail_equals_its_full_kernel(ell, with_nelbo, fraction, keep):
  """The tail head (kernel (D, k) + (h @ P) @ V for classes >= k) equals the plain head on the
  kernel [W, P @ V], in values and in the gradients of W, P, V, b and h (compacted or not)."""
  C, k, R, B, L, D = 300, 70, 3, 4, 32, 8  # k is not a multiple of the tile: padding inside
  codec = subtokens.Codec(C, ell)
  rng = np.random.default_rng(7 + ell)
  h = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  W = jnp.asarray(rng.normal(size=(D, k)), jnp.float32)
  P = jnp.asarray(rng.normal(size=(D, R)), jnp.float32)
  V = jnp.asarray(rng.normal(size=(R, C - k)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(C,)), jnp.float32)
  x0 = jnp.asarray(rng.integers(0, C, (B, L)))
  t = jnp.asarray([0.1, 0.4, 0.7, 0.95], jnp.float32)
  y = forward.mask(jax.random.key(2), codec.encode(x0), t, schedule='loglinear',
                   mask_id=codec.mask_id)
  kw = dict(schedule='loglinear', tile=32, with_nelbo=with_nelbo, active_fraction=fraction,
            keep_logits_bytes=2**30 if keep else 0)

  def total(o):
    return o['paper'].sum() + (1.3 * o['nelbo'].sum() if with_nelbo else 0.0)

  def tail_loss(h, W, P, V, b):
    o = fused_head.head_losses(h, W, b, x0, y, t, codec, tail=(P, V), **kw)
    return total(o), o

  def full_loss(h, W, P, V, b):
    o = fused_head.head_losses(h, jnp.concatenate([W, P @ V], axis=1), b, x0, y, t, codec, **kw)
    return total(o), o

  args = (h, W, P, V, b)
  (_, o_ref), g_ref = jax.value_and_grad(full_loss, argnums=range(5), has_aux=True)(*args)
  (_, o), g = jax.jit(jax.value_and_grad(tail_loss, argnums=range(5), has_aux=True))(*args)
  for name in o_ref:
    np.testing.assert_allclose(o[name], o_ref[name], rtol=1e-5, atol=1e-5)
  for a, c in zip(g, g_ref):
    np.testing.assert_allclose(a, c, rtol=2e-4, atol=1e-5 * float(jnp.abs(c).max()))
  assert float(jnp.abs(g[3]).max()) > 0  # the tail kernel learns


@pytest.mark.parametrize('C,ell,shuffle,tail_start', [
    (300, 2, None, 0), (300, 3, 5, 0), (50257, 2, None, 0), (300, 2, None, 120), (100, 4, 2, 40)])
def test_single_digit_losses_equal_the_full_softmax(C, ell, shuffle, tail_start):
  """A token with one masked sub-token, scored over its b candidate classes, has the loss and the
  gradients of the full head under carry-over (index shuffling, invalid codes and the tail head
  included); the real GPT-2 size checks the candidate arithmetic at b = 225."""
  codec = subtokens.Codec(C, ell, shuffle_seed=shuffle)
  rng = np.random.default_rng(C + ell)
  R, D = 40, 8
  h = jnp.asarray(rng.normal(size=(R, D)), jnp.float32)
  W = jnp.asarray(rng.normal(size=(D, C)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(C,)), jnp.float32)
  x0 = jnp.asarray(rng.integers(0, C, (R,)))
  x0 = x0.at[:3].set(jnp.asarray([0, C - 1, C - 2]))  # the last code block is partly invalid
  j = jnp.asarray(rng.integers(0, ell, (R,)))
  y = jnp.where(jnp.arange(ell)[None, :] == j[:, None], codec.mask_id, codec.encode(x0))
  w = jnp.asarray(rng.uniform(0.5, 3.0, (R,)), jnp.float32)
  P = jnp.asarray(rng.normal(size=(D, 3)), jnp.float32)
  V = jnp.asarray(rng.normal(size=(3, C - tail_start)), jnp.float32) if tail_start else None

  def full(h, W, b, P, V):
    kernel = jnp.concatenate([W[:, :tail_start], P @ V], axis=1) if tail_start else W
    log_p = parameterization.log_probs(h @ kernel + b, y, codec, carry_over=True)
    return objectives.paper_loss(log_p, x0, jnp.ones(()), schedule='linear') * w

  def single(h, W, b, P, V):
    tail = (P, V) if tail_start else None
    kernel = W[:, :tail_start] if tail_start else W
    paper, nelbo = fused_head.single_digit_losses(h, kernel, b, x0, y, w, codec, tail=tail)
    return paper + 0.0 * nelbo

  args = (h, W, b, P, V)
  paper, nelbo = fused_head.single_digit_losses(h, W[:, :tail_start] if tail_start else W, b, x0,
                                                y, w, codec, tail=(P, V) if tail_start else None)
  np.testing.assert_array_equal(paper, nelbo)  # one masked digit: the joint is its marginal
  nums = (0, 1, 2, 3, 4) if tail_start else (0, 1, 2)
  np.testing.assert_allclose(single(*args), full(*args), rtol=1e-5, atol=1e-5)
  g_ref = jax.grad(lambda *a: jnp.sum(full(*a) * jnp.arange(R)), argnums=nums)(*args)
  g = jax.jit(jax.grad(lambda *a: jnp.sum(single(*a) * jnp.arange(R)), argnums=nums))(*args)
  for a, c in zip(g, g_ref):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5 * float(jnp.abs(c).max()))
