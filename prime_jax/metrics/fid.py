"""Fréchet Inception Distance with the standard TF Inception-v3 (2015-12-05) pool3 features, in JAX.

    feats = features(images_uint8)                # (N, 2048) float32, images (N, H, W, 1|3) uint8
    mu, sigma = statistics(feats)                 # float64 mean and covariance
    ref_mu, ref_sigma = reference_statistics('fashion_mnist', 'test', images_fn)   # cached .npz
    score = fid(generated_images, ref_mu, ref_sigma)   # = fid_from_features(features(...), ...)

The network, its weights and its preprocessing (TF1 bilinear resize to 299x299, (x - 128) / 128) are
in `prime_jax.metrics.inception`; see there for the exact conventions. FID is
||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), always in float64: `frechet_distance` uses scipy's
sqrtm (the standard way; method='eigh' is a faster exact alternative), while `fid` /
`fid_from_features` use an exact N x N form when the sample is smaller than 2048 (see there).

Inception Score is NOT available from this network: the TorchScript file carries only the pool3
feature extractor (no 1008-way logits/softmax head), and IS needs class probabilities.

FID is biased upwards at small N (it is only comparable between runs with the same N and the same
reference statistics); the usual protocol is 50k generated images against the training set.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np
import scipy.linalg

from prime_jax.metrics import inception as inception_lib

_AUTO_PROGRESS_MIN = 1000  # show a progress bar from this many images on (progress=None)


def _default_batch_size() -> int:
  return 32 if jax.default_backend() == 'cpu' else 256


def features(images: np.ndarray, *, batch_size: Optional[int] = None,
             progress: Optional[bool] = None,
             net: Optional[inception_lib.InceptionV3] = None) -> np.ndarray:
  """pool3 features (N, 2048) float32 of uint8 images (N, H, W, 1 or 3) in [0, 255].

  The jitted network sees fixed-size batches of min(batch_size, N) images (the last one is
  zero-padded and the padding dropped), so one compilation serves a whole run. batch_size defaults
  to 32 on CPU and 256 on accelerators. A tqdm bar shows from 1000 images on unless `progress`
  says otherwise.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
    raise ValueError(f'expected uint8 images (N, H, W, 1 or 3), got {images.dtype} {images.shape}')
  n = len(images)
  if n == 0:
    return np.zeros((0, inception_lib.FEATURE_DIM), np.float32)
  if batch_size is not None and batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  net = net or inception_lib.get_inception()
  bs = min(int(batch_size or _default_batch_size()), n)
  show = n >= _AUTO_PROGRESS_MIN if progress is None else progress
  out = np.empty((n, inception_lib.FEATURE_DIM), np.float32)

  from tqdm.auto import tqdm
  with tqdm(total=n, unit='img', desc='FID features', disable=not show, leave=False) as bar:
    pending = None  # keep one batch in flight while the previous result is copied out
    for start in range(0, n, bs):
      chunk = images[start:start + bs]
      count = len(chunk)
      if count < bs:
        chunk = np.concatenate([chunk, np.zeros((bs - count,) + chunk.shape[1:], np.uint8)])
      result = net(chunk)
      if pending is not None:
        _drain(out, *pending, bar)
      pending = (start, count, result)
    _drain(out, *pending, bar)
  return out


def _drain(out: np.ndarray, start: int, count: int, result: jax.Array, bar) -> None:
  out[start:start + count] = np.asarray(result)[:count]
  bar.update(count)


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma): float64 mean (D,) and unbiased covariance (D, D) of features (N, D), N >= 2."""
  feats = np.asarray(feats, np.float64)
  if feats.ndim != 2 or len(feats) < 2:
    raise ValueError(f'statistics need features (N >= 2, D), got shape {feats.shape}')
  return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     *, eps: float = 1e-6, method: str = 'sqrtm') -> float:
  """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)) in float64.

  method='sqrtm' (default) is the standard computation (TTUR / pytorch-fid): scipy.linalg.sqrtm of
  the product; if that is not finite (too singular a product), eps * I is added to both
  covariances and it is retried; a negligible imaginary part (round-off) is dropped, a large one
  (diagonal imaginary part above 1e-3) raises ValueError.

  method='eigh' gives the same number for symmetric PSD covariances, several times faster (one
  symmetric eigendecomposition of sigma1 instead of a Schur form) and exact for singular
  covariances (N < D): with sigma1 = V diag(w) V^T and B = V diag(w)^(1/2), S1 S2 has the same
  non-zero eigenvalues as B^T S2 B, so tr sqrtm(S1 S2) = sum sqrt(eig(B^T S2 B)); eigenvalues of
  sigma1 below the matrix_rank cutoff (w.max() * D * machine eps) are treated as 0.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f'shape mismatch: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} '
                     f'{sigma2.shape}')
  diff = mu1 - mu2
  if method == 'sqrtm':
    trace_covmean = _trace_sqrtm_product(sigma1, sigma2, eps)
  elif method == 'eigh':
    trace_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
  else:
    raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)


