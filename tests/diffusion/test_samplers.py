"""The Prime ancestral sampler with fake logits functions (method.md §5.1, 6, 13.14-13.17)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from prime_jax.diffusion import parameterization, samplers, schedules, subtokens


def table_model(codec, L, seed=0, scale=2.0):
  """A random but fixed model: logits for every token are a table lookup of the whole noisy
  state."""
  n = L * codec.ell
  assert (codec.base + 1)**n <= 2**16, 'keep the state table small'
  table = scale * np.random.default_rng(seed).normal(size=((codec.base + 1)**n, L,
                                                            codec.vocab_size))
  powers = (codec.base + 1)**np.arange(n)[::-1]

  def logits_fn(y):
    index = jnp.sum(y.reshape(y.shape[0], n) * jnp.asarray(powers, jnp.int32), axis=-1)
    return jnp.asarray(table, jnp.float32)[index]
  return logits_fn, table


# -- exact distribution of the discrete-time chain -----------------------------------------------


def _nucleus_np(p, top_p):
  order = np.argsort(-p, kind='stable')
  keep_sorted = np.cumsum(p[order]) <= top_p
  keep_sorted[0] = True
  keep = np.zeros_like(keep_sorted)
  keep[order] = keep_sorted
  kept = np.where(keep, p, 0.0)
  return kept / kept.sum()


def exact_output_distribution(codec, L, table, q, carry_over, nucleus_p, final):
  """Forward enumeration of the sampler's Markov chain over all (b+1)**(L*K) noisy states."""
  K, b, m, C = codec.ell, codec.base, codec.mask_id, codec.vocab_size
  n = L * K
  states = list(itertools.product(range(b + 1), repeat=n))
  index = {s: i for i, s in enumerate(states)}
  digits = codec.digits

  def token_probs(y, top_p):
    out = []
    for i in range(L):
      logits = table[index[tuple(y)], i].astype(np.float64)
      if carry_over:
        ok = np.ones(C, bool)
        for j in range(K):
          if y[i * K + j] != m:
            ok &= digits[:, j] == y[i * K + j]
        logits = np.where(ok, logits, -np.inf)
      p = np.exp(logits - logits.max())
      p /= p.sum()
      out.append(_nucleus_np(p, top_p) if top_p < 1 else p)
    return out

  def token_moves(y_tok, p, reveal):
    """{new digits of one token: prob} given its current digits and class probabilities p."""
    moves = {}
    masked = [j for j in range(K) if y_tok[j] == m]
    for c in np.nonzero(p)[0]:
      for subset in itertools.product([False, True], repeat=len(masked)):
        prob = p[c]
        new = list(y_tok)
        for j, r in zip(masked, subset):
          prob *= reveal if r else 1 - reveal
          if r:
            new[j] = digits[c, j]
        if prob > 0:
          moves[tuple(new)] = moves.get(tuple(new), 0.0) + prob
    return moves

  dist = np.zeros(len(states))
  dist[index[(m,) * n]] = 1.0
  for qk in list(q) + [None]:  # None: the final noise removal
    new = np.zeros_like(dist)
    for si in np.nonzero(dist)[0]:
      y = states[si]
      probs = token_probs(y, nucleus_p if qk is not None else 1.0)
      per_token = []
      for i in range(L):
        y_tok = y[i * K:(i + 1) * K]
        p = probs[i]
        if qk is None and final == 'argmax':
          p = np.eye(C)[np.argmax(p)]
        per_token.append(token_moves(y_tok, p, 1.0 if qk is None else qk))
      for combo in itertools.product(*[list(mv.items()) for mv in per_token]):
        ns = sum((c[0] for c in combo), ())
        new[index[ns]] += dist[si] * np.prod([c[1] for c in combo])
    dist = new
  out = {}
  for si in np.nonzero(dist)[0]:
    y = np.array(states[si]).reshape(L, K)
    assert (y != m).all()
    toks = tuple(int(v) for v in np.asarray(codec.decode(y)))
    out[toks] = out.get(toks, 0.0) + dist[si]
  return out


