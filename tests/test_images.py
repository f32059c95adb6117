"""Image data (Fashion-MNIST asset, TFDS sources through mock_data), the image pipeline, and a few
real training steps of the UNet on Fashion-MNIST through the Trainer."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from configs import cifar10, fashion_mnist, imagenet32
from prime_jax import build, evaluate, report
from prime_jax import sharding as sharding_lib
from prime_jax import train as train_lib
from prime_jax.data import images
from prime_jax.models import unet

LN256 = math.log(256.0)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _pipe(split='train', **kw):
  args = dict(batch_size=16, seed=0, train=split == 'train', shard_index=0, shard_count=1)
  args.update(kw)
  return images.make_image_pipeline('fashion_mnist', split, **args)


@pytest.fixture(scope='module')
def train_index():
  """image bytes -> index in the Fashion-MNIST train split (its 60k images are distinct enough)."""
  imgs, _ = images.load_fashion_mnist('train')
  return {im.tobytes(): i for i, im in enumerate(imgs)}


# ----------------------------------------------------------------------------- sources


def test_fashion_mnist_loader():
  x, y = images.load_fashion_mnist('train')
  assert x.shape == (60000, 28, 28, 1) and x.dtype == np.uint8 and y.shape == (60000,)
  np.testing.assert_array_equal(np.bincount(y), [6000] * 10)  # a balanced data set
  assert x.min() == 0 and x.max() == 255
  xt, yt = images.load_fashion_mnist('validation')  # the test split stands in for validation
  assert xt.shape == (10000, 28, 28, 1) and np.bincount(yt).tolist() == [1000] * 10
  with pytest.raises(ValueError, match='does not exist'):
    images.load_fashion_mnist('dev')
  assert images.image_shape('cifar10') == (32, 32, 3)
  with pytest.raises(ValueError, match='choose one of'):
    images.image_shape('mnist')
  with pytest.raises(ValueError, match='no split'):
    images.image_source('imagenet32', 'dev')


# ----------------------------------------------------------------------------- pipeline


def test_train_batches_are_real_images_with_their_labels(train_index):
  imgs, labels = images.load_fashion_mnist('train')
  batches = _take(_pipe(), 4)
  seen = []
  for b in batches:
    assert b['tokens'].shape == (16, 28, 28, 1) and b['tokens'].dtype == np.int32
    assert b['label'].shape == (16,) and b['label'].dtype == np.int32
    assert 'mask' not in b and 'index' not in b  # training batches: no padding, no index
    for row, lab in zip(b['tokens'], b['label']):
      i = train_index[row.astype(np.uint8).tobytes()]
      assert labels[i] == lab
      seen.append(i)
  assert len(set(seen)) == 64  # one epoch: no repeats
  assert seen != list(range(64))  # and shuffled


def test_determinism_and_checkpointable_state():
  a, b = _take(_pipe(seed=3), 3), _take(_pipe(seed=3), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['tokens'], y['tokens'])
  c = next(_pipe(seed=4))
  assert not np.array_equal(a[0]['tokens'], c['tokens'])
  it = _pipe(seed=3, random_flip=True)
  _take(it, 2)
  state = it.get_state()
  want = next(it)
  resumed = _pipe(seed=3, random_flip=True)
  resumed.set_state(state)
  got = next(resumed)
  np.testing.assert_array_equal(got['tokens'], want['tokens'])


def test_train_shards_are_disjoint_strides(train_index):
  for shard in range(2):
    for b in _take(_pipe(shard_index=shard, shard_count=2), 2):
      idx = [train_index[r.astype(np.uint8).tobytes()] for r in b['tokens']]
      assert all(i % 2 == shard for i in idx)


def test_eval_pass_is_sharded_in_order_and_padded():
  imgs, labels = images.load_fashion_mnist('test')
  counts = []
  for shard in range(3):
    batches = list(_pipe('validation', batch_size=256, shard_index=shard, shard_count=3,
                         pad_final_batch=True))
    counts.append(len(batches))
    toks = np.concatenate([b['tokens'] for b in batches])
    mask = np.concatenate([b['mask'] for b in batches])
    lab = np.concatenate([b['label'] for b in batches])
    index = np.concatenate([b['index'] for b in batches])
    assert all(b['index'].dtype == np.int32 and b['index'].shape == (256,) for b in batches)
    n = len(imgs[shard::3])
    assert mask[:n].all() and not mask[n:].any()
    np.testing.assert_array_equal(toks[:n], imgs[shard::3])
    np.testing.assert_array_equal(lab[:n], labels[shard::3])
    assert (toks[n:] == 0).all() and (lab[n:] == -1).all()
    # Every real image carries its global index in the split (evaluation randomness is keyed on
    # it); padding gets distinct negative indices.
    np.testing.assert_array_equal(index[:n], np.arange(shard, len(imgs), 3))
    assert (index[n:] < 0).all() and len(set(index[n:].tolist())) == len(index) - n > 0
  assert counts == [14, 14, 14]  # ceil(ceil(10000 / 3) / 256): equal on every host
  # Without padding one pass keeps the final partial batch.
  sizes = [len(b['tokens']) for b in _pipe('validation', batch_size=4096)]
  assert sizes == [4096, 4096, 1808]


def test_random_flip_mirrors_about_half_deterministically():
  plain = np.concatenate([b['tokens'] for b in _take(_pipe(seed=5), 8)])
  flip = np.concatenate([b['tokens'] for b in _take(_pipe(seed=5, random_flip=True), 8)])
  again = np.concatenate([b['tokens'] for b in _take(_pipe(seed=5, random_flip=True), 8)])
  np.testing.assert_array_equal(flip, again)
  mirrored = np.array([np.array_equal(f, p[:, ::-1]) for f, p in zip(flip, plain)])
  same = np.array([np.array_equal(f, p) for f, p in zip(flip, plain)])
  assert (mirrored | same).all()
  assert 0.3 < mirrored.mean() < 0.7, mirrored.mean()
  # Evaluation never flips.
  ev = next(_pipe('validation', random_flip=True))
  np.testing.assert_array_equal(ev['tokens'], images.load_fashion_mnist('test')[0][:16])


@pytest.mark.parametrize('source,tfds_name,split,tfds_split', [
    ('cifar10', 'cifar10', 'validation', 'test'),
    ('imagenet32', 'imagenet_resized/32x32', 'train', 'train')])
def test_tfds_sources_through_mock_data(tmp_path, source, tfds_name, split, tfds_split):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=20):
    ds = tfds.data_source(tfds_name, split=tfds_split, data_dir=str(tmp_path), download=False)
    want = np.stack([np.asarray(ds[i]['image']) for i in range(len(ds))])
    assert images.num_images(source, split, data_dir=str(tmp_path)) == 20
    batches = list(images.make_image_pipeline(source, split, batch_size=8, seed=0, train=False,
                                              shard_index=0, shard_count=1,
                                              data_dir=str(tmp_path), pad_final_batch=True))
    train = next(images.make_image_pipeline(source, split, batch_size=8, seed=0, train=True,
                                            shard_index=0, shard_count=1, random_flip=True,
                                            data_dir=str(tmp_path)))
  toks = np.concatenate([b['tokens'] for b in batches])
  mask = np.concatenate([b['mask'] for b in batches])
  index = np.concatenate([b['index'] for b in batches])
  assert toks.shape == (24, 32, 32, 3) and toks.dtype == np.int32 and mask.sum() == 20
  np.testing.assert_array_equal(index[:20], np.arange(20))
  assert (index[20:] < 0).all() and 'index' not in train
  np.testing.assert_array_equal(toks[:20], want)
  assert train['tokens'].shape == (8, 32, 32, 3)
  with pytest.raises(FileNotFoundError, match=f'tfds build {tfds_name}'):
    images.image_source(source, split, data_dir=str(tmp_path / 'absent'))


# ----------------------------------------------------------------------------- configs


def test_paper_configs():
  c = cifar10.get_config()
  assert (c.model.name, c.diffusion.ell, c.diffusion.schedule, c.diffusion.schedule_n) == (
      'unet', 2, 'poly', 3.0)
  assert (c.optim.lr, c.optim.b1, c.optim.b2, c.optim.weight_decay, c.optim.grad_clip,
          c.optim.ema_decay, c.data.batch_size) == (1e-4, 0.9, 0.95, 0.01, 0.0, 0.999, 512)
  assert c.model.dropout == 0.4 and c.data.random_flip and c.diffusion.objective == 'paper'
  assert c.train.num_steps == math.ceil(4250 * 50000 / 512)
  # The paper's best CIFAR-10 row (ell = 2, 512 NFE, FID 3.26).
  s = c.sampler
  assert (s.num_steps, s.temperature, s.corrector, s.timestep) == (
      512, (-0.2, 2.0, 1.0), (16.0, 2.0, 0.75), (1.0, 1.7, 0.0))
  assert s.carry_over and s.use_corrector and s.use_timestep_scheduler
  i = imagenet32.get_config('ell=4')
  assert i.data.source == 'imagenet32' and i.diffusion.ell == 4 and not i.sampler.carry_over
  with pytest.raises(ValueError, match='no paper run'):
    cifar10.get_config('ell=5')
  f = fashion_mnist.get_config('ell=4')
  assert f.diffusion.ell == 4 and f.data.source == 'fashion_mnist' and f.model.name == 'unet'
  for cfg, name in ((f, 'cpu'), (c, 'paper')):  # the configs hold the model presets
    want = unet.preset(name)
    assert want.pop('dropout') == cfg.model.dropout
    assert {k: cfg.model.unet[k] for k in want} == want


def test_model_and_data_must_agree():
  cfg = fashion_mnist.get_config()
  cfg.unlock()
  cfg.data.source = 'sotu'
  with pytest.raises(ValueError, match='does not fit'):
    build.experiment(cfg)


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
  for k, v in overrides.items():
    node = cfg
    *path, leaf = k.split('.')
    for p in path:
      node = node[p]
    node[leaf] = v
  return cfg


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
