"""OpenWebText (or any local document collection) prepared as ArrayRecord shards of wrapped text.

    python -m prime_jax.data.text prepare --input DIR_OR_FILES --output DATA_DIR [--seq-len 1024]
        [--on-error skip|fail] [--max-doc-bytes N] [--overwrite]

Inputs: jsonl / jsonl.gz (one JSON object per line, field "text"), parquet (column "text", via
pyarrow), txt (one document per file); folders are searched recursively, files taken in path order.
The last `num_validation_docs` documents are the validation split (MDLM's `train[-100000:]`).

Bad documents (a non-UTF-8 byte, an empty or whitespace-only text, a row without a string "text",
a line that is not JSON, a document over `max_doc_bytes`) are skipped and listed with their
`file:line` (`file:row N` for parquet, N counted from 0) in `prepare_report.json`, or, with
`on_error='fail'`, stop the run before anything is written. Bytes are never replaced: a document
with a non-UTF-8 byte is left out whole.

Output: `<split>-NNNNN.array_record` shards (one uint16 sequence of L tokens per record),
`unigram_<split>.npy` token histograms, `prepare_report.json` and `metadata.json`. They are written
into `<output>.partial-<host>-<pid>`, renamed to `<output>` only when complete, so a failed or
interrupted run leaves no dataset behind; a later run removes such a folder left on its host.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from etils import epath

from prime_jax.data import assets, documents
from prime_jax.data.documents import MAX_DOC_BYTES, ON_ERROR, REPORT
from prime_jax.data.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, get_tokenizer
from prime_jax.data.wrapping import DOCS_PER_GROUP, wrap_groups

_FORMAT_VERSION = 1
NUM_VALIDATION_DOCS = 100_000
_META = 'metadata.json'
_PARTIAL = re.compile(r'\.partial-(?P<host>.+)-(?P<pid>\d+)$')
_OUTPUT_FILE = re.compile(r'^(\w+-\d{5}\.array_record|unigram_\w+\.npy|metadata\.json|'
                          r'\.metadata\.json\.tmp|prepare_report\.json)$')


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


# ----------------------------------------------------------------------------- the output folder


def _check_output(output: Path, overwrite: bool) -> None:
  """Refuse an existing output unless --overwrite, and never replace a folder holding files that
  prepare does not write (a mistyped --output must not delete someone's data)."""
  if not output.exists():
    return
  if not output.is_dir():
    raise FileExistsError(f'--output {output} is a file; choose a folder.')
  names = [p.name for p in output.iterdir()]
  if not names:
    return  # an empty folder (made ahead of time) is replaced
  if not overwrite:
    what = ('prepared data' if _META in names else
            'an incomplete preparation (no metadata.json)' if all(map(_OUTPUT_FILE.match, names))
            else 'other files')
    raise FileExistsError(f'{output} already exists and holds {what}; pass --overwrite to '
                          f'replace it, or choose another --output.')
  foreign = sorted(n for n in names if not _OUTPUT_FILE.match(n))
  if foreign:
    raise FileExistsError(f'Refusing to replace {output}: it holds files prepare does not write '
                          f'({", ".join(foreign[:5])}{", ..." if len(foreign) > 5 else ""}); '
                          f'remove them or choose another --output.')


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def _partial_dir(output: Path) -> Path:
  """This run's temporary sibling of `output`; removes the ones of dead runs on this host."""
  host, pid = socket.gethostname(), os.getpid()
  for old in sorted(output.parent.glob(f'{output.name}.partial-*')):
    m = _PARTIAL.search(old.name[len(output.name):])
    if m is None or not old.is_dir():
      continue
    if m['host'] == host and (int(m['pid']) == pid or not _pid_alive(int(m['pid']))):
      print(f'[prepare] removing {old}, left by an interrupted run (it is not data)', flush=True)
      shutil.rmtree(old)
    else:
      print(f'[prepare] note: {old} belongs to another run that may still be going ({m["host"]}, '
            f'pid {m["pid"]}); it is not data', flush=True)
  return output.with_name(f'{output.name}.partial-{host}-{pid}')


def _publish(partial: Path, output: Path, overwrite: bool) -> None:
  """Rename the complete `partial` to `output`, replacing an old output (--overwrite)."""
  _check_output(output, overwrite)  # again: another run may have finished meanwhile
  old = None
  if output.exists():
    old = output.with_name(f'{output.name}.old-{socket.gethostname()}-{os.getpid()}')
    os.replace(output, old)
  try:
    os.replace(partial, output)
  except BaseException:
    if old is not None:
      os.replace(old, output)  # the old output stays in place
    raise
  if old is not None:
    shutil.rmtree(old)


# ----------------------------------------------------------------------------- preparing


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
                sequences_per_shard: int = 50_000, overwrite: bool = False,
                on_error: str = 'skip', max_doc_bytes: int = MAX_DOC_BYTES) -> dict:
  """Tokenize and wrap local OWT documents into ArrayRecord shards; returns the metadata.

  Documents keep input order (files sorted by path); the last `num_validation_docs` good ones are
  the validation split, as MDLM's `train[-100000:]`. Each split is wrapped in groups of 1000
  documents. A first pass checks every document (and stops at the first bad one with
  `on_error='fail'`, before anything is written); the second tokenizes the good ones.
  """
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error={on_error!r} must be 'skip' or 'fail'.")
  if max_doc_bytes <= 0:
    raise ValueError(f'max_doc_bytes={max_doc_bytes} must be positive.')
  output = Path(output)
  _check_output(output, overwrite)
  files = _input_files(inputs)
  start = time.perf_counter()
  report = documents.Report(on_error, output)
  for f in files:
    for record in documents.records(f, max_doc_bytes):
      report.add(record)
      if report.read % 1_000_000 == 0:
        print(f'[prepare] checked {report.read:,} documents', flush=True)
  total = report.kept
  if not 0 < num_validation_docs < total:
    raise ValueError(f'num_validation_docs={num_validation_docs} must be in (0, {total}) '
                     f'(the number of good documents found; {report.summary()}); lower '
                     f'--num-validation-docs.')
  output.parent.mkdir(parents=True, exist_ok=True)
  partial = _partial_dir(output)
  partial.mkdir()
  try:
    meta = _write(partial, files, total, seq_len=seq_len, first_val=total - num_validation_docs,
                  sequences_per_shard=sequences_per_shard, max_doc_bytes=max_doc_bytes,
                  start=start)
    meta['documents'] = {'read': report.read, 'skipped': sum(report.counts.values()),
                         'report': REPORT}
    (partial / REPORT).write_text(json.dumps(report.to_json(max_doc_bytes), indent=1))
    (partial / _META).write_text(json.dumps(meta, indent=1))
    _publish(partial, output, overwrite)
  except BaseException:  # an error or Ctrl-C: nothing half-written stays behind
    shutil.rmtree(partial, ignore_errors=True)
    raise
  print(f'[prepare] done in {time.perf_counter() - start:.0f} s: ' + ', '.join(
      f'{s} {v["num_sequences"]} sequences / {v["num_documents"]} docs'
      for s, v in meta['splits'].items()), flush=True)
  print(f'[prepare] {report.summary()} (report: {output / REPORT})', flush=True)
  return meta