@pytest.mark.parametrize('C,ell,carry_over,nucleus_p,precision,shuffle', [
    (4, 1, True, 1.0, 'fp64', None),  # MDLM's cached sampler (argmax noise removal)
    (5, 2, True, 1.0, 'fp64', None),
    (5, 2, False, 1.0, 'fp64', None),  # invalid codes can be produced without carry-over
    (5, 2, True, 0.8, 'fp64', None),
    (5, 2, True, 1.0, 'fp32_hires', None),
    (5, 2, True, 1.0, 'fp32', None),
    # K = 3: full rows with visible digits (the filter) and single rows, shuffled codes.
    (5, 3, True, 1.0, 'fp32_hires', 1),
])
def test_sampler_matches_exact_chain(C, ell, carry_over, nucleus_p, precision, shuffle):
  codec = subtokens.Codec(C, ell, shuffle_seed=shuffle)
  L, T, t_min, N = 2, 3, 0.3, 30000
  logits_fn, table = table_model(codec, L, seed=C + ell)
  grid = schedules.sampling_grid(T, t_min)
  q = (grid[:-1] - grid[1:]) / grid[:-1]
  final = 'argmax' if ell == 1 else 'sample'
  want = exact_output_distribution(codec, L, table, q, carry_over, nucleus_p, final)
  assert sum(want.values()) == pytest.approx(1.0, abs=1e-9)
  out = samplers.sample(jax.random.key(7), logits_fn, codec, shape=(N, L), num_steps=T,
                        carry_over=carry_over, nucleus_p=nucleus_p, precision=precision,
                        t_min=t_min)
  toks = [tuple(r) for r in np.asarray(out.tokens)]
  got = {}
  for tok in toks:
    got[tok] = got.get(tok, 0) + 1
  assert set(got) <= set(want), set(got) - set(want)
  keys = sorted(want)
  expected = np.array([want[k] for k in keys]) * N
  observed = np.array([got.get(k, 0) for k in keys])
  big = expected >= 5  # pool the rare outcomes into one bin
  obs = np.append(observed[big], observed[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  assert stats.chisquare(obs, exp).pvalue > 1e-4
  if not carry_over:
    assert any(t >= C for k in want for t in k)  # the chain itself can emit invalid ids


# -- invariants ------------------------------------------------------------------------------------


def recording_model(codec, L, seed=0):
  """table_model that also records every state it is called on (network evaluations)."""
  logits_fn, _ = table_model(codec, L, seed)
  calls = []

  def fn(y):
    jax.debug.callback(lambda a: calls.append(np.asarray(a).copy()), y)
    return logits_fn(y)
  return fn, calls


@pytest.mark.parametrize('precision', ['fp64', 'fp32', 'fp32_hires'])
def test_cache_on_off_identical_and_nfe_counts_real_calls(precision):
  codec = subtokens.Codec(20, 3)
  fn, calls = recording_model(codec, L=2)
  kw = dict(codec=codec, shape=(1, 2), num_steps=16, precision=precision, t_min=1e-5)
  on = samplers.sample(jax.random.key(3), fn, **kw, cache=True)
  jax.effects_barrier()
  n_on = len(calls)
  calls.clear()
  off = samplers.sample(jax.random.key(3), fn, **kw, cache=False)
  jax.effects_barrier()
  np.testing.assert_array_equal(on.tokens, off.tokens)
  assert int(on.idle_steps) == int(off.idle_steps) > 0
  assert int(on.nfe) == n_on  # the cache really skips the network call
  assert int(off.nfe) == len(calls) == 16 + 1
  assert int(on.nfe) <= 16 - int(on.idle_steps) + 1


def test_nfe_is_non_idle_steps_plus_final_call():
  codec = subtokens.Codec(7, 2)
  fn, _ = table_model(codec, L=3)
  # t_min = 0: the last step reveals everything, no noise-removal call is needed.
  out = samplers.sample(jax.random.key(0), fn, codec, shape=(1, 3), num_steps=40, t_min=0.0)
  assert int(out.nfe) == 40 - int(out.idle_steps)
  # t_min = 0.9: masks are left at the end, the final call is made.
  out = samplers.sample(jax.random.key(0), fn, codec, shape=(1, 3), num_steps=4, t_min=0.9)
  assert int(out.nfe) == 4 - int(out.idle_steps) + 1


def test_revealed_digits_never_change_and_no_masks_remain():
  codec = subtokens.Codec(20, 3)
  fn, calls = recording_model(codec, L=2, seed=1)
  out = samplers.sample(jax.random.key(5), fn, codec, shape=(4, 2), num_steps=12, cache=False,
                        t_min=0.2, decode=False)
  jax.effects_barrier()
  final = np.asarray(out.tokens)
  assert (final != codec.mask_id).all() and (final < codec.base).all()
  traj = np.stack(calls + [final])
  assert (traj[0] == codec.mask_id).all()
  for a, b in zip(traj[:-1], traj[1:]):
    observed = a != codec.mask_id
    np.testing.assert_array_equal(b[observed], a[observed])
  assert (traj[-2] == codec.mask_id).any()  # the final call really had work to do


def adversarial_model(codec):
  """Pushes a token towards an invalid code: prefers class 18 = (2,0,0) while digit 0 is masked and
  class 12 = (1,1,0) once it is observed, so that digits of different draws combine to (2,1,.)."""
  def fn(y):
    first_masked = y[..., 0] == codec.mask_id
    pref = jnp.where(first_masked, 18, 12)
    return 30.0 * jax.nn.one_hot(pref, codec.vocab_size)
  return fn


def test_carry_over_never_decodes_invalid_ids_under_adversarial_logits():
  codec = subtokens.Codec(20, 3)  # b = 3, codes 20..26 are invalid
  fn = adversarial_model(codec)
  kw = dict(shape=(256, 8), num_steps=8)
  with_co = samplers.sample(jax.random.key(0), fn, codec, carry_over=True, **kw).tokens
  without = samplers.sample(jax.random.key(0), fn, codec, carry_over=False, **kw).tokens
  assert int(with_co.max()) < 20
  assert int(without.max()) >= 20  # expected behaviour without carry-over (method.md §3.3, 13.16)


def test_condition_is_kept():
  codec = subtokens.Codec(20, 3)
  fn = adversarial_model(codec)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 20, size=(4, 10)))
  keep = jnp.asarray(rng.random((4, 10)) < 0.5).at[:, :3].set(True)  # a prefix plus holes
  for co in (True, False):
    out = samplers.sample(jax.random.key(1), fn, codec, shape=(4, 10), num_steps=6,
                          carry_over=co, condition=(tokens, keep))
    np.testing.assert_array_equal(np.asarray(out.tokens)[np.asarray(keep)],
                                  np.asarray(tokens)[np.asarray(keep)])