def _trace_sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
  with warnings.catch_warnings():  # singular products are expected (N < D); handled below
    warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
      offset = np.eye(len(sigma1)) * eps
      covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if not np.isfinite(covmean).all():
    raise ValueError('sqrtm(sigma1 sigma2) is not finite even with an eps * I offset')
  if np.iscomplexobj(covmean):
    imag = np.abs(np.diagonal(covmean).imag).max()
    if imag > 1e-3:
      raise ValueError(f'sqrtm(sigma1 sigma2) has an imaginary component of {imag:.3g}: the '
                       'covariances are not valid (or far too singular)')
    covmean = covmean.real
  return float(np.trace(covmean))


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  for s in (sigma1, sigma2):
    if not np.allclose(s, s.T, rtol=1e-10, atol=1e-12 * max(1.0, np.abs(s).max())):
      raise ValueError("method='eigh' needs symmetric covariance matrices")
  w, v = np.linalg.eigh(sigma1)
  # Keep the numerically non-zero part of sigma1 = V diag(w) V^T (the matrix_rank cutoff): then
  # tr sqrtm(S1 S2) = tr sqrt(K), K = diag(w)^(1/2) V^T S2 V diag(w)^(1/2), r x r. For N < D
  # (rank N - 1) this is small and carries no round-off from the null space.
  keep = w > max(w.max(), 0.0) * len(w) * np.finfo(np.float64).eps
  if not keep.any():
    return 0.0
  b = v[:, keep] * np.sqrt(w[keep])
  k = b.T @ sigma2 @ b
  ev = np.linalg.eigvalsh(0.5 * (k + k.T))
  return float(np.sqrt(np.clip(ev, 0.0, None)).sum())


def fid_from_features(feats: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, *,
                      method: str = 'sqrtm') -> float:
  """FID between features (N, D) and reference statistics.

  When N <= D the covariance of `feats` is S1 = X^T X with X the centred features / sqrt(N - 1)
  (rank <= N - 1), and S1 S2 has the same non-zero eigenvalues as the N x N matrix X S2 X^T, so
  tr sqrtm(S1 S2) = sum sqrt(eig(X S2 X^T)) exactly. That costs O(N D^2) instead of an O(D^3)
  sqrtm and has no null-space round-off (a set against its own statistics gives ~1e-13). For
  N > D it is `frechet_distance(*statistics(feats), ref_mu, ref_sigma, method=method)`.
  """
  feats = np.asarray(feats, np.float64)
  n = len(feats)
  if feats.ndim != 2 or n < 2:
    raise ValueError(f'need features (N >= 2, D), got shape {feats.shape}')
  if n > feats.shape[1]:
    return frechet_distance(*statistics(feats), ref_mu, ref_sigma, method=method)
  ref_mu, ref_sigma = np.asarray(ref_mu, np.float64), np.asarray(ref_sigma, np.float64)
  d = feats.shape[1]
  if ref_mu.shape != (d,) or ref_sigma.shape != (d, d):
    raise ValueError(f'reference statistics {ref_mu.shape} {ref_sigma.shape} do not match D={d}')
  mu = feats.mean(axis=0)
  x = (feats - mu) / np.sqrt(n - 1.0)
  k = x @ ref_sigma @ x.T
  ev = np.linalg.eigvalsh(0.5 * (k + k.T))
  trace_covmean = np.sqrt(np.clip(ev, 0.0, None)).sum()
  diff = mu - ref_mu
  return float(diff @ diff + np.sum(x * x) + np.trace(ref_sigma) - 2.0 * trace_covmean)


def fid(images: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, **features_kw) -> float:
  """FID of uint8 images (N, H, W, 1|3) against reference statistics; kwargs go to `features`."""
  return fid_from_features(features(images, **features_kw), ref_mu, ref_sigma)


# ----------------------------------------------------------------------------- reference statistics


def _stats_dir() -> Path:
  from prime_jax.data import assets
  return assets.cache_dir() / 'fid_stats'  # inside the git-ignored asset cache


def _slug(s: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', str(s)).strip('.') or '_'


def reference_statistics(dataset: str, split: str, images_fn: Callable[[], np.ndarray], *,
                         max_images: Optional[int] = None,
                         **features_kw) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of a data set's features, cached as .npz under `<asset cache>/fid_stats/`.

  `images_fn()` returns the uint8 images (N, H, W, 1|3); it is only called on a cache miss, and
  its first `max_images` images are used. The cache key is (dataset, split, max_images or 'all',
  digest of the Inception asset, preprocessing version): a different weight file or convention
  never reuses old statistics. Files are written atomically.
  """
  from prime_jax.data import assets
  digest = assets.stamp_digest('inception')
  count = 'all' if max_images is None else str(int(max_images))
  key = f'{_slug(dataset)}-{_slug(split)}-n{count}-{digest}-{inception_lib.FEATURE_VERSION}'
  folder = _stats_dir()
  path = folder / f'{key}.npz'
  if path.is_file():
    try:
      with np.load(path, allow_pickle=False) as z:
        if str(z['key']) == key:
          return z['mu'], z['sigma']
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
      pass  # unreadable or foreign file: recompute and overwrite
  images = np.asarray(images_fn())
  if max_images is not None:
    if len(images) < max_images:
      raise ValueError(f'{dataset}/{split} has {len(images)} images, fewer than '
                       f'max_images={max_images}')
    images = images[:max_images]
  mu, sigma = statistics(features(images, **features_kw))
  folder.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{key}-', suffix='.npz', dir=folder)
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, mu=mu, sigma=sigma, key=np.array(key), count=np.array(len(images)))
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  return mu, sigma
