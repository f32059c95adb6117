"""Image data: the Fashion-MNIST asset, TFDS sources through mock_data, the image pipeline, and the
image configs."""

import math

import numpy as np
import pytest

from configs import cifar10, fashion_mnist, imagenet32
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


def test_training_hosts_read_their_rows_of_one_global_order():
  # Host i's batch of a step is rows [i b, (i + 1) b) of the 1-host global batch, flips included.
  single = _take(_pipe(batch_size=32, random_flip=True), 2)
  hosts = [_take(_pipe(batch_size=16, shard_index=s, shard_count=2, random_flip=True), 2)
           for s in range(2)]
  for step in range(2):
    np.testing.assert_array_equal(
        single[step]['tokens'], np.concatenate([h[step]['tokens'] for h in hosts]))


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