# -- compaction ------------------------------------------------------------------------------------


def context_model(codec, seed=0):
  """logits_fn(w, y): every token's logits depend on its own digits and on the mean of the whole
  sequence's digit embeddings (the model sees every position). w = (embed (K, b+1, C), mix (C,))."""
  rng = np.random.default_rng(seed)
  w = (jnp.asarray(rng.normal(size=(codec.ell, codec.base + 1, codec.vocab_size)), jnp.float32),
       jnp.asarray(rng.normal(size=(codec.vocab_size,)), jnp.float32))

  def fn(w, y):
    own = sum(w[0][j][y[..., j]] for j in range(codec.ell))
    return 2.0 * own + jnp.mean(own, axis=-2, keepdims=True) * w[1]
  return fn, w


def split_model(codec, dim=16, seed=0):
  """The same kind of model as a SplitNetwork: trunk features (B, L, D) and a (D, C) head."""
  rng = np.random.default_rng(seed)
  p = dict(embed=jnp.asarray(rng.normal(size=(codec.ell, codec.base + 1, dim)), jnp.float32),
           kernel=jnp.asarray(rng.normal(size=(dim, codec.vocab_size)), jnp.float32),
           bias=jnp.asarray(rng.normal(size=(codec.vocab_size,)), jnp.float32))

  def features(p, y):
    h = sum(p['embed'][j][y[..., j]] for j in range(codec.ell))
    return jnp.tanh(h + jnp.mean(h, axis=-2, keepdims=True))
  return samplers.SplitNetwork(features, lambda p: (p['kernel'], p['bias'])), p


