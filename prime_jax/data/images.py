"""Image data: pixels are tokens (C = 256), the token grid is S = (H, W, channels).

Sources:
  fashion_mnist  the offline Debian asset (docs/assets.md): train 60k, test 10k (used as validation)
  cifar10        TFDS 'cifar10' through `tfds.data_source` (ArrayRecord): train 50k, test 10k
  imagenet32     TFDS 'imagenet_resized/32x32' through `tfds.data_source`: train 1.28M, val. 50k

The pipeline mirrors the text one (prime_jax/data/pipeline.py): per-host stride sharding first, a
per-epoch reshuffle, batching on the MapDataset (so batches do not depend on the worker count), a
checkpointable grain iterator, and padded evaluation batches with a 'mask'. Batches are
{'tokens': int32 (b, H, W, C), 'label': int32 (b,)} (+ 'mask' bool (b,)), b the PER-HOST batch.
The optional horizontal flip (the reference's only augmentation, method.md §9.2) draws from a
generator
grain seeds with (seed, position in the stream): deterministic, and a new draw every epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from prime_jax.data import assets, pipeline

if TYPE_CHECKING:
  import grain

FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
                         'Sneaker', 'Bag', 'Ankle boot')
_FILES = {'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
          'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}
NUM_CLASSES = 256  # 8-bit pixel values: every colour channel of a pixel is one token


@dataclasses.dataclass(frozen=True)
class ImageSource:
  """What a source is: its token grid, where it lives, and how our split names map onto its own."""
  shape: tuple[int, int, int]  # (H, W, channels)
  tfds_name: Optional[str]  # None: the offline asset
  splits: dict[str, str]  # our split name -> the source's split name


SOURCES = {
    'fashion_mnist': ImageSource((28, 28, 1), None,
                                 {'train': 'train', 'validation': 'test', 'test': 'test'}),
    'cifar10': ImageSource((32, 32, 3), 'cifar10',
                           {'train': 'train', 'validation': 'test', 'test': 'test'}),
    'imagenet32': ImageSource((32, 32, 3), 'imagenet_resized/32x32',
                              {'train': 'train', 'validation': 'validation', 'test': 'validation'}),
}


def is_image_source(source: str) -> bool:
  return source in SOURCES


def _spec(source: str) -> ImageSource:
  if source not in SOURCES:
    raise ValueError(f'Unknown image source {source!r}; choose one of {sorted(SOURCES)}.')
  return SOURCES[source]


def image_shape(source: str) -> tuple[int, int, int]:
  """The token grid (H, W, channels) of an image source."""
  return _spec(source).shape


def canonical_split(source: str, split: str) -> str:
  spec = _spec(source)
  if split not in spec.splits:
    raise ValueError(f'{source} has no split {split!r}; use one of {sorted(spec.splits)} '
                     f'(validation is {source}\'s {spec.splits["validation"]!r} split).')
  return spec.splits[split]


# ----------------------------------------------------------------------------- Fashion-MNIST


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
  with gzip.open(path, 'rb') as f:
    raw = f.read()
  got = int.from_bytes(raw[:4], 'big')
  if got != magic:
    raise ValueError(f'{path} is not an IDX file of the expected kind (magic {got:#x}, want '
                     f'{magic:#x}); refetch it with `python -m prime_jax.data.assets fetch '
                     'fashion_mnist --force`.')
  dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim)]
  data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(dims)):
    raise ValueError(f'{path} is truncated: {data.size} bytes for shape {dims}.')
  return data.reshape(dims)


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Fashion-MNIST as (images uint8 (N, 28, 28, 1), labels int64 (N,)).

  split: 'train' (60k) or 'test' (10k).

  'validation' is accepted as the test split (Fashion-MNIST has no separate validation set).
  """
  split = {'validation': 'test', 't10k': 'test'}.get(split, split)
  if split not in _FILES:
    raise ValueError(f'Fashion-MNIST split {split!r} does not exist; use "train" or "test".')
  folder = assets.path('fashion_mnist')
  img_name, lbl_name = _FILES[split]
  images = _read_idx(folder / img_name, 0x0803, 3)[..., None]
  labels = _read_idx(folder / lbl_name, 0x0801, 1).astype(np.int64)
  if len(images) != len(labels):
    raise ValueError(f'Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels.')
  return images, labels


@functools.lru_cache(maxsize=2)
def _fashion_mnist_readonly(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Decoded once per process (the gzip read is the slow part); read-only, so sharing is safe."""
  images, labels = load_fashion_mnist(split)
  images, labels = np.ascontiguousarray(images), np.ascontiguousarray(labels)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


# ----------------------------------------------------------------------- random-access sources


class ArrayImages:
  """Random access over in-memory (N, H, W, C) uint8 images and (N,) labels."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
      raise ValueError(f'Expected uint8 images (N, H, W, C) and N labels, got {images.dtype} '
                       f'{images.shape} and {len(labels)} labels.')
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {'image': self.images[i], 'label': self.labels[i]}


class TfdsImages:
  """A `tfds.data_source` split as {'image': uint8 (H, W, C), 'label'} records.

  Wrapping hides the TFDS source's batched `__getitems__` from grain (mock sources do not support
  it) and checks every image's shape, so a wrongly prepared folder fails on the first batch.
  """

  def __init__(self, ds: Any, shape: tuple[int, int, int], name: str):
    self.ds, self.shape, self.name = ds, tuple(shape), name

  def __len__(self) -> int:
    return len(self.ds)

  def __getitem__(self, i: int) -> dict[str, Any]:
    ex = self.ds[int(i)]
    image = np.asarray(ex['image'])
    if image.shape != self.shape or image.dtype != np.uint8:
      raise ValueError(f'{self.name} record {i} is {image.dtype} {image.shape}, expected uint8 '
                       f'{self.shape}: the data_dir holds a different dataset or version.')
    return {'image': image, 'label': ex.get('label', -1)}


def _tfds_source(source: str, split: str, data_dir: Optional[str]) -> TfdsImages:
  spec = _spec(source)
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  try:
    ds = tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False)
    n = len(ds)
  except Exception as e:  # TFDS raises several unrelated types for "not prepared here"
    where = data_dir or '~/tensorflow_datasets (the TFDS default)'
    raise FileNotFoundError(
        f'{spec.tfds_name} ({split}) is not prepared as ArrayRecord under {where}: '
        f'{type(e).__name__}: {e}. Prepare it once on a machine with internet and TensorFlow: '
        f'`tfds build {spec.tfds_name} --data_dir DIR --file_format=array_record`, then set '
        f'data.data_dir=DIR.') from e
  if n == 0:
    raise ValueError(f'{spec.tfds_name} {split} under {data_dir} is empty; prepare it again.')
  return TfdsImages(ds, spec.shape, spec.tfds_name)


