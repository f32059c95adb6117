"""The reference image samplers (method.md §5.3) with fake logits functions: exact chains,
invariants."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from prime_jax.diffusion import image_sampler as im
from prime_jax.diffusion import parameterization, schedules, subtokens

Settings = im.ImageSamplerSettings
# Models are cached, or take their tables as params, so that tests share compiled samplers
# (the logits function is a static argument of the compiled loop).


def chisq_pvalue(samples, probs):
  """Goodness of fit of integer samples to probs (len(probs) classes); rare bins are pooled."""
  probs = np.asarray(probs, np.float64)
  samples = np.asarray(samples).reshape(-1)
  assert samples.min() >= 0 and samples.max() < len(probs), (samples.min(), samples.max())
  assert (probs[np.unique(samples)] > 0).all(), 'a class of probability 0 was drawn'
  observed = np.bincount(samples, minlength=len(probs))
  expected = probs * samples.size
  big = expected >= 5
  obs, exp = observed[big], expected[big]
  if (~big).any() and expected[~big].sum() > 0:
    obs, exp = np.append(obs, observed[~big].sum()), np.append(exp, expected[~big].sum())
  return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def fixed_model(log_pi):
  """A model that ignores y: the same logits for every token."""
  log_pi = jnp.asarray(log_pi, jnp.float32)
  return lambda y: jnp.broadcast_to(log_pi, y.shape[:-1] + log_pi.shape)


@functools.cache
def table_fn(codec):
  """logits_fn(table, y) for one token per batch row (S = (1, 1, 1)): its logits are the table row
  of its digit state, table ((b+1)**K, C). The table is a params argument, so every table shares
  one compiled sampler."""
  powers = jnp.asarray((codec.base + 1)**np.arange(codec.ell)[::-1], jnp.int32)
  return lambda table, y: table[jnp.sum(y * powers, axis=-1)]


def states(codec):
  return list(itertools.product(range(codec.base + 1), repeat=codec.ell))


def random_table(codec, seed):
  """A random state-dependent model (float32 values, as the sampler sees them)."""
  shape = (len(states(codec)), codec.vocab_size)
  return (1.5 * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def posterior_table(codec, pi):
  """The exact denoiser of i.i.d. tokens x ~ pi: pi restricted to the classes consistent with y."""
  y = jnp.asarray(states(codec), jnp.int32)
  ok = np.asarray(parameterization.consistent(y, codec))
  return np.where(ok, np.log(pi), parameterization.NEG_INF).astype(np.float32)


CHAIN_SHAPE = (20000, 1, 1, 1)  # one token per row, rows i.i.d.


def sample_table(table, codec, settings, key=1):
  return im.sample(jax.random.key(key), table_fn(codec), codec, shape=CHAIN_SHAPE,
                   settings=settings, params=jnp.asarray(table)).tokens


# -- exact distribution of the discrete-time chain -------------------------------------------------


def exact_output_distribution(codec, table, st):
  """Forward enumeration of the sampler's chain for one token over all (b+1)**K digit states."""
  K, b, m, C = codec.ell, codec.base, codec.mask_id, codec.vocab_size
  index = {s: i for i, s in enumerate(states(codec))}
  digits = codec.digits
  tab = st.step_tables()

  def class_probs(y, k):
    logits = table[index[y]].astype(np.float64) / tab['tau'][k]
    p = np.exp(logits - logits.max())
    return p / p.sum()

  def marginals(p):
    return [np.bincount(digits[:, j], weights=p, minlength=b) for j in range(K)]

  def jump_kernel(v, d, k):
    """{new value: prob} of one free sub-token at value v under the corrector with target d."""
    A, Bm, h = tab['to_digit'][k], tab['to_mask'][k], tab['h'][k]
    rate_d = 0.0 if v == d else A
    rate_m = 0.0 if v == m else Bm
    total = rate_d + rate_m
    if np.isnan(total) or total == 0:
      return {v: 1.0}
    p = -np.expm1(-h * total)
    out = {v: 1.0 - p}
    out[d] = out.get(d, 0.0) + p * rate_d / total
    out[m] = out.get(m, 0.0) + p * rate_m / total
    return out

  def digit_kernel(v, k, d_pred, d_corr_dist):
    """{new value: prob} of one sub-token: predictor reveal to d_pred, then the corrector whose
    target is drawn from d_corr_dist(value after the predictor) ({digit: prob})."""
    after = {v: 1.0} if v != m else {d_pred: tab['reveal'][k], m: 1.0 - tab['reveal'][k]}
    if not st.use_corrector:
      return after
    out = {}
    for w, pw in after.items():
      for d, pd in d_corr_dist(w).items():
        for z, pz in jump_kernel(w, d, k).items():
          out[z] = out.get(z, 0.0) + pw * pd * pz
    return out

  def product(kernels):
    out = {}
    for combo in itertools.product(*[list(kr.items()) for kr in kernels]):
      key = tuple(c[0] for c in combo)
      out[key] = out.get(key, 0.0) + np.prod([c[1] for c in combo])
    return out

  def step(y, k):
    p = class_probs(y, k)
    if st.carry_over:
      marg = marginals(p)
      kernels = []
      for j in range(K):
        mix = {}  # predictor value draw from the marginal, corrector target a fresh marginal draw
        for v, pv in enumerate(marg[j]):
          for z, pz in digit_kernel(y[j], k, v, lambda w: dict(enumerate(marg[j]))).items():
            mix[z] = mix.get(z, 0.0) + pv * pz
        kernels.append(mix)
      return product(kernels)
    out = {}
    for c in np.nonzero(p)[0]:
      d = digits[c]
      moves = product([digit_kernel(y[j], k, d[j], lambda w, j=j: {d[j]: 1.0}) for j in range(K)])
      for z, pz in moves.items():
        out[z] = out.get(z, 0.0) + p[c] * pz
    return out

  def finish(y):
    """{token id: prob}: fill the masks from the last prediction, then the invalid-code repair."""
    k = st.num_steps - 1
    p = class_probs(y, k)
    out = {}

    def add(code_digits, prob, x_hat_dist):
      x = int(codec.decode(np.asarray(code_digits)))
      if x >= C and st.invalid == 'redraw':
        for c, pc in x_hat_dist.items():
          out[c] = out.get(c, 0.0) + prob * pc
      else:
        out[x] = out.get(x, 0.0) + prob

    if st.carry_over:
      marg = marginals(p)
      fills = product([{y[j]: 1.0} if y[j] != m else dict(enumerate(marg[j])) for j in range(K)])
      for z, pz in fills.items():
        add(z, pz, dict(enumerate(p)))
    else:
      for c in np.nonzero(p)[0]:
        z = tuple(y[j] if y[j] != m else digits[c, j] for j in range(K))
        add(z, p[c], {c: 1.0})  # the same draw fills and repairs
    return out

  dist = {(m,) * K: 1.0}
  for k in range(st.num_steps - 1):
    new = {}
    for y, py in dist.items():
      for z, pz in step(y, k).items():
        new[z] = new.get(z, 0.0) + py * pz
    dist = new
  out = {}
  for y, py in dist.items():
    for x, px in finish(y).items():
      out[x] = out.get(x, 0.0) + py * px
  return out