@pytest.mark.parametrize('C,ell,carry_over,nucleus_p,shuffle', [
    (50, 1, True, 1.0, None),  # MDLM: argmax noise removal
    (50, 3, True, 0.9, 1),  # full rows with visible digits, single rows, nucleus, shuffled codes
    (50, 2, False, 1.0, None),
])
def test_compacted_is_bit_identical_to_dense_in_fp64(C, ell, carry_over, nucleus_p, shuffle):
  """Same key: compacted (default capacities, and a capacity of 1, which forces overflow chunks in
  every step) and dense give the same tokens, NFE and idle steps, with a prefix kept."""
  codec = subtokens.Codec(C, ell, shuffle_seed=shuffle)
  fn, w = context_model(codec)
  shape, T = (3, 16), 12
  assert shape[0] * shape[1] * ell / T > 3  # several positions reveal per step: chunks overflow
  rng = np.random.default_rng(1)
  keep = np.zeros(shape, bool)
  keep[0, :4] = True  # one prefix-conditioned row
  condition = (jnp.asarray(rng.integers(0, C, shape)), jnp.asarray(keep))
  kw = dict(shape=shape, num_steps=T, precision='fp64', carry_over=carry_over, t_min=0.05,
            nucleus_p=nucleus_p, condition=condition, params=w)
  dense = samplers.sample(jax.random.key(4), fn, codec, compact=False, **kw)
  assert int(dense.nfe) == T - int(dense.idle_steps) + 1  # the final fill had work to do
  np.testing.assert_array_equal(np.asarray(dense.tokens)[keep], np.asarray(condition[0])[keep])
  for capacity in (None, 1):
    out = samplers.sample(jax.random.key(4), fn, codec, compact=True, capacity=capacity, **kw)
    for a, b in zip(out, dense):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_split_network_compacted_equals_dense():
  """With a SplitNetwork the head runs only on the gathered rows; tokens still match the dense
  sampler bit for bit (any capacity), and agree with the same model given as a plain logits_fn
  (which differs only by the rounding of the head's matmul)."""
  codec = subtokens.Codec(60, 2)
  net, p = split_model(codec)
  kw = dict(shape=(2, 24), num_steps=10, precision='fp64', params=p, t_min=0.05, capacity=2)
  dense = samplers.sample(jax.random.key(9), net, codec, compact=False, **kw)
  out = samplers.sample(jax.random.key(9), net, codec, **kw)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(dense.tokens))
  plain = lambda p, y: (net.features(p, y) @ p['kernel'] + p['bias']).astype(jnp.float32)
  same = samplers.sample(jax.random.key(9), plain, codec, **kw).tokens
  assert np.mean(np.asarray(same) == np.asarray(dense.tokens)) > 0.9


def test_capacities_follow_the_simulated_counts():
  """Half the largest expected per-step count of each path, checked against simulated chains (the
  mask process does not depend on the model); K = 1 in closed form: dt per step."""
  N, K, T = 4096, 2, 16
  grid = schedules.sampling_grid(T, 1e-5)
  q = (grid[:-1] - grid[1:]) / grid[:-1]
  assert samplers.capacities(q, 1, N) == (int(np.ceil(0.5 * N * (1 - 1e-5) / T / 8) * 8), 8)
  rng = np.random.default_rng(0)
  full, single = np.zeros(T), np.zeros(T)
  runs = 20
  for _ in range(runs):
    masked = np.ones((N, K), bool)
    for k in range(T):
      reveal = masked & (rng.random((N, K)) < q[k])
      n_masked = masked.sum(-1)
      full[k] += np.sum((n_masked >= 2) & reveal.any(-1)) / runs
      single[k] += np.sum((n_masked == 1) & reveal.any(-1)) / runs
      masked &= ~reveal
  cap_full, cap_single = samplers.capacities(q, K, N)
  for cap, counts in ((cap_full, full), (cap_single, single)):
    assert abs(2 * cap - counts.max()) < 16 + 5 * np.sqrt(counts.max() / runs), (cap, counts)
  assert samplers.capacities(q, K, N, single=False)[0] >= cap_full  # every active row is full


def test_idle_fraction_matches_closed_form():
  """method.md §6 / 13.14: P(step idle) = (1 - dt)**(L*K) for any model; here L*K = 48, T = 48."""
  codec = subtokens.Codec(50, 2)
  fn, _ = table_model(codec, L=1)
  L, T, runs = 24, 48, 400

  def logits_fn(y):  # model output does not matter for idleness
    return jnp.zeros(y.shape[:-1] + (50,))

  idle = []
  for r in range(runs):
    out = samplers.sample(jax.random.key(r), logits_fn, codec, shape=(1, L), num_steps=T,
                          precision='fp32')
    idle.append(int(out.idle_steps))
    assert int(out.nfe) <= T - idle[-1] + 1
  frac = np.mean(idle) / T
  rho = samplers.expected_idle_fraction(L * codec.ell, T)
  assert rho == pytest.approx((1 - (1 - 1e-5) / T)**(L * 2))
  se = np.sqrt(rho * (1 - rho) / (T * runs))
  assert abs(frac - rho) < 5 * se, (frac, rho, se)