def image_source(source: str, split: str, *, data_dir: Optional[str] = None) -> Any:
  """A random-access source (len, [i] -> {'image': uint8 (H, W, C), 'label'}) of one split."""
  split = canonical_split(source, split)
  if source == 'fashion_mnist':
    return ArrayImages(*_fashion_mnist_readonly(split))
  return _tfds_source(source, split, data_dir)


def num_images(source: str, split: str, data_dir: Optional[str] = None) -> int:
  return len(image_source(source, split, data_dir=data_dir))


# ----------------------------------------------------------------------------- grain pipeline


class _ToTokens:
  """{'image': uint8 (H, W, C), 'label'} -> {'tokens': int32 (H, W, C), 'label': int32}."""

  def __init__(self, shape: tuple[int, int, int], with_mask: bool):
    self.shape, self.with_mask = tuple(shape), with_mask

  def __call__(self, record: Any) -> dict[str, np.ndarray]:
    index = None
    if self.with_mask:  # evaluation records arrive as (global index, record)
      index, record = record
    image = np.asarray(record['image'])
    if image.shape != self.shape:
      raise ValueError(f'An image has shape {image.shape}, expected {self.shape} (H, W, channels).')
    if image.dtype != np.uint8:  # pixel values are the tokens: never rescaled, never clamped
      raise ValueError(f'Images must be uint8 (8-bit pixel values), got {image.dtype}.')
    out = {'tokens': image.astype(np.int32), 'label': np.int32(record['label'])}
    if self.with_mask:
      out['mask'] = np.bool_(True)
      out['index'] = np.int32(index)  # evaluation randomness is keyed on it, not on the layout
    return out


def _random_flip(example: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Left-right flip with probability 1/2 (the W axis of (H, W, C))."""
  if rng.random() < 0.5:
    example = dict(example, tokens=np.ascontiguousarray(example['tokens'][:, ::-1]))
  return example


class _Padding:
  """A masked-out black image that fills the final evaluation batches."""

  def __init__(self, shape: tuple[int, int, int]):
    self.shape = tuple(shape)

  def __call__(self, k: Any) -> dict[str, np.ndarray]:
    return {'tokens': np.zeros(self.shape, np.int32), 'label': np.int32(-1),
            'mask': np.bool_(False), 'index': np.int32(-1 - int(k))}


def make_image_pipeline(source: str, split: str, *, batch_size: int, seed: int, train: bool,
                        shard_index: Optional[int] = None, shard_count: Optional[int] = None,
                        worker_count: int = 0, data_dir: Optional[str] = None,
                        pad_final_batch: bool = False, random_flip: bool = False,
                        read_threads: int = 4) -> grain.DatasetIterator:
  """The training/evaluation input of an image source ('fashion_mnist', 'cifar10', 'imagenet32').

  Training repeats forever (reshuffled every epoch) and drops the last partial batch; evaluation is
  one pass in order. `random_flip` applies to training only. Returns a grain DatasetIterator
  (`next`, `get_state`, `set_state`).
  """
  grain = pipeline._grain()  # pylint: disable=protected-access
  pipeline.check_args(batch_size, seed, worker_count)
  # pylint: disable-next=protected-access
  shard_index, shard_count = pipeline._host_shard(shard_index, shard_count)
  shape = image_shape(source)
  records = image_source(source, split, data_dir=data_dir)
  num_records = len(records)

  with_mask = pad_final_batch and not train
  ds = grain.MapDataset.source(records)
  if with_mask:
    ds = ds.map_with_index(lambda i, record: (i, record))
  if train:
    ds = ds.shuffle(seed=int(seed)).repeat(None)  # one global order, reshuffled every epoch
    ds = ds.map(_ToTokens(shape, with_mask))
    if random_flip:  # keyed by the global position, so the same for any host count
      ds = ds.random_map(_random_flip, seed=int(seed))
    ds = pipeline.host_rows(ds, batch_size, shard_index, shard_count)
  else:
    ds = ds[shard_index::shard_count].map(_ToTokens(shape, with_mask))
  if with_mask:
    per_host = math.ceil(num_records / shard_count)
    target = math.ceil(per_host / batch_size) * batch_size
    if target > len(ds):
      pad = grain.MapDataset.range(target - len(ds)).map(_Padding(shape))
      ds = grain.MapDataset.concatenate([ds, pad]) if len(ds) else pad
  ds = ds.batch(batch_size, drop_remainder=train)
  it_ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads))
  if worker_count > 0:
    pipeline._ensure_flags_parsed()  # pylint: disable=protected-access
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(it_ds)
