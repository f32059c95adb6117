"""Text corpora as fixed-length sequences with MDLM wrapping (method.md §10).

Dimension key:  N: sequences   L: sequence length (seq_len)   C: vocabulary size (50257)

Wrapping: each document is tokenized without specials and gets EOS appended; the documents of a
group (`docs_per_group`, 1000 like MDLM's `datasets.map` batch) are concatenated and cut into
chunks of L - 2 tokens; each chunk becomes [BOS] + chunk + [EOS], exactly L tokens; the group's
remainder is dropped. BOS = EOS = 50256.

Sources (SPLITS lists the split names; aliases in `canonical_split`):
  sotu       State of the Union (the embedded default); validation = the most recent ~10% of
             addresses, every one of them later than every training address (no leakage).
  moby_dick  Moby-Dick chapters; a zero-shot set, one split 'all'.
  owt        OpenWebText prepared on disk by `python -m prime_jax.data.text prepare` (ArrayRecord).
  lm1b       LM1B through `tfds.data_source` (ArrayRecord prepared by TFDS), GPT-2 tokenized.
  wikitext2, wikitext103, ptb, lambada, ag_news, pubmed, arxiv
             the zero-shot sets of `zeroshot.py` (local files under data_dir, or TFDS), each
             with the reference's detokenizer; `zeroshot.ZERO_SHOT` lists them with their splits.

Wrapped arrays of every source but owt are cached as uint16 .npy files (C < 2**16) keyed by source,
split, L and the content they came from, so the second run does not re-tokenize.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from etils import epath

from prime_jax.data import assets, documents, owt, zeroshot
from prime_jax.data.tokenizer import VOCAB_SIZE, get_tokenizer
from prime_jax.data.wrapping import DOCS_PER_GROUP, wrap, wrap_groups  # noqa: F401 (re-exported)
from prime_jax.data.zeroshot import lm1b_detokenize  # with the other detokenizers

SOURCES = ('sotu', 'moby_dick', 'owt', 'lm1b') + zeroshot.FILE_SOURCES
SPLITS = {
    'sotu': ('train', 'validation'),
    'moby_dick': ('all',),
    'owt': ('train', 'validation'),
    'lm1b': ('train', 'test'),
    **zeroshot.FILE_SPLITS,
}
_ALIASES = {
    'sotu': {'valid': 'validation'},
    'moby_dick': {'validation': 'all', 'valid': 'all', 'test': 'all'},
    'owt': {'valid': 'validation'},
    'lm1b': {'validation': 'test', 'valid': 'test'},
    **zeroshot.FILE_ALIASES,
}
SOTU_VAL_FRACTION = 0.1
OWT_NUM_VALIDATION_DOCS = owt.NUM_VALIDATION_DOCS
CACHE_ENV_VAR = 'PRIME_JAX_CACHE'
_FORMAT_VERSION = 1


def canonical_split(source: str, split: str) -> str:
  if source not in SPLITS:
    raise ValueError(f'Unknown text source {source!r}; choose one of {", ".join(SOURCES)}.')
  split = _ALIASES[source].get(split, split)
  if split not in SPLITS[source]:
    raise ValueError(f'{source!r} has no split {split!r}; its splits are {SPLITS[source]}.')
  return split


def _tokenize_and_wrap(texts: Sequence[str], seq_len: int) -> np.ndarray:
  tok = get_tokenizer()
  out = []
  for start in range(0, len(texts), DOCS_PER_GROUP):
    ids = tok.encode_batch(texts[start:start + DOCS_PER_GROUP], num_threads=os.cpu_count() or 1)
    out.extend(wrap_groups(ids, seq_len, docs_per_group=None))
  return np.concatenate(out) if out else np.zeros((0, seq_len), np.uint16)


# ----------------------------------------------------------------------------- corpora

_SOTU_NAME = re.compile(r'^(\d{4})_(.+)_([a-z]+)$')


def sotu_documents(split: Optional[str] = None,
                   val_fraction: float = SOTU_VAL_FRACTION) -> list[tuple[int, str, str]]:
  """(year, file stem, text) of the addresses, oldest first; `split` selects train/validation.

  The most recent ~`val_fraction` addresses are validation; the cut moves later past a year shared
  by two addresses (e.g. 1961), so every validation address is strictly later than all training.
  """
  docs = []
  for f in sorted(assets.path('sotu').glob('*.txt')):
    m = _SOTU_NAME.match(f.stem)
    if m is None:
      raise ValueError(f'Unexpected SOTU file {f.name}; expected <year>_<president>_<party>.txt.')
    docs.append((int(m.group(1)), f.stem, f.read_text(encoding='utf-8')))
  docs.sort(key=lambda d: (d[0], d[1]))
  if split is None:
    return docs
  split = canonical_split('sotu', split)
  cut = len(docs) - max(1, round(val_fraction * len(docs)))
  while 0 < cut < len(docs) and docs[cut][0] == docs[cut - 1][0]:
    cut += 1
  return docs[:cut] if split == 'train' else docs[cut:]


def moby_dick_documents() -> list[tuple[int, str]]:
  """(chapter number, text) of every chapter, in book order."""
  chapters = []
  for f in assets.path('moby_dick').glob('chapter_*.txt'):
    chapters.append((int(f.stem.split('_')[1]), f.read_text(encoding='utf-8')))
  return sorted(chapters)


def _lm1b_source(split: str, data_dir: Optional[str]) -> tuple[Any, str]:
  """The TFDS random-access source of one LM1B split and a cheap identity for the cache key."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  if data_dir is None:
    raise ValueError("source 'lm1b' needs data_dir: the TFDS data folder holding lm1b.")
  try:
    ds = tfds.data_source('lm1b', split=split, data_dir=data_dir, download=False)
    n = len(ds)
  except Exception as e:  # TFDS raises several unrelated types for "not prepared here"
    raise FileNotFoundError(
        f'LM1B ({split}) is not prepared as ArrayRecord under {data_dir}: {type(e).__name__}: '
        f'{e}. Prepare it once on a machine with internet and TensorFlow: `tfds build lm1b '
        f'--data_dir {data_dir} --file_format=array_record`, then pass that data_dir.') from e
  if n == 0:
    raise ValueError(f'LM1B {split} under {data_dir} is empty; prepare it again.')
  probe = [ds[i]['text'] for i in sorted({0, n // 2, n - 1})]
  blob = repr(probe).encode()
  where = data_dir if '://' in data_dir else os.path.abspath(data_dir)
  return ds, f'{where}|{n}|{hashlib.sha256(blob).hexdigest()}'


def _lm1b_texts(ds: Any) -> list[str]:
  texts = []
  for start in range(0, len(ds), 10_000):
    keys = list(range(start, min(len(ds), start + 10_000)))
    try:
      examples = ds.__getitems__(keys)  # batched ArrayRecord reads: much faster on 30M sentences
    except (AttributeError, TypeError):  # sources without batched reads (e.g. tfds mock_data)
      examples = [ds[k] for k in keys]
    for ex in examples:
      t = ex['text']
      texts.append(lm1b_detokenize(t.decode('utf-8') if isinstance(t, bytes) else t))
  return texts


# ----------------------------------------------------------------------------- cached arrays


def derived_cache_dir() -> Path:
  """Where wrapped .npy arrays go: $PRIME_JAX_CACHE, else <asset cache>/wrapped."""
  env = os.environ.get(CACHE_ENV_VAR)
  return Path(env).expanduser() if env else assets.cache_dir() / 'wrapped'


class NpySequences:
  """Rows of a cached (N, L) .npy, memory-mapped lazily: pickles as a path, so grain worker
  processes each map the file instead of receiving a copy of the whole array."""

  def __init__(self, path: os.PathLike):
    self.path = Path(path)
    self._lock = threading.Lock()
    self._rows = np.load(self.path, mmap_mode='r')
    self._len = self._rows.shape[0]

  def _array(self) -> np.ndarray:
    # Mapped once, under a lock: grain reads from a thread pool, and concurrent np.load header
    # parsing (ast.literal_eval) crashes CPython 3.11 ("AST constructor recursion depth mismatch").
    if self._rows is None:
      with self._lock:
        if self._rows is None:
          self._rows = np.load(self.path, mmap_mode='r')
    return self._rows

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> np.ndarray:
    return np.asarray(self._array()[index])

  def __getstate__(self) -> dict:
    return {'path': self.path, '_rows': None, '_len': self._len}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()


def _cached_path(source: str, split: str, seq_len: int, identity: str, build) -> Path:
  key = json.dumps([_FORMAT_VERSION, source, split, seq_len, DOCS_PER_GROUP, SOTU_VAL_FRACTION,
                    assets.stamp_digest('tokenizer'), identity])
  digest = hashlib.sha256(key.encode()).hexdigest()[:12]
  path = derived_cache_dir() / f'{source}-{split}-L{seq_len}-{digest}.npy'
  if path.exists():
    return path
  start = time.perf_counter()
  tokens_NxL = build()
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
  with open(tmp, 'wb') as f:
    np.save(f, tokens_NxL)
  os.replace(tmp, path)
  print(f'[text] {source}/{split}: {tokens_NxL.shape[0]} sequences of {seq_len} tokens '
        f'({time.perf_counter() - start:.1f} s) cached at {path}', flush=True)
  return path


def _wrapped_path(source: str, split: str, seq_len: int, data_dir: Optional[str]) -> Path:
  split = canonical_split(source, split)
  if source == 'sotu':
    build = lambda: _tokenize_and_wrap([d[2] for d in sotu_documents(split)], seq_len)  # noqa: E731
    return _cached_path(source, split, seq_len, assets.stamp_digest('sotu'), build)
  if source == 'moby_dick':
    build = lambda: _tokenize_and_wrap([t for _, t in moby_dick_documents()], seq_len)  # noqa: E731
    return _cached_path(source, split, seq_len, assets.stamp_digest('moby_dick'), build)
  if source == 'lm1b':
    ds, identity = _lm1b_source(split, data_dir)
    return _cached_path(source, split, seq_len, identity,
                        lambda: _tokenize_and_wrap(_lm1b_texts(ds), seq_len))
  if source in zeroshot.FILE_SOURCES:
    identity, load = zeroshot.locate(source, split, data_dir)
    return _cached_path(source, split, seq_len, identity,
                        lambda: _tokenize_and_wrap(load(), seq_len))
  raise ValueError(f'{source!r} is not a cached-array source (every source but owt).')


def wrapped_tokens(source: str, split: str, seq_len: int, *,
                   data_dir: Optional[str] = None) -> np.ndarray:
  """(N, L) uint16 wrapped sequences of any source but owt (memory-mapped from the cache)."""
  return np.load(_wrapped_path(source, split, seq_len, data_dir), mmap_mode='r')


def sequence_source(source: str, split: str, seq_len: int, *,
                    data_dir: Optional[str] = None) -> Sequence[Any]:
  """Random-access source of wrapped sequences: uint16 (L,) arrays, or raw uint16 bytes for owt."""
  split = canonical_split(source, split)
  if source == 'owt':
    return owt.owt_source(data_dir, split, seq_len)
  return NpySequences(_wrapped_path(source, split, seq_len, data_dir))


def unigram_counts(source: str, split: str, seq_len: int, *,
                   data_dir: Optional[str] = None) -> np.ndarray:
  """(C,) int64 token histogram of the wrapped split (BOS/EOS included), for a unigram baseline."""
  split = canonical_split(source, split)
  if source == 'owt':
    meta = owt.owt_metadata(data_dir, seq_len)
    name = meta['splits'][split]['unigram_counts']
    with (epath.Path(data_dir) / name).open('rb') as f:  # a local folder or gs://bucket/folder
      return np.load(f).astype(np.int64)
  tokens_NxL = wrapped_tokens(source, split, seq_len, data_dir=data_dir)
  counts = np.zeros((VOCAB_SIZE,), np.int64)
  for start in range(0, tokens_NxL.shape[0], 4096):
    counts += np.bincount(tokens_NxL[start:start + 4096].reshape(-1), minlength=VOCAB_SIZE)
  return counts


def unigram_log_probs(source: str, seq_len: int, *, data_dir: Optional[str] = None) -> np.ndarray:
  """(C,) float64 log p of the add-one-smoothed training unigram: the baseline every report, the
  unigram head initialisation and the per-t unigram floor share."""
  counts = unigram_counts(source, 'train', seq_len, data_dir=data_dir).astype(np.float64)
  return np.log((counts + 1.0) / (counts.sum() + counts.size))


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m prime_jax.data.text')
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('prepare', help='tokenize local OpenWebText into ArrayRecord shards')
  p.add_argument('--input', nargs='+', required=True, help='jsonl/parquet/txt files or folders')
  p.add_argument('--output', required=True,
                 help='folder for the shards, metadata.json and prepare_report.json; written as '
                 'OUTPUT.partial-HOST-PID and renamed when complete')
  p.add_argument('--seq-len', type=int, default=1024)
  p.add_argument('--num-validation-docs', type=int, default=OWT_NUM_VALIDATION_DOCS,
                 help='the last N documents form the validation split (MDLM: 100000)')
  p.add_argument('--sequences-per-shard', type=int, default=50_000)
  p.add_argument('--on-error', choices=documents.ON_ERROR, default='skip',
                 help='bad documents (non-UTF-8, empty, no string "text", not JSON, too large): '
                 'skip them and list them in prepare_report.json (default), or stop at the first')
  p.add_argument('--max-doc-bytes', type=int, default=documents.MAX_DOC_BYTES,
                 help='a document (jsonl line, parquet text, txt file) over this many bytes is bad '
                 '(default 100 MiB)')
  p.add_argument('--overwrite', action='store_true',
                 help='replace an existing output folder (only one holding prepared data)')
  args = parser.parse_args(argv)
  try:
    owt.prepare_owt(args.input, args.output, seq_len=args.seq_len,
                    num_validation_docs=args.num_validation_docs,
                    sequences_per_shard=args.sequences_per_shard, overwrite=args.overwrite,
                    on_error=args.on_error, max_doc_bytes=args.max_doc_bytes)
  except (FileExistsError, FileNotFoundError, ValueError) as e:  # BadDocumentError included
    print(f'prepare: error: {e}', file=sys.stderr, flush=True)  # as argparse's, status 2
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