def test_spec_idle_table_values():
  assert samplers.expected_idle_fraction(1024, 1024) == pytest.approx(0.36770, abs=5e-5)
  assert samplers.expected_idle_fraction(2048, 1024) == pytest.approx(0.13520, abs=5e-5)
  assert samplers.expected_idle_fraction(4096, 1024) == pytest.approx(0.01828, abs=5e-5)


@pytest.mark.parametrize('precision', ['fp64', 'fp32_hires'])
def test_jit_equals_no_jit(precision):
  codec = subtokens.Codec(7, 2)
  fn, _ = table_model(codec, L=3)
  kw = dict(shape=(2, 3), num_steps=5, precision=precision, t_min=0.1, nucleus_p=0.9)
  jitted = samplers.sample(jax.random.key(11), fn, codec, **kw)
  with jax.disable_jit():
    eager = samplers.sample(jax.random.key(11), fn, codec, **kw)
  for a, b in zip(jitted, eager):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_callable_inside_user_jit_and_params_argument():
  codec = subtokens.Codec(7, 2)
  w = jnp.asarray(np.random.default_rng(0).normal(size=(codec.base + 1, 7)), jnp.float32)

  def fn(params, y):
    return params[y[..., 0]] + params[y[..., 1]]

  kw = dict(shape=(3, 4), num_steps=6, precision='fp32_hires', params=w)
  direct = samplers.sample(jax.random.key(2), fn, codec, **kw)
  inside = jax.jit(lambda k: samplers.sample(k, fn, codec, **kw))(jax.random.key(2))
  np.testing.assert_array_equal(direct.tokens, inside.tokens)
  with pytest.raises(ValueError, match='fp64'):
    jax.jit(lambda k: samplers.sample(k, fn, codec, shape=(3, 4), num_steps=6, params=w,
                                      precision='fp64'))(jax.random.key(2))


def test_bad_arguments():
  codec = subtokens.Codec(7, 2)
  fn, _ = table_model(codec, L=1)
  for kw, msg in [(dict(precision='bf16'), 'precision'), (dict(nucleus_p=0.0), 'nucleus_p'),
                  (dict(num_steps=0), 'num_steps'), (dict(final='mode'), 'final')]:
    args = dict(shape=(1, 1), num_steps=2) | kw
    with pytest.raises(ValueError, match=msg):
      samplers.sample(jax.random.key(0), fn, codec, **args)


# -- token draws -----------------------------------------------------------------------------------


def test_nucleus_convention():
  p = jnp.asarray([0.05, 0.5, 0.15, 0.3])
  np.testing.assert_allclose(samplers.nucleus_filter(p, 0.85), [0, 0.625, 0, 0.375], atol=1e-7)
  np.testing.assert_allclose(samplers.nucleus_filter(p, 0.4), [0, 1, 0, 0])  # top-1 always kept
  np.testing.assert_allclose(samplers.nucleus_filter(p, 1.0), p, atol=1e-7)


def _draw(key, probs, precision):
  if precision == 'fp64':
    with jax.enable_x64(True):
      return jax.jit(samplers.draw_tokens, static_argnums=2)(key, probs.astype(jnp.float64),
                                                             precision)
  return jax.jit(samplers.draw_tokens, static_argnums=2)(key, probs, precision)


def test_draws_follow_a_long_tailed_distribution():
  """Zipf(1.5) over 4096 classes (ratios down to 4e-6), binned by log-rank: the float64 inverse
  CDF and the 64-bit exponential race both pass a chi-square goodness-of-fit test."""
  C, n = 4096, 10000
  p = np.arange(1, C + 1, dtype=np.float64)**-1.5
  p /= p.sum()
  edges = np.unique(np.geomspace(1, C, 13).astype(int)) - 1
  bins = np.digitize(np.arange(C), edges[1:])
  expected = np.bincount(bins, weights=p) * n
  probs = jnp.broadcast_to(jnp.asarray(p, jnp.float32), (n, C))
  for precision in ('fp64', 'fp32_hires'):
    x = np.asarray(_draw(jax.random.key(1, impl='rbg'), probs, precision))
    observed = np.bincount(bins[x], minlength=len(expected))
    assert stats.chisquare(observed, expected).pvalue > 1e-3, precision