# Four compiled programs; the exact-denoiser and product tests reuse the first two.
EULER_CORR = Settings(num_steps=4, schedule_n=2.0, temperature=(-0.5, 1.0, 1.2), use_corrector=True,
                      corrector=(3.0, 0.5, 9.9), use_timestep_scheduler=True,
                      timestep=(1.0, 0.8, 0.0))
MARGINAL_CORR = Settings(num_steps=4, carry_over=True, temperature=(0.5, 2.0, 0.7),
                         use_corrector=True, corrector=(2.0, 1.0, 0.0), precision='fp32_hires')


@pytest.mark.parametrize('C,ell,settings', [
    (16, 2, EULER_CORR),
    (16, 2, Settings(num_steps=4, temperature=(0.3, 0.5, 0.6), use_corrector=True,
                     corrector=(1.0, 2.0, 0.0))),  # same program, other numbers
    (16, 2, MARGINAL_CORR),
    (3, 2, Settings(num_steps=3, use_corrector=True, corrector=(1.0, 0.25, 0.0), invalid='keep')),
    (3, 2, Settings(num_steps=3, use_corrector=True, corrector=(1.0, 0.25, 0.0))),
    (3, 2, Settings(num_steps=3, carry_over=True)),
])
def test_sampler_matches_exact_chain(C, ell, settings):
  codec = subtokens.Codec(C, ell)
  table = random_table(codec, seed=C)
  want = exact_output_distribution(codec, table, settings)
  assert sum(want.values()) == pytest.approx(1.0, abs=1e-9)
  probs = np.zeros(max(max(want) + 1, codec.num_codes))
  for x, px in want.items():
    probs[x] = px
  assert chisq_pvalue(sample_table(table, codec, settings), probs) > 1e-4
  if codec.num_invalid:  # the chain itself emits invalid ids unless they are repaired
    assert (probs[C:].sum() > 1e-3) == (settings.invalid == 'keep')


