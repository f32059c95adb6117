"""The image model end to end on Fashion-MNIST: a few real training steps of the UNet through the
Trainer, and the one likelihood evaluator on images (keyed by image index, padding-free)."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from configs import fashion_mnist
from prime_jax import build, evaluate, report
from prime_jax import sharding as sharding_lib
from prime_jax import train as train_lib
from prime_jax.data import images

LN256 = math.log(256.0)


# ----------------------------------------------------------------------------- training


def tiny_config(**overrides):
  cfg = fashion_mnist.get_config('ell=2')
  cfg.unlock()
  # One level (28 x 28, attention in the middle only): XLA's CPU compile time grows with the
  # number of parameters (one threefry per initialiser), and this test compiles init, step, eval.
  u = cfg.model.unet
  u.model_channels, u.channel_mult, u.num_res_blocks = 8, (1,), 1
  u.attention_resolutions, u.head_channels, u.norm_groups = (), 8, 4
  cfg.data.batch_size, cfg.eval.batch_size, cfg.eval.num_batches = 8, 16, 1
  cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule = 1e-2, 0, 'constant'
  cfg.optim.ema_decay = 0.0  # the EMA is the last parameters: evaluate what was trained
  cfg.model.dropout = 0.1
  cfg.update_from_flattened_dict(overrides)
  return cfg


@pytest.mark.slow  # compiles and trains the UNet
def test_fashion_mnist_training_steps_and_bits_per_dim(tmp_path, capsys):
  cfg = tiny_config()
  exp = build.experiment(cfg)
  tr = train_lib.Trainer(exp)  # 8 fake devices: the batch is sharded 8 ways
  assert tr.token_shape == (28, 28, 1) and tr.flops_per_token > 0
  state = tr.init_state()
  evaluator = tr.evaluator()
  # At init the logits are 0: the authors' image loss is exactly ln 256, and the valid bound of a
  # uniform model is ln 256 nats (8 bits) in expectation over t (ell * ln 16 * int -alpha' dt).
  ev0 = evaluator.run(state.params)
  assert ev0['paper_objective'] == pytest.approx(LN256, rel=2e-5)  # float32 sums
  assert 7.0 < ev0['bpd'] < 9.0 and ev0['tokens'] == 16 * 784 and ev0['examples'] == 16
  it = exp.data.iterator('train', train=True, batch_size=cfg.data.batch_size)
  losses = []
  for _ in range(8):
    state, m = tr.train_step(state, tr.global_batch(next(it)))
    losses.append(float(m['loss']))
  assert losses[0] == pytest.approx(LN256, rel=2e-5)
  assert np.isfinite(losses).all() and np.mean(losses[-3:]) < LN256 - 0.2, losses
  assert int(state.step) == 8
  ev = evaluator.run(state.ema)
  assert np.isfinite([ev['nll'], ev['bpd'], ev['paper_objective'], ev['paper_bpd']]).all()
  assert ev['bpd'] == pytest.approx(ev['nll'] / math.log(2.0))
  assert ev['bpd_se'] == pytest.approx(ev['nll_se'] / math.log(2.0))
  assert ev['paper_bpd'] == pytest.approx(ev['paper_nll'] / math.log(2.0))
  assert ev['paper_objective'] < LN256
  report.print_summary(str(tmp_path), dict(ev, steps=8, params=tr.n_params, wall_s=1.0),
                       source=exp.data.source, ell=exp.codec.ell)
  out = capsys.readouterr().out
  assert 'BPD <=' in out and "authors' objective" in out and 'PPL' not in out


# ----------------------------------------------------------------------------- evaluation


def _perturbed_params(exp, seed=0, scale=0.05):
  """The tiny UNet's parameters, every one (the zero output conv included) moved by host noise, so
  that the logits depend on the image (at init they are all 0)."""
  model = exp.make_model(rngs=nnx.Rngs(params=exp.loop.seed))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape).astype(
      np.asarray(x).dtype), nnx.state(model, nnx.Param))


def _image_evaluator(batch_size, num_batches, devices):
  exp = build.experiment(tiny_config(**{'eval.batch_size': batch_size,
                                        'eval.num_batches': num_batches, 'eval.num_t': 2}))
  tr = train_lib.Trainer(exp, devices=devices)
  return exp, tr, tr.evaluator()


@pytest.fixture(scope='module')
def image_evaluations():
  """The same 16 validation images evaluated as 4 batches of 4 on a 4-device mesh and as 2 batches
  of 8 on the 8-device mesh, with the same (perturbed) parameters."""
  out = {}
  for batch, devices in ((4, jax.devices()[:4]), (8, jax.devices())):
    exp, tr, ev = _image_evaluator(batch, 16 // batch, devices)
    params = jax.device_put(_perturbed_params(exp), tr.shardings.params)
    out[batch] = dict(exp=exp, tr=tr, ev=ev, params=params, sums=ev.sums(params))
  return out


def test_image_evaluation_is_keyed_by_image_index(image_evaluations):
  """One evaluator for images: J stratified times per image keyed by the image's global index, so
  the per-image sums, and so the result, do not depend on the batch size or the mesh."""
  a, b = image_evaluations[4]['sums'], image_evaluations[8]['sums']
  assert (a.batches, b.batches) == (4, 2)
  assert set(a.per_example) == {'nelbo_B', 'paper_B', 'paper_nll_B', 'tokens_B'}
  for k in a.per_example:
    assert a.per_example[k].shape == (16,)
    np.testing.assert_allclose(a.per_example[k], b.per_example[k], rtol=1e-6, err_msg=k)
  np.testing.assert_array_equal(a.per_example['tokens_B'], 784.0)
  nelbo = a.per_example['nelbo_B']
  assert np.isfinite(nelbo).all() and np.unique(nelbo).size == 16  # no two images share a draw
  ev = image_evaluations[4]
  res = ev['ev'].run(ev['params'])
  assert res['examples'] == 16 and res['tokens'] == 16 * 784 and res['num_t'] == 2
  assert res['nll'] == pytest.approx(nelbo.sum() / (16 * 784), rel=1e-9)
  assert res['nll_se'] == pytest.approx(evaluate.ratio_se(nelbo, a.per_example['tokens_B']))
  assert res['bpd'] == pytest.approx(res['nll'] / math.log(2.0))
  assert res['bpd_se'] == pytest.approx(res['nll_se'] / math.log(2.0))
  assert res['paper_bpd'] == pytest.approx(res['paper_nll'] / math.log(2.0))
  res8 = image_evaluations[8]['ev'].run(image_evaluations[8]['params'])
  for k in ('nll', 'nll_se', 'bpd', 'paper_objective', 'paper_nll', 'paper_bpd'):
    assert res8[k] == pytest.approx(res[k], rel=1e-6), k


def test_image_padding_contributes_nothing(image_evaluations):
  """A hand-made batch of 8: 5 validation images (their global indices 0..4) and 3 masked-out
  padding rows with garbage pixels. The padding rows sum to 0 and the real ones get exactly the
  per-image sums of the full evaluation (the randomness follows the index, not the row)."""
  e = image_evaluations[8]
  full = e['sums'].per_example
  imgs, _ = images.load_fashion_mnist('validation')
  tokens = np.zeros((8, 28, 28, 1), np.int32)
  tokens[:5] = imgs[:5]
  tokens[5:] = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1))
  order = np.array([3, 0, 4, 1, 2])  # shuffled rows: the sums follow the index
  tokens[:5] = tokens[order]
  batch = {'tokens': tokens, 'mask': np.arange(8) < 5,
           'index': np.concatenate([order, [-1, -2, -3]]).astype(np.int32)}
  m = jax.device_get(e['ev'].step(e['params'], sharding_lib.global_batch(batch, e['tr'].mesh)))
  for k in ('nelbo_B', 'paper_B', 'paper_nll_B', 'tokens_B'):
    np.testing.assert_array_equal(np.asarray(m[k])[5:], 0.0)
    np.testing.assert_allclose(np.asarray(m[k])[:5], full[k][order], rtol=1e-6, err_msg=k)
