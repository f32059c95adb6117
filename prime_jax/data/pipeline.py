"""Grain input pipelines over fixed-length token sequences, with Orbax-checkpointable iterators.

Built on grain's MapDataset API (grain 0.2.18):

    train: source -> shuffle(seed) -> repeat() -> this host's rows of each global batch
    eval:  source -> [shard_index::shard_count]
           -> to int32 -> batch -> to_iter_dataset(ReadOptions) [-> mp_prefetch(worker_count)]

Training shuffles the whole source (again every epoch: grain folds the epoch into the seed) and
each host reads its rows of every global batch (`host_rows`), so 1 process x 8 devices and 2 x 4
train on the same batches in the same order. Evaluation gives every host a fixed stride of the
records; each example carries its global index, which keys its randomness. Batching
happens on the MapDataset, so the contents of a batch do not depend on the number of worker
processes. Batches are dicts {'tokens': int32 (b, L)} with b the PER-HOST batch size; the global
array is assembled by the trainer (`jax.make_array_from_process_local_data`).

Training repeats forever and drops the last partial batch; evaluation makes exactly one pass and
keeps it (or, with `pad_final_batch=True`, pads so that every host yields the same number of full
batches and adds a 'mask' (b,) bool marking real rows: what multi-host jitted evaluation needs).

The iterator state is a small JSON dict; save it with Orbax through `iterator_save_args(it)` /
`iterator_restore_args(it)` (grain.checkpoint.CheckpointSave / CheckpointRestore, one file per
process) inside `ocp.args.Composite`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from prime_jax.data import text
from prime_jax.data.text import unigram_counts, unigram_log_probs  # noqa: F401  (module API)
from prime_jax.data.tokenizer import EOS_ID, VOCAB_SIZE, check_ids

if TYPE_CHECKING:  # grain (and orbax, through grain.checkpoint) load lazily
  import grain


def _grain():
  import grain  # pylint: disable=import-outside-toplevel
  return grain


class _ToTokens:
  """uint16 row (array, or raw bytes from ArrayRecord) -> {'tokens': int32 (L,)}, checked."""

  def __init__(self, seq_len: int, vocab_size: int, with_mask: bool):
    self.seq_len, self.vocab_size, self.with_mask = seq_len, vocab_size, with_mask

  def __call__(self, record: Any) -> dict[str, np.ndarray]:
    index = None
    if self.with_mask:  # evaluation records arrive as (global index, record)
      index, record = record
    if isinstance(record, (bytes, bytearray, memoryview)):
      row = np.frombuffer(record, np.uint16)
    else:
      row = np.asarray(record)
    if row.shape != (self.seq_len,):
      raise ValueError(f'A stored sequence has shape {row.shape}, expected ({self.seq_len},): the '
                       f'data was prepared for another seq_len; prepare it again for this one.')
    check_ids(row, self.vocab_size, where='stored sequences')
    out = {'tokens': row.astype(np.int32)}
    if self.with_mask:
      out['mask'] = np.bool_(True)
      out['index'] = np.int32(index)  # evaluation randomness is keyed on it, not on the layout
    return out


class _Padding:
  """A masked-out all-EOS row that fills the final evaluation batches."""

  def __init__(self, seq_len: int, fill: int):
    self.seq_len, self.fill = seq_len, fill

  def __call__(self, k: Any) -> dict[str, np.ndarray]:
    return {'tokens': np.full((self.seq_len,), self.fill, np.int32), 'mask': np.bool_(False),
            'index': np.int32(-1 - int(k))}


def _ensure_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside `absl.app.run` (scripts, pytest) nobody has
  parsed them, so accept the defaults rather than crash in the worker."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _host_shard(shard_index: Optional[int], shard_count: Optional[int]) -> tuple[int, int]:
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index={shard_index} must be in [0, shard_count={shard_count}); '
                     'pass the host index and host count (jax.process_index/process_count).')
  return shard_index, shard_count


def check_args(batch_size: int, seed: Any, worker_count: int) -> None:
  """The argument checks every grain pipeline here makes (text and images)."""
  if batch_size <= 0:
    raise ValueError(f'batch_size={batch_size} must be positive (it is the PER-HOST batch).')
  if not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**32:
    raise ValueError(f'seed={seed!r} must be an int in [0, 2**32): grain shuffle seeds are 32-bit.')
  if worker_count < 0:
    raise ValueError(f'worker_count={worker_count} must be >= 0 (0 reads in this process).')


def host_rows(ds, batch_size: int, shard_index: int, shard_count: int):
  """The rows [i b, (i + 1) b) of every global batch of b * shard_count consecutive records of
  `ds`, for host i (b = the per-host batch): with the global batch laid out over the hosts'
  devices in process order, every host count trains on the same global batches in the same order.
  Random access, so the iterator state stays one index."""
  if shard_count == 1:
    return ds
  grain = _grain()
  glob = batch_size * shard_count

  class _HostRows(grain.MapDataset):

    def __init__(self, parent):
      super().__init__(parent)

    def __len__(self) -> int:
      return len(self._parent) // glob * batch_size

    def __getitem__(self, index):
      if isinstance(index, slice):
        return self.slice(index)
      step, row = divmod(int(index), batch_size)
      return self._parent[step * glob + shard_index * batch_size + row]

    def __str__(self) -> str:
      return f'HostRows(host={shard_index}/{shard_count}, batch={batch_size})'

  return _HostRows(ds)


def make_pipeline(sequences: Sequence[Any], *, seq_len: int, batch_size: int, seed: int,
                  train: bool, shard_index: Optional[int] = None,
                  shard_count: Optional[int] = None, worker_count: int = 0,
                  pad_final_batch: bool = False, vocab_size: int = VOCAB_SIZE,
                  read_threads: int = 4) -> grain.DatasetIterator:
  """Batched iterator over any random-access source of uint16 (L,) sequences (array, bytes).

  Returns a grain DatasetIterator: `next(it)`, `it.get_state()`, `it.set_state(state)`.
  """
  grain = _grain()
  check_args(batch_size, seed, worker_count)
  shard_index, shard_count = _host_shard(shard_index, shard_count)
  num_records = len(sequences)
  if num_records == 0:
    raise ValueError('The source holds no sequences; use a larger corpus or a shorter seq_len.')

  with_mask = pad_final_batch and not train
  ds = grain.MapDataset.source(sequences)
  if with_mask:
    ds = ds.map_with_index(lambda i, record: (i, record))
  if train:
    # One global order, whatever the host count: each host reads its rows of every global batch.
    ds = host_rows(ds.shuffle(seed=int(seed)).repeat(None), batch_size, shard_index, shard_count)
  else:
    ds = ds[shard_index::shard_count]
  ds = ds.map(_ToTokens(seq_len, vocab_size, with_mask))
  if with_mask:
    per_host = math.ceil(num_records / shard_count)
    target = math.ceil(per_host / batch_size) * batch_size
    if target > len(ds):
      pad = grain.MapDataset.range(target - len(ds)).map(_Padding(seq_len, EOS_ID))
      ds = grain.MapDataset.concatenate([ds, pad]) if len(ds) else pad
  ds = ds.batch(batch_size, drop_remainder=train)
  it_ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads))
  if worker_count > 0:
    _ensure_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(it_ds)


def make_text_pipeline(source: str, split: str, *, seq_len: int, batch_size: int, seed: int,
                       train: bool, shard_index: Optional[int] = None,
                       shard_count: Optional[int] = None, worker_count: int = 0,
                       data_dir: Optional[str] = None,
                       pad_final_batch: bool = False) -> grain.DatasetIterator:
  """The training/evaluation input of a text source (`text.SOURCES`: 'sotu', 'moby_dick', 'owt',
  'lm1b' and the zero-shot sets of `zeroshot.ZERO_SHOT`, e.g. 'wikitext2', 'lambada').

  owt, lm1b and the zero-shot files need `data_dir` (prepared shards / TFDS folder / local files);
  a missing corpus raises an error that says how to prepare or fetch it.
  """
  sequences = text.sequence_source(source, split, seq_len, data_dir=data_dir)
  return make_pipeline(sequences, seq_len=seq_len, batch_size=batch_size, seed=seed, train=train,
                       shard_index=shard_index, shard_count=shard_count,
                       worker_count=worker_count, pad_final_batch=pad_final_batch)


def num_sequences(source: str, split: str, seq_len: int, data_dir: Optional[str] = None) -> int:
  """Number of wrapped sequences in a split (all hosts together)."""
  return len(text.sequence_source(source, split, seq_len, data_dir=data_dir))


def iterator_save_args(it: grain.DatasetIterator) -> grain.checkpoint.CheckpointSave:
  """Orbax args that save a grain iterator's state (use inside `ocp.args.Composite`)."""
  import grain.checkpoint  # pylint: disable=import-outside-toplevel
  return grain.checkpoint.CheckpointSave(it)


def iterator_restore_args(it: grain.DatasetIterator) -> grain.checkpoint.CheckpointRestore:
  """Orbax args that restore saved state INTO `it` (built with the same arguments)."""
  import grain.checkpoint  # pylint: disable=import-outside-toplevel
  return grain.checkpoint.CheckpointRestore(it)