# -- settings, grid and rates ----------------------------------------------------------------------


def test_grid_timestep_map_and_validation():
  T = 8
  np.testing.assert_array_equal(Settings(num_steps=T).grid(), np.arange(T) / T)
  identity = Settings(num_steps=T, use_timestep_scheduler=True, timestep=(1, 1, 0))
  np.testing.assert_allclose(identity.grid(), np.arange(T) / T, rtol=0, atol=1e-15)
  warped = Settings(num_steps=T, use_timestep_scheduler=True, timestep=(1, 0.8, 0))
  np.testing.assert_allclose(warped.grid(), 1 - (1 - np.arange(T) / T)**0.8)
  with pytest.raises(ValueError, match='identity is'):
    Settings(num_steps=T, use_timestep_scheduler=True, timestep=(1, 0, 0))
  with pytest.raises(ValueError, match='tau'):
    Settings(num_steps=T, temperature=(-1.0, 1.0, 0.5))  # tau < 0 near u = 1
  with pytest.raises(ValueError, match='three numbers'):
    Settings(corrector=(1.0, 2.0))
  assert hash(Settings(temperature=[1, 0, 0])) == hash(Settings())  # lists are stored as tuples


@pytest.mark.parametrize('n', [3.0, 2.0])
def test_tables_agree_with_the_core_poly_schedule(n):
  """Flow time u is core time t = 1 - u: reveal probabilities and the kappa = 0 corrector rate are
  the core 'poly' schedule's reveal_prob and NELBO weight."""
  st = Settings(num_steps=16, schedule_n=n)
  u, tab = st.grid(), st.step_tables()
  sched = schedules.get('poly', n=n)
  t = 1.0 - u
  np.testing.assert_allclose(tab['reveal'], np.asarray(sched.reveal_prob(t[:-1], t[1:])), rtol=1e-5)
  np.testing.assert_allclose(tab['to_digit'][1:], np.asarray(sched.weight(t[1:-1])), rtol=1e-5)
  assert (tab['to_mask'][1:] == 0).all() and np.isnan(tab['to_mask'][0])  # kappa = 0; 0/0 at u = 0
  kappa = im.kappa_at(u[1:-1], (2.0, 0.5, 123.0))
  np.testing.assert_allclose(kappa, 2.0 * (u[1:-1] * (1 - u[1:-1]))**0.5)  # c2 unused
  to_digit, to_mask = im.corrector_rates(u[1:-1], n, (2.0, 0.5, 0.0))
  alpha, dalpha = u[1:-1]**n, n * u[1:-1]**(n - 1)
  np.testing.assert_allclose(to_digit, (1 + kappa) * dalpha / (1 - alpha))
  np.testing.assert_allclose(to_mask, kappa * dalpha / alpha)


def test_corrector_jump_probabilities():
  """Rates are zeroed at the current value; a NaN rate (alpha = 0) freezes unmasked sub-tokens."""
  m, M, h, A, Bm = 5, 40000, 0.5, 0.7, 1.3
  d = jnp.full((4, M), 2, jnp.int32)
  y = jnp.stack([jnp.full((M,), m), jnp.full((M,), 2), jnp.full((M,), 4), jnp.full((M,), 4)])
  free = jnp.asarray([True, True, True, False])[:, None] & jnp.ones((4, M), bool)

  jump = jax.jit(lambda to_mask: im.corrector_jump(jax.random.key(0), y, d, free, to_digit=A,
                                                   to_mask=to_mask, h=h, mask_id=m))

  def rates(to_mask):
    out = np.asarray(jump(jnp.float32(to_mask)))
    return [{v: np.mean(row == v) for v in (2, 4, m)} for row in out]

  def close(freq, p):
    assert abs(freq - p) < 5 * np.sqrt(p * (1 - p) / M) + 1e-12, (freq, p)

  r = rates(Bm)
  close(r[0][2], -np.expm1(-h * A))  # masked -> d only
  close(r[1][m], -np.expm1(-h * Bm))  # equal to d -> mask only
  both = -np.expm1(-h * (A + Bm))  # any other digit -> d or mask in proportion to the rates
  close(r[2][2], both * A / (A + Bm))
  close(r[2][m], both * Bm / (A + Bm))
  assert r[3][4] == 1.0  # conditioned: never moves
  r = rates(np.nan)
  close(r[0][2], -np.expm1(-h * A))
  assert r[1][2] == 1.0 and r[2][4] == 1.0


