"""The vocabulary-tiled head kernel (prime_jax.kernels.head) + objectives equal the plain
composition, in value and gradient, with and without row compaction."""

import dataclasses

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


# (ell, with_nelbo, compaction). 'full': Compaction(single=0, full=0.3), the full head on every row
# with a masked sub-token; 'single': Compaction(single=0.3, full=0.3), the rows with exactly one
# through the one-digit path; 'expected': Compaction.expected (the one-digit path for ell = 2). Two
# buckets (capacities 0, N / 2 and N) keep the compile short; `capacities` is tested on its own.
_COMPACT_CASES = [(2, True, 'full'), (1, False, 'full'), (3, True, 'full'), (2, True, 'single'),
                  (3, False, 'single'), (1, True, 'expected'), (2, True, 'expected'),
                  (4, True, 'expected')]


def _compaction(mode, ell, buckets=2):
  if mode == 'full':
    return head.Compaction(single=0.0, full=0.3, buckets=buckets)
  if mode == 'single':
    return head.Compaction(single=0.3, full=0.3, buckets=buckets)
  return dataclasses.replace(head.Compaction.expected(LOGLINEAR, ell, 1e-3), buckets=buckets)


def _bucket(count, caps):
  return min(c for c in caps if c >= count)


@pytest.mark.parametrize('ell,with_nelbo,mode', _COMPACT_CASES)
def test_compact_head_equals_full_head(ell, with_nelbo, mode):
  """Running the head only on tokens with a masked sub-token (and, with the one-digit path, the
  tokens with exactly one through their b candidates), gathered into the smallest capacity that
  holds them, changes no value and no gradient, whichever capacity the batch picks: t = 0 (no
  masked token: the path is skipped), t in (0.01, 0.2) (a gather), (0.9, 1.0) (every row, no
  gather) and, with the one-digit path, (0.4, 0.6)."""
  C, B, L, D = 300, 8, 32, 8
  codec = subtokens.Codec(C, ell)
  rng = np.random.default_rng(ell)
  h = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  W = jnp.asarray(rng.normal(size=(D, C)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(C,)), jnp.float32)
  x0 = jnp.asarray(rng.integers(0, C, (B, L)))
  compaction = _compaction(mode, ell)
  single = ell > 1 and compaction.single > 0
  assert single == (mode != 'full' and ell > 1)
  caps = head.capacities(B * L, compaction.buckets)
  assert caps == (0, B * L // 2, B * L)

  def loss(h, W, b, y, w_B, compaction):
    o = head.head_losses(h, W, b, x0, y, w_B, codec, tile=64, with_nelbo=with_nelbo,
                         compaction=compaction)
    total = o['paper'].sum() + (1.3 * o['nelbo'].sum() if with_nelbo else 0.0)
    return total, o

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=5)
  for t_range in [(0.0, 0.0), (0.01, 0.2), (0.9, 1.0)] + ([(0.4, 0.6)] if single else []):
    t = jnp.asarray(np.linspace(*t_range, B), jnp.float32)
    y = forward.mask(jax.random.key(1), codec.encode(x0), t, schedule='loglinear',
                     mask_id=codec.mask_id)
    w_B = LOGLINEAR.weight(jnp.maximum(t, 1e-3))
    n_masked = jnp.sum(y == codec.mask_id, axis=-1)
    cap_full = _bucket(int(jnp.sum(n_masked >= (2 if single else 1))), caps)
    want = {(0.0, 0.0): 0, (0.01, 0.2): B * L // 2, (0.9, 1.0): B * L}.get(t_range)
    assert cap_full == want or (single and t_range[0] > 0.3), (t_range, cap_full)
    if single and t_range == (0.4, 0.6):
      assert _bucket(int(jnp.sum(n_masked == 1)), caps) == B * L // 2
    (_, o_ref), g_ref = grad(h, W, b, y, w_B, None)
    (_, o), g = grad(h, W, b, y, w_B, compaction)
    assert set(o) == set(o_ref) == ({'paper', 'nelbo'} if with_nelbo else {'paper'})
    for k in o_ref:
      np.testing.assert_allclose(o[k], o_ref[k], rtol=1e-5, atol=1e-5)
    for a, c in zip(g, g_ref):
      np.testing.assert_allclose(a, c, rtol=1e-4,
                                 atol=1e-5 * max(float(jnp.abs(c).max()), 1e-6))
    # Fully visible tokens contribute nothing, so their features get no gradient.
    visible = np.asarray(~jnp.any(y == codec.mask_id, axis=-1))
    assert visible.any() or t_range[0] > 0.5
    assert np.all(np.asarray(g[0])[visible] == 0)


def test_capacities():
  assert head.capacities(1024) == (0, 128, 256, 384, 512, 640, 768, 896, 1024)
  assert head.capacities(1000) == (0, 128, 256, 376, 504, 632, 752, 880, 1000)  # multiples of 8
  assert head.capacities(12) == (0, 8, 12)
  assert head.capacities(64, 2) == (0, 32, 64)


def test_expected_compaction():
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


@pytest.mark.parametrize('ell,axes', [
    (2, {'data': 4, 'fsdp': 2, 'tensor': 1}), (4, {'data': 2, 'fsdp': 2, 'tensor': 2}),
    (2, {'data': 1, 'fsdp': 1, 'tensor': 1})])
def test_sharded_compact_head_equals_unsharded(ell, axes):
  """On 8 fake devices the kernel runs on each device's sequences (shard_map over 'data' and
  'fsdp'; the kernel sharded over 'fsdp' is gathered): with the expected compaction, one sequence
  per shard at its own noise level (so shards pick different capacities), the losses and the
  gradients of h, kernel and bias equal the unsharded full head; a 1-device mesh runs the same
  function."""
  from prime_jax import sharding
  C, B, L, D = 300, 8, 32, 8
  n = int(np.prod(list(axes.values())))
  mesh = sharding.make_mesh(axes, jax.devices()[:n])
  codec = subtokens.Codec(C, ell)
  rng = np.random.default_rng(7)
  h = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  W = jnp.asarray(rng.normal(size=(D, C)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(C,)), jnp.float32)
  x0 = jnp.asarray(rng.integers(0, C, (B, L)))
  t = jnp.asarray([0.0, 0.05, 0.2, 0.4, 0.5, 0.7, 0.9, 1.0], jnp.float32)
  y = forward.mask(jax.random.key(2), codec.encode(x0), t, schedule='loglinear',
                   mask_id=codec.mask_id)
  w_B = LOGLINEAR.weight(jnp.maximum(t, 1e-3))
  compaction = _compaction('expected', ell)  # per shard (32 rows): capacities 0, 16 and 32

  def loss(h, W, b, x0, y, w_B, compaction, mesh):
    o = head.head_losses(h, W, b, x0, y, w_B, codec, tile=64, compaction=compaction, mesh=mesh)
    return o['paper'].sum() + 1.3 * o['nelbo'].sum(), o

  grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
  (_, o_ref), g_ref = jax.jit(grad, static_argnums=(6, 7))(h, W, b, x0, y, w_B, None, None)
  spec = lambda *s: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s))
  batch = sharding.BATCH_AXES
  args = (jax.device_put(h, spec(batch)), jax.device_put(W, spec('fsdp')),
          jax.device_put(b, spec()), jax.device_put(x0, spec(batch)),
          jax.device_put(y, spec(batch)), jax.device_put(w_B, spec(batch)))
  (_, o), g = jax.jit(grad, static_argnums=(6, 7))(*args, compaction, mesh)
  if n > 1:
    assert o['paper'].sharding.spec[0] == batch
  for k in ('paper', 'nelbo'):
    np.testing.assert_allclose(o[k], o_ref[k], rtol=1e-5, atol=1e-5)
  for a, c in zip(g, g_ref):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5 * float(jnp.abs(c).max()))


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
