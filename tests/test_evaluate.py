"""--mode eval and --mode sample: determinism, mesh independence, exactness, output files."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prime_jax import build, evaluate, losses, sample
from prime_jax import checkpoint as checkpoint_lib
from prime_jax import train as train_lib
from prime_jax.data import pipeline
from prime_jax.diffusion import exact, schedules
from prime_jax.metrics import unigram
from tests.test_train import tiny_config

# The config of the `trained` checkpoint; tests change only fields that keep its shapes.
TRAINED = {'train.num_steps': 3, 'train.eval_every': 3, 'train.ckpt_every': 3,
           'data.seq_len': 16, 'eval.num_batches': 1}


def trained_config(**overrides):
  return tiny_config(**{**TRAINED, **overrides})


def experiment(**overrides):
  return build.experiment(trained_config(**overrides))


def evaluator(exp, r, **kw):
  return evaluate.Evaluator(exp, r.mesh, r.graphdef, r.param_shardings, r.task, **kw)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny model trained for a few real SOTU steps, checkpointed in a workdir."""
  workdir = str(tmp_path_factory.mktemp('eval') / 'run')
  cfg = trained_config()
  train_lib.train_and_evaluate(cfg, workdir)
  return cfg, workdir


def test_eval_deterministic_and_seed_dependent(trained):
  cfg, workdir = trained
  exp = experiment(**{'eval.num_t': 2})
  r = evaluate.Restored(exp, workdir)
  ev = evaluator(exp, r)
  a = ev.run(r.params, num_batches=2)
  b = ev.run(r.params, num_batches=2)
  assert a['nll'] == b['nll'] and a['paper_objective'] == b['paper_objective']
  other = evaluator(experiment(**{'eval.num_t': 2, 'eval.seed': 7}), r)
  c = other.run(r.params, num_batches=2)
  assert c['nll'] != a['nll']
  assert a['tokens'] == 2 * cfg.eval.batch_size * cfg.data.seq_len
  assert np.isclose(a['ppl_bound'], np.exp(a['nll'])) and np.isclose(a['bpt'], a['nll'] / np.log(2))


def test_eval_independent_of_mesh_and_batch(trained):
  _, workdir = trained
  exp = experiment(**{'eval.num_t': 2})
  one = evaluate.Restored(exp, workdir, devices=jax.devices()[:1])
  eight = evaluate.Restored(exp, workdir)
  assert one.mesh.size == 1 and eight.mesh.size == 8
  ev1, ev8 = evaluator(exp, one), evaluator(exp, eight)
  r1 = ev1.run(one.params, num_batches=2)
  r8 = ev8.run(eight.params, num_batches=2)
  np.testing.assert_allclose(r8['nll'], r1['nll'], rtol=1e-5)
  np.testing.assert_allclose(r8['paper_objective'], r1['paper_objective'], rtol=1e-5)
  # Randomness is keyed on the sequence index: half the batch size, same sequences, same numbers.
  exp4 = experiment(**{'eval.num_t': 2, 'eval.batch_size': 4})
  ev4 = evaluator(exp4, one)
  r4 = ev4.run(one.params, num_batches=4)
  np.testing.assert_allclose(r4['nll'], r1['nll'], rtol=1e-5)
  for key in ('nll_cv', 'nll_cv_se', 'nll_se', 'reference_mc'):
    np.testing.assert_allclose([r8[key], r4[key]], r1[key], rtol=1e-4)
  assert r4['tokens'] == r8['tokens'] == r1['tokens'] == 16 * 16
  # Not only the means: every sequence gets the same per-example sums and token histogram.
  s1 = ev1.sums(one.params, num_batches=2)
  for s in (ev8.sums(eight.params, num_batches=2), ev4.sums(one.params, num_batches=4)):
    assert sorted(s.per_example) == sorted(s1.per_example) == ['nelbo_B', 'paper_B', 'ref_B',
                                                               'tokens_B']
    for k, v in s1.per_example.items():
      np.testing.assert_allclose(s.per_example[k], v, rtol=1e-5, atol=1e-5, err_msg=k)
    np.testing.assert_array_equal(s.counts_C, s1.counts_C)