# -- invariants ------------------------------------------------------------------------------------


@functools.cache
def coupled_model(codec, seed=0):
  """State-dependent logits: a per-digit embedding plus the grid mean (all tokens interact)."""
  E = jnp.asarray(np.random.default_rng(seed).normal(size=(codec.ell, codec.base + 1,
                                                           codec.vocab_size)), jnp.float32)

  def fn(y):
    own = sum(E[j][y[..., j]] for j in range(codec.ell))
    return own + jnp.mean(own, axis=(1, 2, 3), keepdims=True)
  return fn


@functools.cache
def recording_model(codec, seed):
  """coupled_model that also records every state it is called on (network evaluations)."""
  base = coupled_model(codec, seed)
  calls = []

  def fn(y):
    jax.debug.callback(lambda a: calls.append(np.asarray(a).copy()), y)
    return base(y)
  return fn, calls


# Shared by the invariants and the cache tests (the same compiled programs).
CACHE_T, CACHE_SHAPE = 16, (1, 2, 2, 3)


def test_invariants_and_conditioning():
  codec = subtokens.Codec(256, 2)
  shape = CACHE_SHAPE
  st = Settings(num_steps=CACHE_T, use_corrector=True, corrector=(8.0, 0.5, 0.0),
                temperature=(-0.2, 1.0, 1.0))
  rng = np.random.default_rng(0)
  cond = (jnp.asarray(rng.integers(0, 256, shape), jnp.int32), jnp.asarray(rng.random(shape) < 0.5))
  run = lambda key: im.sample(key, recording_model(codec, 3)[0], codec, shape=shape, settings=st,
                              condition=cond, decode=False)
  out = run(jax.random.key(3))
  y = np.asarray(out.tokens)
  assert y.shape == shape + (2,) and (y != codec.mask_id).all() and (y >= 0).all()
  x = np.asarray(codec.decode(y))
  assert x.dtype == np.int32 and (x >= 0).all() and (x < 256).all()
  keep = np.asarray(cond[1])
  np.testing.assert_array_equal(x[keep], np.asarray(cond[0])[keep])
  assert (x[~keep] != np.asarray(cond[0])[~keep]).any()
  again = run(jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(again.tokens), y)
  assert int(again.nfe) == int(out.nfe) and int(again.idle_steps) == int(out.idle_steps)
  assert (np.asarray(run(jax.random.key(4)).tokens) != y).any()
  assert 1 <= int(out.nfe) <= st.num_steps


# One small case with the corrector, shared by the next two tests (one compiled program).
SMALL_SHAPE = (1, 2, 1, 3)
SMALL = dict(num_steps=2, use_corrector=True, corrector=(4.0, 1.0, 0.0))


def test_jit_equals_no_jit():
  codec = subtokens.Codec(256, 2)
  # The grid starts at u = 0.2 (not 0), so the one predictor step also runs a live corrector.
  st = Settings(**SMALL, temperature=(-0.15, 1.0, 1.0), use_timestep_scheduler=True,
                timestep=(1.0, 1.0, 0.2))
  cond = (jnp.asarray([[[[7, 0, 255]], [[0, 0, 0]]]], jnp.int32),
          jnp.asarray([[[[True, False, True]], [[False, False, False]]]]))
  run = lambda: im.sample(jax.random.key(5), coupled_model(codec, 1), codec, shape=SMALL_SHAPE,
                          settings=st, condition=cond)
  jitted = run()
  with jax.disable_jit():
    eager = run()
  for a, b in zip(jitted, eager):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x = np.asarray(jitted.tokens)
  assert x[0, 0, 0, 0] == 7 and x[0, 0, 0, 2] == 255
  assert (x >= 0).all() and (x < 256).all()