def _write(folder: Path, files: Sequence[Path], total: int, *, seq_len: int, first_val: int,
           sequences_per_shard: int, max_doc_bytes: int, start: float) -> dict:
  """Tokenize, wrap and write the good documents into `folder`; returns the metadata."""
  tok = get_tokenizer()
  writers = {s: _ShardWriter(folder, s, sequences_per_shard) for s in ('train', 'validation')}
  counts = {s: np.zeros((VOCAB_SIZE,), np.int64) for s in writers}
  docs_seen = {s: 0 for s in writers}

  def flush(split: str, texts: list[str]) -> None:
    ids = tok.encode_batch(texts, num_threads=os.cpu_count() or 1)
    for tokens_NxL in wrap_groups(ids, seq_len, docs_per_group=None):
      writers[split].write(tokens_NxL)
      counts[split] += np.bincount(tokens_NxL.reshape(-1), minlength=VOCAB_SIZE)
    docs_seen[split] += len(texts)
    texts.clear()

  pending: list[str] = []
  index = 0
  try:
    for f in files:
      for text in documents.records(f, max_doc_bytes):
        if isinstance(text, documents.Skipped):
          continue  # reported by the first pass
        split = 'train' if index < first_val else 'validation'
        if index == first_val and pending:
          flush('train', pending)  # groups never straddle the split boundary
        pending.append(text)
        index += 1
        if len(pending) == DOCS_PER_GROUP:
          flush(split, pending)
          if index % 100_000 == 0:
            print(f'[prepare] {index:,}/{total:,} documents, {time.perf_counter() - start:.0f} s',
                  flush=True)
    if pending:
      flush('validation', pending)
  finally:
    for w in writers.values():
      w.close()
  if index != total:
    raise RuntimeError(f'The inputs changed during preparation ({total} good documents when '
                       f'checked, {index} when read); prepare again from inputs that stay put.')
  meta: dict[str, Any] = {
      'format': 'prime_jax.wrapped_text', 'version': _FORMAT_VERSION, 'seq_len': seq_len,
      'dtype': 'uint16', 'vocab_size': VOCAB_SIZE, 'bos_id': BOS_ID, 'eos_id': EOS_ID,
      'docs_per_group': DOCS_PER_GROUP, 'tokenizer': assets.stamp_digest('tokenizer'),
      'inputs': [str(f) for f in files], 'splits': {}}
  for split, w in writers.items():
    name = f'unigram_{split}.npy'
    np.save(folder / name, counts[split])
    meta['splits'][split] = {'num_sequences': w.count, 'num_documents': docs_seen[split],
                             'shards': w.shards, 'unigram_counts': name}
  return meta


def owt_metadata(data_dir: Optional[os.PathLike], seq_len: Optional[int] = None) -> dict:
  hint = ('Prepare it with `python -m prime_jax.data.text prepare --input DIR_OR_FILES '
          '--output DATA_DIR --seq-len L` and pass that DATA_DIR.')
  if data_dir is None:
    raise ValueError(f"source 'owt' needs data_dir (--config.data.data_dir), the folder of "
                     f"prepared shards. {hint}")
  m = _PARTIAL.search(epath.Path(data_dir).name)
  if m is not None:
    raise ValueError(f'{data_dir} is the unfinished output of a prepare run ({m["host"]}, pid '
                     f'{m["pid"]}) that did not complete; it is not data. {hint}')
  path = epath.Path(data_dir) / _META  # a local folder or gs://bucket/folder
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
  shards = [str(epath.Path(data_dir) / s) for s in names]  # ArrayRecord reads gs:// itself
  if not shards:
    raise ValueError(f'{data_dir} holds no {split} sequences; prepare it with more documents.')
  return grain.sources.ArrayRecordDataSource(shards)