@pytest.mark.slow  # the whole SOTU validation split
def test_whole_split_counts_every_real_token_once(trained):
  cfg, workdir = trained
  # Large batches of one time sample each: the count is what is tested, not the estimate.
  exp = experiment(**{'eval.batch_size': 256, 'eval.num_t': 1})
  r = evaluate.Restored(exp, workdir)
  res = evaluator(exp, r).run(r.params, 'sotu', 'validation', num_batches=0)
  n = pipeline.num_sequences('sotu', 'validation', cfg.data.seq_len)
  assert n == exp.data.num_examples('validation') and n % 256  # the last batch is padded
  assert res['tokens'] == n * cfg.data.seq_len and res['examples'] == n
  assert res['batches'] == -(-n // 256)


def test_estimate_approaches_exact_expectation():
  """Tiny codec and model: the many-sample estimator converges to the enumerated expectation."""
  cfg = tiny_config(**{'diffusion.vocab_size': 7, 'data.seq_len': 2, 'model.dim': 16,
                       'model.num_heads': 2, 'model.num_layers': 1})
  exp = build.experiment(cfg)
  task = exp.task
  codec = task.codec
  assert (codec.base, codec.ell) == (3, 2)
  model = exp.make_model(rngs=nnx.Rngs(params=3))
  head = model.final.head
  head.kernel[...] = jax.random.normal(jax.random.key(1), head.kernel[...].shape)
  graphdef, params = nnx.split(model, nnx.Param)
  x0 = np.array([[4, 6]], np.int32)
  y0 = np.asarray(codec.encode(jnp.asarray(x0)))[0]  # (L, K)
  patterns = exact.mask_patterns(x0.shape[1] * codec.ell)  # (P, L*K) True = masked
  y_P = np.where(patterns.reshape(-1, 2, codec.ell), codec.mask_id, y0[None]).astype(np.int32)
  x_P = np.repeat(x0, len(y_P), axis=0)

  @jax.jit
  def exact_losses(t):
    t_P = jnp.full((len(y_P),), t, jnp.float32)
    out = losses.per_token_losses(params, graphdef, jnp.asarray(x_P), t_P, jnp.asarray(y_P),
                                  task)
    return {k: v.mean(axis=1) for k, v in out.items()}

  eps = task.sampling_eps
  want = {k: exact.expected_objective(lambda t, k=k: np.asarray(exact_losses(t)[k], np.float64),
                                      patterns, task.schedule, eps, 1.0, num_nodes=96)
          for k in ('nelbo', 'paper')}
  B = 512
  batch = {'tokens': jnp.asarray(np.repeat(x0, B, axis=0)), 'mask': jnp.ones((B,), bool),
           'index': jnp.arange(B, dtype=jnp.int32)}
  run = jax.jit(lambda p, b, s: evaluate.eval_sums(p, b, graphdef=graphdef, task=task, num_t=64,
                                                   seed=s), static_argnums=2)
  est = {'nelbo': [], 'paper': []}
  for seed in range(8):
    got = run(params, batch, seed)
    for k in est:
      est[k].append(float(got[k + '_B'].sum() / got['tokens_B'].sum()))
  for k, v in est.items():
    mean, se = np.mean(v), np.std(v, ddof=1) / np.sqrt(len(v))
    assert se < 0.02 * want[k], (k, se)  # precise enough for the comparison to mean something
    assert abs(mean - want[k]) < 4 * se + 1e-3, (k, mean, se, want[k])
  # The two objectives differ (ell = 2) by far more than the error: the check can tell them apart.
  assert abs(np.mean(est['nelbo']) - want['paper']) > 0.1 * want['paper']
  # The time average matters: the same estimator at one fixed t is far off.
  assert abs(float(exact_losses(0.9)['nelbo'].mean()) - want['nelbo']) > 0.05 * want['nelbo']


WIKI_RAW = ''.join(f' = Chapter {i} = \n \n The union is strong , and year {i} was good . \n'
                   for i in range(12))


def test_eval_mode_writes_results_and_rejects_other_config(trained, tmp_path, monkeypatch):
  """eval.sets through eval.sets_dir (a local WikiText-2 file here): the main split takes
  eval.num_batches batches, an extra set is evaluated whole."""
  from prime_jax.data import text  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv(text.CACHE_ENV_VAR, str(tmp_path / 'cache'))
  sets_dir = tmp_path / 'sets'
  (sets_dir / 'wikitext-2-raw').mkdir(parents=True)
  (sets_dir / 'wikitext-2-raw' / 'wiki.valid.raw').write_text(WIKI_RAW, encoding='utf-8')
  cfg, workdir = trained
  exp = experiment(**{'eval.sets': 'wikitext2', 'eval.sets_dir': str(sets_dir), 'eval.num_t': 1,
                      'eval.num_batches': 1})
  assert exp.eval.sets == (('wikitext2', 'validation'),)
  out = evaluate.run_eval(exp, workdir)
  assert [r['source'] for r in out['results']] == ['sotu', 'wikitext2']
  main, extra = out['results']
  assert main['tokens'] == cfg.eval.batch_size * cfg.data.seq_len and main['batches'] == 1
  n = pipeline.num_sequences('wikitext2', 'validation', cfg.data.seq_len, str(sets_dir))
  assert n > cfg.eval.batch_size  # more than one batch: the extra set is really read whole
  assert extra['examples'] == n and extra['tokens'] == n * cfg.data.seq_len
  assert main['weights'] == extra['weights'] == 'ema' and main['step'] == 3
  assert os.path.basename(out['file']) == 'eval_step3_validation_b1x8_t1_wikitext2.json'
  with open(out['file']) as f:
    saved = json.load(f)
  assert saved['results'][0]['nll'] == pytest.approx(out['results'][0]['nll'])
  assert all(r['ppl_bound'] > 1 for r in saved['results'])
  bigger = build.experiment(tiny_config(**{'data.seq_len': 16, 'model.dim': 64}))
  with pytest.raises(ValueError, match='does not match this config'):
    evaluate.Restored(bigger, workdir)
  with pytest.raises(ValueError, match='available steps'):
    evaluate.Restored(exp, workdir, step=999)


def test_restore_params_equal_the_train_state_without_an_optimizer(trained, monkeypatch):
  """checkpoint.restore_params / evaluate.Restored read the EMA (eval.use_ema) or the raw weights
  alone; they equal a full TrainState restore (Checkpointer + train_lib.state_shardings), and no
  optimizer is ever built for them."""
  _, workdir = trained
  exp = experiment()
  mesh = exp.mesh(jax.devices()[:1])
  tx, _ = exp.make_optimizer()
  _, abs_state, _ = train_lib.state_shardings(exp.make_model, tx, mesh)
  ckpt = checkpoint_lib.Checkpointer(workdir)
  state, _ = ckpt.restore(abs_state)
  ckpt.close()
  assert int(state.step) == 3

  def no_optimizer(*args, **kwargs):
    raise AssertionError('restoring weights built an optimizer')
  monkeypatch.setattr(build.Experiment, 'make_optimizer', no_optimizer)
  monkeypatch.setattr(train_lib.optim, 'make_optimizer', no_optimizer)
  ema = evaluate.Restored(exp, workdir, devices=jax.devices()[:1])
  raw = evaluate.Restored(experiment(**{'eval.use_ema': False}), workdir)  # onto 8 devices
  assert (ema.use_ema, raw.use_ema, ema.step, raw.step) == (True, False, 3, 3)
  abs_params = abs_state.params
  direct = {which: checkpoint_lib.restore_params(workdir, abs_params, which=which)
            for which in ('ema', 'params')}
  assert direct['ema'][1] == direct['params'][1] == 3
  for want, got in ((state.ema, ema.params), (state.params, raw.params),
                    (state.ema, direct['ema'][0]), (state.params, direct['params'][0])):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The two are different weights (the EMA lags), so the comparison can tell them apart.
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(state.ema), jax.tree.leaves(state.params)))
  # Each onto its own mesh, with the shardings it asked for.
  assert (ema.mesh.size, raw.mesh.size) == (1, 8)
  for r in (ema, raw):
    assert all(x.sharding == sh for x, sh in zip(jax.tree.leaves(r.params),
                                                 jax.tree.leaves(r.param_shardings)))
  with pytest.raises(ValueError, match='which'):
    checkpoint_lib.restore_params(workdir, abs_params, which='opt_state')
  with pytest.raises(ValueError, match='available steps'):
    checkpoint_lib.restore_params(workdir, abs_params, step=999)


