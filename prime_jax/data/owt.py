"""OpenWebText (or any local document collection) prepared as ArrayRecord shards of wrapped text.

    python -m prime_jax.data.text prepare --input DIR_OR_FILES --output DATA_DIR [--seq-len 1024]

Inputs: jsonl / jsonl.gz (one JSON object per line, field "text"), parquet (column "text", via
pyarrow), txt (one document per file); folders are searched recursively, files taken in path order.
The last `num_validation_docs` documents are the validation split (MDLM's `train[-100000:]`).
Output: `<split>-NNNNN.array_record` shards (one uint16 sequence of L tokens per record),
`unigram_<split>.npy` token histograms, and `metadata.json`, written last so its presence marks a
complete preparation.
"""

from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from prime_jax.data import assets
from prime_jax.data.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, get_tokenizer
from prime_jax.data.wrapping import DOCS_PER_GROUP, wrap_groups

_FORMAT_VERSION = 1
NUM_VALIDATION_DOCS = 100_000
_META = 'metadata.json'


def _input_files(inputs: Sequence[os.PathLike]) -> list[Path]:
  suffixes = ('.jsonl', '.jsonl.gz', '.parquet', '.txt')  # an explicit .json file is read as jsonl
  files: list[Path] = []
  for item in map(Path, inputs):
    if item.is_dir():
      files.extend(sorted(p for p in item.rglob('*') if p.is_file() and p.name.endswith(suffixes)))
    elif item.is_file():
      files.append(item)
    else:
      raise FileNotFoundError(f'OWT input {item} does not exist; pass files or folders of '
                              f'{", ".join(suffixes)} files.')
  if not files:
    raise FileNotFoundError(f'No {", ".join(suffixes)} files under {list(map(str, inputs))}.')
  return files


def _parquet_file(path: Path):
  try:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError(f'Reading {path} needs pyarrow, which is not installed: `pip install '
                     f'pyarrow`, or convert the data to jsonl with a "text" field.') from e
  return pq.ParquetFile(path)


def _iter_docs(path: Path) -> Iterator[str]:
  """Documents of one input file: jsonl lines (field "text"), parquet rows, or a whole .txt."""
  name = path.name
  if name.endswith('.txt'):
    yield path.read_text(encoding='utf-8')
  elif name.endswith('.parquet'):
    pf = _parquet_file(path)
    if 'text' not in pf.schema_arrow.names:
      raise ValueError(f'{path} has no "text" column (columns: {pf.schema_arrow.names}).')
    for batch in pf.iter_batches(columns=['text'], batch_size=1024):
      yield from (t or '' for t in batch.column(0).to_pylist())
  else:
    opener = gzip.open if name.endswith('.gz') else open
    with opener(path, 'rt', encoding='utf-8') as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get('text'), str):
          raise ValueError(f'{path}:{line_no} is not a JSON object with a string "text" field.')
        yield row['text']


def _count_docs(path: Path) -> int:
  if path.name.endswith('.txt'):
    return 1
  if path.name.endswith('.parquet'):
    return _parquet_file(path).metadata.num_rows
  opener = gzip.open if path.name.endswith('.gz') else open
  with opener(path, 'rt', encoding='utf-8') as f:
    return sum(1 for line in f if line.strip())