def test_unit_temperature_and_identity_timestep_are_exact():
  codec = subtokens.Codec(256, 2)
  run = lambda **kw: np.asarray(im.sample(
      jax.random.key(8), coupled_model(codec, 1), codec, shape=SMALL_SHAPE,
      settings=Settings(**SMALL, **kw)).tokens)
  untempered = run(temperature=None)
  np.testing.assert_array_equal(run(temperature=(1.0, 0.0, 0.0)), untempered)
  np.testing.assert_array_equal(run(temperature=(0.0, 3.0, 1.0)), untempered)
  np.testing.assert_array_equal(
      run(temperature=None, use_timestep_scheduler=True, timestep=(1.0, 1.0, 0.0)), untempered)
  assert (run(temperature=(0.0, 0.0, 0.05)) != untempered).any()  # a real temperature does act


# -- the math with known answers -------------------------------------------------------------------


def test_exact_denoiser_recovers_the_data_distribution():
  """With the exact posterior of i.i.d. tokens, Euler Prime with a corrector (its decisions do not
  depend on digit values) reproduces the joint pi; the marginal variant in one step only reproduces
  the product of pi's digit marginals. With one step the model is called at u = 0 only, where the
  temperature is tau(0) = a 0**b' + c = c: the flow-time convention."""
  codec = subtokens.Codec(16, 2)  # b = 4
  pi = np.random.default_rng(0).dirichlet(np.full(16, 0.7))
  table = posterior_table(codec, pi)
  untempered = dataclasses.replace(EULER_CORR, temperature=None)  # the same compiled program
  assert chisq_pvalue(sample_table(table, codec, untempered), pi) > 1e-4

  def product_of_marginals(p):
    marg = [np.bincount(codec.digits[:, j], weights=p, minlength=4) for j in range(2)]
    return np.outer(marg[0], marg[1]).reshape(-1)

  one_shot = lambda temperature: sample_table(
      table, codec, Settings(num_steps=1, carry_over=True, temperature=temperature))
  plain = one_shot(None)
  assert chisq_pvalue(plain, product_of_marginals(pi)) > 1e-4
  assert chisq_pvalue(plain, pi) < 1e-6
  sharp = one_shot((5.0, 1.0, 0.5))  # tau(0) = 0.5: p ~ pi**2
  assert chisq_pvalue(sharp, product_of_marginals(pi**2 / np.sum(pi**2))) > 1e-4
  assert chisq_pvalue(sharp, product_of_marginals(pi)) < 1e-6


def test_marginal_variant_reproduces_a_product_distribution_over_digits():
  """pi factorises over the digits: independent digit draws lose nothing, so the marginal variant
  (here with a corrector and the exact posterior as the model) reproduces pi."""
  codec = subtokens.Codec(16, 2)  # b = 4
  digit_p = np.random.default_rng(1).dirichlet(np.ones(4), size=2)
  pi = digit_p[0][codec.digits[:, 0]] * digit_p[1][codec.digits[:, 1]]
  untempered = dataclasses.replace(MARGINAL_CORR, temperature=None)  # the same compiled program
  out = sample_table(posterior_table(codec, pi), codec, untempered)
  assert chisq_pvalue(out, pi) > 1e-4
  non_product = np.random.default_rng(2).dirichlet(np.full(16, 0.5))
  out = sample_table(posterior_table(codec, non_product), codec, untempered)
  assert chisq_pvalue(out, non_product) < 1e-6  # digits drawn independently: the joint is lost


# -- caching and the corrector's kappa = 0 ---------------------------------------------------------