@pytest.mark.parametrize('precision', ['fp64', 'fp32_hires'])
def test_sample_mode_output(trained, precision):
  _, workdir = trained
  steps, prefix = 8, 5
  exp = experiment(**{'sample.num_samples': 3, 'sample.batch_size': 2, 'sample.steps': steps,
                      'sample.precision': precision, 'sample.prefix_len': prefix,
                      'sample.nucleus_p': 0.9})
  summary = sample.run_sample(exp, workdir)
  jsonl, summary_json = summary['files']
  assert os.path.basename(jsonl) == (f"samples_step{summary['step']}_n3_T{steps}_{precision}"
                                     f'_p{prefix}_top0.9.jsonl')
  with open(jsonl) as f:
    records = [json.loads(line) for line in f]
  assert len(records) == 3 and [r['index'] for r in records] == [0, 1, 2]
  val = np.concatenate([b['tokens'][b['mask']] for b in pipeline.make_text_pipeline(
      'sotu', 'validation', seq_len=16, batch_size=4, seed=0, train=False, pad_final_batch=True)
      ][:1])
  for i, r in enumerate(records):
    assert len(r['tokens']) == 16 and all(0 <= t < 50257 for t in r['tokens'])
    assert r['tokens'][:prefix] == val[i, :prefix].tolist()
    assert isinstance(r['text'], str) and r['text']
  assert summary['prefix_kept']
  # Every step either calls the network or is idle; one more call when masks survive t_min.
  nfe, idle = summary['nfe_per_batch'], summary['idle_steps_per_batch']
  assert steps <= nfe + idle <= steps + 1
  assert 0 < nfe <= steps + 1
  with open(summary_json) as f:
    assert json.load(f)['num_samples'] == 3