class _ShardWriter:
  """Writes uint16 sequences as ArrayRecord records, `per_shard` per file."""

  def __init__(self, folder: Path, split: str, per_shard: int):
    self.folder, self.split, self.per_shard = folder, split, per_shard
    self.shards: list[str] = []
    self.count = 0
    self._writer = None

  def write(self, tokens_NxL: np.ndarray) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=all
    for row in tokens_NxL:
      if self._writer is None or self.count % self.per_shard == 0:
        self.close()
        name = f'{self.split}-{len(self.shards):05d}.array_record'
        self._writer = ArrayRecordWriter(str(self.folder / name), 'group_size:1')
        self.shards.append(name)
      self._writer.write(np.ascontiguousarray(row, np.uint16).tobytes())
      self.count += 1

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def prepare_owt(inputs: Sequence[os.PathLike], output: os.PathLike, *, seq_len: int = 1024,
                num_validation_docs: int = NUM_VALIDATION_DOCS,
                sequences_per_shard: int = 50_000, overwrite: bool = False) -> dict:
  """Tokenize and wrap local OWT documents into ArrayRecord shards; returns the metadata.

  Documents keep input order (files sorted by path); the last `num_validation_docs` are the
  validation split, as MDLM's `train[-100000:]`. Each split is wrapped in groups of 1000 documents.
  """
  output = Path(output)
  if (output / _META).exists() and not overwrite:
    raise FileExistsError(f'{output} already holds prepared data; pass --overwrite to redo it.')
  files = _input_files(inputs)
  total = sum(_count_docs(f) for f in files)
  if not 0 < num_validation_docs < total:
    raise ValueError(f'num_validation_docs={num_validation_docs} must be in (0, {total}) '
                     f'(the number of documents found); lower --num-validation-docs.')
  output.mkdir(parents=True, exist_ok=True)
  for stale in output.glob('*.array_record'):
    stale.unlink()
  (output / _META).unlink(missing_ok=True)
  tok = get_tokenizer()
  first_val = total - num_validation_docs
  writers = {s: _ShardWriter(output, s, sequences_per_shard) for s in ('train', 'validation')}
  counts = {s: np.zeros((VOCAB_SIZE,), np.int64) for s in writers}
  docs_seen = {s: 0 for s in writers}
  start = time.perf_counter()

  def flush(split: str, texts: list[str]) -> None:
    ids = tok.encode_batch(texts, num_threads=os.cpu_count() or 1)
    for tokens_NxL in wrap_groups(ids, seq_len, docs_per_group=None):
      writers[split].write(tokens_NxL)
      counts[split] += np.bincount(tokens_NxL.reshape(-1), minlength=VOCAB_SIZE)
    docs_seen[split] += len(texts)
    texts.clear()

  pending: list[str] = []
  index = 0
  for f in files:
    for text in _iter_docs(f):
      split = 'train' if index < first_val else 'validation'
      if index == first_val and pending:
        flush('train', pending)  # groups never straddle the split boundary
      pending.append(text)
      index += 1
      if len(pending) == DOCS_PER_GROUP:
        flush(split, pending)
        if index % 100_000 == 0:
          print(f'[prepare] {index}/{total} documents, {time.perf_counter() - start:.0f} s',
                flush=True)
  if pending:
    flush('validation', pending)
  meta: dict[str, Any] = {
      'format': 'prime_jax.wrapped_text', 'version': _FORMAT_VERSION, 'seq_len': seq_len,
      'dtype': 'uint16', 'vocab_size': VOCAB_SIZE, 'bos_id': BOS_ID, 'eos_id': EOS_ID,
      'docs_per_group': DOCS_PER_GROUP, 'tokenizer': assets.stamp_digest('tokenizer'),
      'inputs': [str(f) for f in files], 'splits': {}}
  for split, w in writers.items():
    w.close()
    name = f'unigram_{split}.npy'
    np.save(output / name, counts[split])
    meta['splits'][split] = {'num_sequences': w.count, 'num_documents': docs_seen[split],
                             'shards': w.shards, 'unigram_counts': name}
  tmp = output / f'.{_META}.tmp'
  tmp.write_text(json.dumps(meta, indent=1))
  os.replace(tmp, output / _META)  # written last: its presence marks a complete preparation
  print(f'[prepare] done in {time.perf_counter() - start:.0f} s: ' + ', '.join(
      f'{s} {v["num_sequences"]} sequences / {v["num_documents"]} docs'
      for s, v in meta['splits'].items()), flush=True)
  return meta


def owt_metadata(data_dir: Optional[os.PathLike], seq_len: Optional[int] = None) -> dict:
  hint = ('Prepare it with `python -m prime_jax.data.text prepare --input DIR_OR_FILES '
          '--output DATA_DIR --seq-len L` and pass that DATA_DIR.')
  if data_dir is None:
    raise ValueError(f"source 'owt' needs data_dir, the folder of prepared shards. {hint}")
  path = Path(data_dir) / _META
  if not path.exists():
    raise FileNotFoundError(f'No prepared OpenWebText in {data_dir} (no {_META}). {hint}')
  meta = json.loads(path.read_text())
  if seq_len is not None and meta['seq_len'] != seq_len:
    raise ValueError(f'{data_dir} was prepared with seq_len={meta["seq_len"]}, not {seq_len}; '
                     f'use seq_len={meta["seq_len"]} or prepare again with --seq-len {seq_len}.')
  return meta


def owt_source(data_dir: Optional[os.PathLike], split: str, seq_len: int):
  """grain ArrayRecordDataSource over one split's shards; records are raw uint16 bytes."""
  import grain  # pylint: disable=import-outside-toplevel
  meta = owt_metadata(data_dir, seq_len)
  names = meta['splits'][{'valid': 'validation'}.get(split, split)]['shards']
  shards = [str(Path(data_dir) / s) for s in names]
  if not shards:
    raise ValueError(f'{data_dir} holds no {split} sequences; prepare it with more documents.')
  return grain.sources.ArrayRecordDataSource(shards)
