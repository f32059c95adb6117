"""The vocabulary-tiled head kernel (prime_jax.kernels.head) + objectives equal the plain
composition, in value and gradient, with and without row compaction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prime_jax.diffusion import forward, objectives, parameterization, schedules, subtokens
from prime_jax.kernels import head

LOGLINEAR = schedules.get('loglinear')


@pytest.mark.parametrize('C,ell,shuffle,carry_over,keep', [
    (50, 2, None, True, True), (50, 2, None, False, False), (20, 3, 3, True, True),
    (50, 1, None, True, False), (1000, 4, None, True, True), (1000, 4, None, True, False)])
def test_head_losses_match_composition(C, ell, shuffle, carry_over, keep):
  """head_losses with per-sequence weights w_B = w(t_B) equals log_probs -> paper_loss / nelbo
  and objectives.fused_losses on h @ kernel + bias, in values and in the gradients of h, kernel
  and bias; with the expected compaction as well (ignored without carry-over)."""
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
  w_B = LOGLINEAR.weight(t)
  compaction = head.Compaction.expected(LOGLINEAR, ell, 1e-3)

  def composed(h, W, b):
    log_p = parameterization.log_probs(jnp.einsum('bld,dc->blc', h, W) + b, y, codec,
                                       carry_over=carry_over)
    o = {'paper': objectives.paper_loss(log_p, x0, t, schedule='loglinear'),
         'nelbo': objectives.nelbo(log_p, x0, y, t, codec, schedule='loglinear')}
    return 0.7 * o['paper'].sum() + 1.3 * o['nelbo'].sum(), o

  def tiled(h, W, b, compaction=None):
    o = head.head_losses(h, W, b, x0, y, w_B, codec, carry_over=carry_over, tile=16,
                         compaction=compaction, keep_logits_bytes=2**30 if keep else 0)
    return 0.7 * o['paper'].sum() + 1.3 * o['nelbo'].sum(), o

  def tiled_compact(h, W, b):
    return tiled(h, W, b, compaction)

  def fused(h, W, b):
    o = objectives.fused_losses(jnp.einsum('bld,dc->blc', h, W) + b, x0, y, t, codec,
                                schedule='loglinear', carry_over=carry_over)
    return 0.7 * o['paper'].sum() + 1.3 * o['nelbo'].sum(), o

  (_, o_ref), g_ref = jax.value_and_grad(composed, argnums=(0, 1, 2), has_aux=True)(h, W, b)
  for fn in (tiled, tiled_compact, fused):
    (_, o), g = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))(h, W, b)
    for k in ('paper', 'nelbo'):
      np.testing.assert_allclose(o[k], o_ref[k], rtol=1e-5, atol=1e-5)
    for a, c in zip(g, g_ref):
      np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5 * float(jnp.abs(c).max()))


def test_paper_only_skips_nelbo():
  codec = subtokens.Codec(30, 2)
  h = jnp.ones((1, 2, 4))
  out = head.head_losses(h, jnp.zeros((4, 30)), jnp.zeros(30), jnp.zeros((1, 2), jnp.int32),
                         jnp.full((1, 2, 2), codec.mask_id), jnp.ones(1), codec,
                         with_nelbo=False)
  assert set(out) == {'paper'}
  np.testing.assert_allclose(out['paper'], np.log(30), rtol=1e-6)  # uniform over 30 classes


@pytest.mark.parametrize('ell,compaction', [
    (1, None), (2, head.Compaction(single=0.0, full=0.3)),
    (2, head.Compaction(single=0.3, full=0.3))])
def test_kernel_must_cover_the_codec_classes(ell, compaction):
  """The kernel is (D, C) and the bias (C,) for the codec's C classes exactly: a head with an
  extra (mask) output, a missing class or a transposed kernel is refused, compacted or not."""
  C, B, L, D = 30, 2, 8, 4
  codec = subtokens.Codec(C, ell)
  h = jnp.ones((B, L, D))
  x0 = jnp.zeros((B, L), jnp.int32)
  y = jnp.full((B, L, ell), codec.mask_id)
  run = lambda W, b: head.head_losses(h, W, b, x0, y, jnp.ones(B), codec, compaction=compaction)
  out = run(jnp.zeros((D, C)), jnp.zeros(C))
  np.testing.assert_allclose(out['paper'], np.log(C), rtol=1e-6)
  for W, b in [(jnp.zeros((D, C + 1)), jnp.zeros(C + 1)), (jnp.zeros((D, C + 1)), jnp.zeros(C)),
               (jnp.zeros((D, C)), jnp.zeros(C + 1)), (jnp.zeros((D, C - 1)), jnp.zeros(C - 1)),
               (jnp.zeros((C, D)), jnp.zeros(C))]:
    with pytest.raises(ValueError, match=r"must be \(4, 30\) and \(30,\)"):
      run(W, b)


# (ell, with_nelbo, compaction, t_range). 'full': Compaction(single=0, full=0.3), the full head
# on every row with a masked sub-token; 'single': Compaction(single=0.3, full=0.3), the rows with
# exactly one through the one-digit path; 'expected': Compaction.expected (the single-digit path
# for ell > 1). t in (0.01, 0.2): the compact branch; (0.9, 1.0): overflow of the full head's
# chunk; with the one-digit path (0.4, 0.6): overflow of the one-digit chunk.
_COMPACT_CASES = [(ell, nelbo, mode, t_range)
                  for ell, nelbo, mode in [(2, True, 'full'), (1, False, 'full'), (3, True, 'full'),
                                           (2, True, 'single'), (3, False, 'single'),
                                           (1, True, 'expected'), (2, True, 'expected'),
                                           (3, True, 'expected')]
                  for t_range in [(0.01, 0.2), (0.9, 1.0)] + (
                      [(0.4, 0.6)] if mode != 'full' and ell > 1 else [])]


def _compaction(mode, ell):
  if mode == 'full':
    return head.Compaction(single=0.0, full=0.3)
  if mode == 'single':
    return head.Compaction(single=0.3, full=0.3)
  return head.Compaction.expected(LOGLINEAR, ell, 1e-3)


@pytest.mark.parametrize('ell,with_nelbo,mode,t_range', _COMPACT_CASES)
def test_compact_head_equals_full_head(ell, with_nelbo, mode, t_range):
  """Running the head only on tokens with a masked sub-token (and, with the one-digit path, the
  tokens with exactly one through their b candidates) changes no value and no gradient, whether
  the rows fit their capacity (compacted) or not (the overflow chunks)."""
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
  w_B = LOGLINEAR.weight(t)
  compaction = _compaction(mode, ell)
  single = ell > 1 and compaction.single > 0
  assert single == (mode != 'full' and ell > 1)
  cap_full = head.capacity(B * L, compaction.full)
  cap_single = head.capacity(B * L, compaction.single)
  n_masked = jnp.sum(y == codec.mask_id, axis=-1)
  n_full = int(jnp.sum(n_masked >= (2 if single else 1)))
  n_single = int(jnp.sum(n_masked == 1))
  assert cap_full < B * L
  if t_range != (0.4, 0.6):
    assert (n_full <= cap_full) == (t_range[1] < 0.5), (n_full, cap_full)
  if single:  # the one-digit chunk overflows at t ~ 1/2, where ell t (1 - t)^(ell - 1) peaks
    assert cap_single < B * L
    overflows = t_range == (0.4, 0.6) and (ell == 2 or mode == 'expected')
    assert (n_single > cap_single) == overflows, (n_single, cap_single)

  def loss(h, W, b, compaction):
    o = head.head_losses(h, W, b, x0, y, w_B, codec, tile=64, with_nelbo=with_nelbo,
                         compaction=compaction)
    total = o['paper'].sum() + (1.3 * o['nelbo'].sum() if with_nelbo else 0.0)
    return total, o

  grad = lambda c: jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                           static_argnums=3)(h, W, b, c)
  (_, o_ref), g_ref = grad(None)
  (_, o), g = grad(compaction)
  assert set(o) == set(o_ref) == ({'paper', 'nelbo'} if with_nelbo else {'paper'})
  for k in o_ref:
    np.testing.assert_allclose(o[k], o_ref[k], rtol=1e-5, atol=1e-5)
  for a, c in zip(g, g_ref):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5 * float(jnp.abs(c).max()))
  # Fully visible tokens contribute nothing, so their features get no gradient.
  visible = np.asarray(~jnp.any(y == codec.mask_id, axis=-1))
  assert visible.any() or t_range[0] > 0.5
  assert np.all(np.asarray(g[0])[visible] == 0)


def test_expected_compaction_and_capacity():
  # Log-linear schedule: 1 - alpha = t (up to eps), so E[1 - (1 - t)^ell] = ell / (ell + 1), and
  # E[ell t (1 - t)^(ell - 1)] = 1 / (ell + 1) tokens have exactly one masked sub-token.
  for ell in (1, 2, 4):
    c = head.Compaction.expected(LOGLINEAR, ell, eps=0.0)
    assert abs(c.single + c.full - ell / (ell + 1)) < 2e-3, (ell, c)
    if ell == 1:  # no single-digit path: every active row takes the full head
      assert c.single == 0.0 and abs(c.full - 1 / 2) < 2e-3, c
    else:
      assert abs(c.single - 1 / (ell + 1)) < 2e-3, (ell, c)
      assert abs(c.full - (ell - 1) / (ell + 1)) < 2e-3, (ell, c)
  assert head.capacity(2048, 0.0) == 2048  # off
  assert head.capacity(2048, 0.9) == 2048  # too little to gain
  cap = head.capacity(2048, 2 / 3)
  assert 2 / 3 * 2048 < cap < 0.8 * 2048 and cap % 8 == 0


@pytest.mark.parametrize('C,ell,shuffle', [
    (300, 2, None), (300, 3, 5), (50257, 2, None), (100, 4, 2)])
def test_single_digit_losses_equal_the_full_softmax(C, ell, shuffle):
  """A token with one masked sub-token, scored over its b candidate classes, has the loss and the
  gradients of the full head under carry-over (index shuffling and invalid codes included); the
  real GPT-2 size checks the candidate arithmetic at b = 225."""
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

  def full(h, W, b):
    log_p = parameterization.log_probs(h @ W + b, y, codec, carry_over=True)
    return objectives.paper_loss(log_p, x0, jnp.ones(()), schedule='linear') * w

  def single(h, W, b):
    paper, nelbo = head.single_digit_losses(h, W, b, x0, y, w, codec)
    return paper + 0.0 * nelbo

  args = (h, W, b)
  paper, nelbo = head.single_digit_losses(h, W, b, x0, y, w, codec)
  np.testing.assert_array_equal(paper, nelbo)  # one masked digit: the joint is its marginal
  np.testing.assert_allclose(single(*args), full(*args), rtol=1e-5, atol=1e-5)
  g_ref = jax.grad(lambda *a: jnp.sum(full(*a) * jnp.arange(R)), argnums=(0, 1, 2))(*args)
  g = jax.jit(jax.grad(lambda *a: jnp.sum(single(*a) * jnp.arange(R)), argnums=(0, 1, 2)))(*args)
  for a, c in zip(g, g_ref):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5 * float(jnp.abs(c).max()))