@pytest.mark.parametrize('ell,vocab', [(1, 20), (2, 20), (3, 20), (3, 27)])
def test_unigram_integrand_integrates_to_the_unigram_nll(ell, vocab):
  """Tokens independent: the unigram with carry-over is the exact posterior and the NELBO is tight,
  so the integrand's integral over t is exactly -log p per token (here by quadrature)."""
  from scipy import integrate

  from prime_jax.diffusion import subtokens
  rng = np.random.default_rng(ell)
  codec = subtokens.Codec(vocab, ell)
  p = rng.dirichlet(np.ones(vocab) * 0.5)
  log_p = np.log(p)
  counts = p * 1e6  # tokens drawn from p itself: the entropy inequalities below hold
  nll = float(-(counts * log_p).sum() / counts.sum())
  assert unigram.cross_entropy(log_p, counts) == pytest.approx(nll, rel=1e-12)
  sched = schedules.get('linear')
  f = lambda t: unigram.integrand(log_p, counts, codec, sched, t)
  value, _ = integrate.quad(f, 0.0, 1.0, epsabs=1e-10, limit=200)
  np.testing.assert_allclose(value, nll, rtol=1e-7)
  if ell == 1:  # one digit: the integrand is the NLL at every t
    np.testing.assert_allclose([f(0.1), f(0.9)], nll, rtol=1e-6)
  else:  # sum_j H(d_j | other digits) <= H(token) <= sum_j H(d_j): t -> 0 and t -> 1
    assert f(0.05) < nll < f(0.95)


def _unigram_model(**overrides):
  """A Trainer and a fresh state at the training unigram (zero head kernel, unigram bias)."""
  cfg = tiny_config(**{'data.seq_len': 16, 'eval.batch_size': 8, 'model.init.head_scale': 0.0,
                       **overrides})
  tr = train_lib.Trainer(build.experiment(cfg), devices=jax.devices()[:1])
  return tr, tr.init_state()  # applies the head-bias prior (model.init.head_bias = 'unigram')


def test_integrand_grid_of_an_untrained_unigram_model_is_the_unigram_floor():
  """The head starts at the training unigram (zero kernel): its integrand at each fixed t is the
  exact unigram integrand, up to Monte Carlo error; t must really be fixed (0.1 vs 0.9 differ)."""
  tr, state = _unigram_model(**{'eval.num_t': 32})
  ev = tr.evaluator()
  rows = evaluate.integrand_grid(ev, state.params, [0.9, 0.1], num_batches=4)
  assert [row['t'] for row in rows] == [0.1, 0.9]
  assert all(row['tokens'] == 4 * 8 * 16 for row in rows)
  for row in rows:
    assert abs(row['model'] - row['unigram']) < 0.25, row
  assert rows[1]['unigram'] - rows[0]['unigram'] > 1.0
  with pytest.raises(ValueError, match='fixed evaluation time'):
    evaluate.Evaluator(tr.exp, tr.mesh, tr.graphdef, tr.shardings.params, tr.task, t_fixed=1.0)