def test_hires_uniforms_resolve_the_tail_that_float32_uniforms_truncate():
  """fp32_hires compares u (l + r) < min(l, r) at each tree node, so a decision of probability r is
  right only if P(u < r) = r down to tiny r. float32 uniforms are a grid of step 2**-23 (so r below
  ~1e-7 is wrong); the 64-bit form is continuous down to ~1e-19. Checked on the u < 5e-4 region of
  2e7 variates (about 1e4 of them), where both must put mass 5e-4."""
  n, x = 2 * 10**7, 5e-4
  key = jax.random.key(0, impl='rbg')

  @jax.jit
  def small_values(key):
    naive = jax.random.uniform(key, (n,), jnp.float32)
    hi, lo = jax.random.bits(jax.random.fold_in(key, 1), (2, n), jnp.uint32)
    hires = samplers.hires_uniform(hi, lo)
    return (jnp.sort(jnp.where(naive < x, naive, jnp.inf))[:20000],
            jnp.sort(jnp.where(hires < x, hires, jnp.inf))[:20000])

  naive, hires = (np.asarray(a) for a in small_values(key))
  naive, hires = naive[np.isfinite(naive)], hires[np.isfinite(hires)]
  for v in (naive, hires):  # both have the right mass in the tail region ...
    assert abs(len(v) - n * x) < 5 * np.sqrt(n * x)
  # ... but the naive one is a coarse grid, the 64-bit one is continuous.
  assert len(np.unique(naive)) <= 4200 < 0.5 * len(naive)
  assert len(np.unique(hires)) > 0.99 * len(hires)
  assert stats.kstest(hires / x, 'uniform').pvalue > 1e-3
  assert hires.min() < 1e-7


def test_tree_draw_decisions_have_relative_precision_for_any_weight():
  """Every class is reached with probability prod(decision ratios), and each decision flips exactly
  at its ratio to relative precision 1e-5, for weights from 1e-30 to 1 (a float32 inverse CDF gives
  classes below ~6e-8 of the total no mass at all). Path u's are set just below or above the exact
  float64 ratio min(l, r) / (l + r) of every node on the path to each class."""
  rng = np.random.default_rng(0)
  n, depth = 11, 4
  w = (10.0**rng.uniform(-30, 0, n)).astype(np.float32)
  w[3] = 0.0  # a zero weight is never drawn
  leaves = np.zeros(2**depth)
  leaves[:n] = w.astype(np.float64)
  levels = [leaves]
  for _ in range(depth - 1):  # node i of a level of size s has children i and i + s
    half = len(levels[-1]) // 2
    levels.append(levels[-1][:half] + levels[-1][half:])
  for c in range(n):
    if w[c] == 0:
      continue
    for eps in (1e-5, -1e-5):  # -eps: every decision just misses its side: must not reach c
      u, node, prob = np.zeros(depth), 0, 1.0
      for i, level in enumerate(reversed(levels)):
        s = len(level) // 2
        l, r = level[node], level[node + s]
        second = (c // s) % 2 == 1
        ratio = min(l, r) / (l + r)
        lighter = (second and r < l) or (not second and l <= r)
        u[i] = ratio * (1 - eps) if lighter else min(1.0, ratio * (1 + eps))
        prob *= ratio if lighter else 1 - ratio
        node += s * second
      got = int(samplers.tree_draw(jnp.asarray(u[None], jnp.float32), jnp.asarray(w[None]))[0])
      if eps > 0:
        assert got == c, (c, got)
        assert prob == pytest.approx(w[c] / w.astype(np.float64).sum(), rel=1e-6)
      elif 0 < min(ratio, 1 - ratio):
        assert got != c


def test_draw_never_picks_zero_probability_classes():
  p = jnp.zeros((2000, 10)).at[:, 3].set(0.5).at[:, 7].set(0.5)
  for precision in ('fp32', 'fp32_hires', 'fp64'):
    x = _draw(jax.random.key(0), p, precision)
    assert set(np.unique(np.asarray(x))) == {3, 7}


def test_parameterization_used_by_sampler_is_the_core_one():
  # The sampler's carry-over is parameterization.log_probs: a fully observed token keeps its id.
  codec = subtokens.Codec(20, 3)
  y = codec.encode(jnp.asarray([[5]]))
  lp = parameterization.log_probs(jnp.zeros((1, 1, 20)), y, codec)
  assert float(lp[0, 0, 5]) == 0.0