def test_cache_and_the_zero_kappa_corrector():
  """Cache on/off give identical samples, nfe counts real calls (T without cache, as the reference).
  c0 = 0 is not 'no corrector' (the reference's rate keeps its forward term): with the same key it
  never remasks and its masked set stays inside the predictor-only one, strictly smaller at times.
  A strong corrector does remask."""
  codec = subtokens.Codec(256, 2)
  T, shape = CACHE_T, CACHE_SHAPE
  fn, calls = recording_model(codec, 3)

  def run(**kw):
    jax.effects_barrier()
    calls.clear()
    out = im.sample(jax.random.key(6), fn, codec, shape=shape, settings=Settings(num_steps=T, **kw),
                    decode=False)  # as the invariants test: one compiled program for both
    jax.effects_barrier()
    return out, np.stack(calls) == codec.mask_id  # masked sub-tokens at each network call

  zero_kappa = dict(use_corrector=True, corrector=(0.0, 1.0, 0.0))
  for kw in ({}, zero_kappa):
    (on, _), (off, masks) = run(cache=True, **kw), run(cache=False, **kw)
    np.testing.assert_array_equal(on.tokens, off.tokens)
    assert int(on.idle_steps) == int(off.idle_steps) > 0  # alpha = u**3 reveals little early on
    assert int(off.nfe) == len(masks) == T
    assert int(on.nfe) < T
    if not kw:
      assert int(on.nfe) <= T - 1 - int(on.idle_steps) + 1
      plain = masks
  zero = masks
  assert not (zero & ~plain).any()
  count = lambda mk: mk.reshape(T, -1).sum(axis=1)
  assert (count(zero) < count(plain)).any()
  assert (np.diff(zero.reshape(T, -1).astype(int), axis=0) <= 0).all()
  _, strong = run(cache=False, use_corrector=True, corrector=(50.0, 0.5, 0.0))
  assert (np.diff(strong.reshape(T, -1).astype(int), axis=0) > 0).any()


def test_invalid_codes_with_three_digits_per_pixel():
  """ell = 3 (b = 7, 343 codes): mixing classes 4 = (0,0,4) and 255 = (5,1,3) lets digits of
  different draws form (5,1,4) = 256. 'keep' returns such ids as the reference would; 'redraw' never
  does and leaves the valid tokens alone. (The marginal variant's repair: the exact-chain test.)"""
  codec = subtokens.Codec(256, 3)
  logits = np.full(256, -30.0)
  logits[[4, 255]] = 0.0
  fn = fixed_model(logits)
  run = lambda invalid: np.asarray(im.sample(
      jax.random.key(0), fn, codec, shape=(64, 4, 4, 3),
      settings=Settings(num_steps=4, invalid=invalid)).tokens)  # one compiled program for both
  kept, fixed = run('keep'), run('redraw')
  assert kept.max() >= 256
  assert fixed.max() < 256 and fixed.min() >= 0
  valid = kept < 256
  np.testing.assert_array_equal(fixed[valid], kept[valid])


# -- the settings of a config ----------------------------------------------------------------------


def test_config_settings_and_only_the_poly_schedule():
  """build.image_sampler_settings: the config's `sampler` block on its 'poly' schedule, the token
  draws at sample.precision; any other schedule is refused (the sampler samples alpha = u**n)."""
  from configs import cifar10  # pylint: disable=import-outside-toplevel
  from prime_jax import build  # pylint: disable=import-outside-toplevel
  cfg = cifar10.get_config()
  st = build.experiment(cfg).image_sampler
  assert st == build.image_sampler_settings(cfg, schedules.get('poly', n=3.0))
  assert st == Settings(num_steps=512, schedule_n=3.0, carry_over=True,
                        temperature=(-0.2, 2.0, 1.0), use_corrector=True,
                        corrector=(16.0, 2.0, 0.75), use_timestep_scheduler=True,
                        timestep=(1.0, 1.7, 0.0), precision='fp64')
  cfg.unlock()
  cfg.sample.precision, cfg.diffusion.schedule_n = 'fp32_hires', 2.0
  cfg.sampler.use_timestep_scheduler = False  # the timestep row is then the identity
  st = build.experiment(cfg).image_sampler
  assert (st.precision, st.schedule_n, st.timestep) == ('fp32_hires', 2.0, (1.0, 1.0, 0.0))
  for name, kw in (('loglinear', dict(eps=1e-3)), ('linear', {}), ('cosine', {})):
    with pytest.raises(ValueError, match=f"'poly'.*{name!r}"):
      build.image_sampler_settings(cfg, schedules.get(name, **kw))
  cfg.diffusion.schedule = 'loglinear'
  with pytest.raises(ValueError, match="diffusion.schedule='loglinear'"):
    build.experiment(cfg)
  from configs import sotu  # pylint: disable=import-outside-toplevel
  assert build.experiment(sotu.get_config()).image_sampler is None  # text: loglinear, no sampler