def test_control_variate_of_a_context_free_model_is_the_exact_expectation():
  """A model that is the training unigram (zero head kernel, unigram bias): model - unigram is 0
  on every draw, so nll_cv is the exact expected estimate with no error, while the plain estimate
  scatters around it within its standard error."""
  tr, state = _unigram_model(**{'eval.num_t': 4})
  ev = tr.evaluator()
  r = ev.run(state.params, num_batches=8)
  np.testing.assert_allclose(r['reference_mc'], r['nll'], rtol=1e-5)
  np.testing.assert_allclose(r['nll_cv'], r['reference_nll'], atol=1e-4)
  assert r['nll_cv_se'] < 1e-4 < r['nll_se']
  assert abs(r['nll'] - r['reference_nll']) < 4 * r['nll_se']
  # The expectation is the unigram cross-entropy of these very tokens, up to t < eps.
  counts = np.zeros(tr.codec.vocab_size, np.int64)
  for _, b in zip(range(8), tr.exp.data.iterator('validation', train=False, batch_size=8)):
    counts += np.bincount(np.asarray(b['tokens'])[np.asarray(b['mask'])].ravel(),
                          minlength=counts.size)
  assert counts.sum() == r['tokens'] == 8 * 8 * 16
  xent = -(counts * pipeline.unigram_log_probs('sotu', 16)).sum() / counts.sum()
  np.testing.assert_allclose(r['reference_nll'], xent, rtol=2e-3)
  assert 'nll_cv' not in evaluate.Evaluator(tr.exp, tr.mesh, tr.graphdef, tr.shardings.params,
                                            tr.task, control_variate=False).run(
                                                state.params, num_batches=1)


@pytest.mark.parametrize('ell', [1, 2, 3])
def test_unigram_expected_estimate_is_the_mean_integrand_over_t(ell):
  """metrics.unigram.expected_estimate: the integrand's mean over t ~ U[eps, 1) (against a dense
  trapezoid rule), and -log p exactly when eps -> 0 (linear schedule)."""
  from prime_jax.diffusion import subtokens
  rng = np.random.default_rng(ell)
  codec = subtokens.Codec(27, ell)
  log_p = np.log(rng.dirichlet(np.ones(27)))
  counts = rng.integers(0, 50, 27).astype(float)
  nll = -(counts * log_p).sum() / counts.sum()
  sched, eps = schedules.get('loglinear', eps=1e-3), 1e-3
  t = np.geomspace(eps, 1.0, 4001)
  f = np.array([unigram.integrand(log_p, counts, codec, sched, x) for x in t[::400]])
  coef = unigram.integrand_coefficients(log_p, counts, codec)
  dense = np.array([unigram._integrand_from(coef, sched, x) for x in t])  # pylint: disable=protected-access
  np.testing.assert_allclose(dense[::400], f, rtol=1e-12)
  expected = unigram.expected_estimate(log_p, counts, codec, sched, eps)
  np.testing.assert_allclose(expected, np.trapezoid(dense, t) / (1 - eps), rtol=1e-5)
  np.testing.assert_allclose(
      unigram.expected_estimate(log_p, counts, codec, schedules.get('linear'), 1e-9), nll,
      rtol=1e-6)


def test_ratio_standard_error():
  rng = np.random.default_rng(0)
  num = rng.normal(5.0, 2.0, 1000)
  np.testing.assert_allclose(evaluate.ratio_se(num * 16, np.full(1000, 16.0)),
                             num.std(ddof=1) / np.sqrt(1000), rtol=1e-10)
  den = np.arange(1.0, 1001.0)
  assert evaluate.ratio_se(5.0 * den, den) < 1e-12  # a constant ratio has no error
  assert np.isnan(evaluate.ratio_se(num[:1], np.ones(1)))
