"""Documents of local jsonl / parquet / txt files, each checked; the bad ones reported, not fixed.

A non-UTF-8 byte, an empty or whitespace-only text, a row without a string "text", a line that is
not JSON, or a document over `max_doc_bytes` makes a `Skipped` record in the document's place: it
names where it is (`file:line`, 1-based, for jsonl lines and txt files; `file:row N`, 0-based, for
parquet) and why. Bytes are never replaced: such a document is left out whole. `Report` counts
the documents, prints the first skipped ones and lists them all (skip), or stops at the first
(fail).
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import gzip
import json
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Union

MAX_DOC_BYTES = 100 * 2**20  # OWT's largest documents are ~1 MB; far larger ones are not text
ON_ERROR = ('skip', 'fail')
REPORT = 'prepare_report.json'
_PRINTED = 20  # skipped documents printed as they are found; the report lists them all
_LISTED = 100_000  # skipped documents listed in the report (all are counted)
# Why a document is skipped, as the summary names it.
REASONS = {'non_utf8': 'non-UTF-8', 'empty': 'empty', 'not_json': 'not JSON',
           'no_text': 'without text', 'not_string': 'with non-string text',
           'too_large': 'too large'}


class BadDocumentError(ValueError):
  """A bad document under `on_error='fail'`."""


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A document left out: where it is (a 1-based line, or a 0-based parquet row) and why."""
  file: str
  index: int
  reason: str  # a key of REASONS
  detail: str
  row: bool = False

  @property
  def where(self) -> str:
    return f'{self.file}:row {self.index}' if self.row else f'{self.file}:{self.index}'

  def to_json(self) -> dict[str, Any]:
    return {'file': self.file, 'row' if self.row else 'line': self.index,
            'reason': self.reason, 'detail': self.detail}


def _parquet_file(path: Path):
  try:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError(f'Reading {path} needs pyarrow, which is not installed: `pip install '
                     f'pyarrow`, or convert the data to jsonl with a "text" field.') from e
  return pq.ParquetFile(path)


def _bad_byte(data: bytes, offset: int) -> str:
  return f'non-UTF-8 byte 0x{data[offset]:02x} at byte offset {offset}'


def _too_large(size: int, max_doc_bytes: int) -> str:
  return f'{size:,} bytes, over the limit of {max_doc_bytes:,} (--max-doc-bytes)'


def _json_type(value: Any) -> str:
  names = {bool: 'a boolean', int: 'a number', float: 'a number', list: 'an array',
           dict: 'an object', bytes: 'bytes'}
  return names.get(type(value), type(value).__name__)


def _check_text(value: Any, max_doc_bytes: int) -> Union[str, tuple[str, str]]:
  """The document of a "text" value, or (reason, detail) when it cannot be one."""
  if value is None:
    return 'no_text', '"text" is null'
  if isinstance(value, bytes):  # a parquet binary column
    if len(value) > max_doc_bytes:
      return 'too_large', _too_large(len(value), max_doc_bytes)
    try:
      value = value.decode('utf-8')
    except UnicodeDecodeError as e:
      return 'non_utf8', _bad_byte(value, e.start)
  if not isinstance(value, str):
    return 'not_string', f'"text" is {_json_type(value)}, not a string'
  try:  # a JSON "\udcff" escape decodes to a lone surrogate, which the tokenizer would replace
    size = len(value) if value.isascii() else len(value.encode('utf-8'))
  except UnicodeEncodeError as e:
    return 'non_utf8', (f'lone surrogate U+{ord(value[e.start]):04X} (a "\\u" escape that is no '
                        f'character) at character {e.start}')
  if size > max_doc_bytes:
    return 'too_large', _too_large(size, max_doc_bytes)
  if not value.strip():
    return 'empty', '"text" is empty' if not value else '"text" is only whitespace'
  return value


def _lines(f: BinaryIO, max_doc_bytes: int) -> Iterator[tuple[int, Optional[bytes], int]]:
  """(1-based line number, bytes without the newline or None if over the limit, size) of each
  line; a line over the limit is read past in chunks, never held whole."""
  line_no = 0
  while line := f.readline(max_doc_bytes + 2):
    line_no += 1
    if line.endswith(b'\n') or len(line) < max_doc_bytes + 2:
      body = line[:-1] if line.endswith(b'\n') else line
      yield line_no, (body if len(body) <= max_doc_bytes else None), len(body)
      continue
    size = len(line)
    while (more := f.readline(1 << 24)) and not more.endswith(b'\n'):
      size += len(more)
    yield line_no, None, size + max(0, len(more) - 1)


def _jsonl_records(path: Path, max_doc_bytes: int) -> Iterator[Union[str, Skipped]]:
  opener = gzip.open if path.name.endswith('.gz') else open
  with opener(path, 'rb') as f:
    for line_no, body, size in _lines(f, max_doc_bytes):
      skip = lambda reason, detail: Skipped(str(path), line_no, reason, detail)
      if body is None:
        yield skip('too_large', 'line of ' + _too_large(size, max_doc_bytes))
        continue
      bom = len(codecs.BOM_UTF8) if line_no == 1 and body.startswith(codecs.BOM_UTF8) else 0
      if not body[bom:].strip():
        yield skip('empty', 'empty line')
        continue
      try:
        row = json.loads(body[bom:].decode('utf-8'))
      except UnicodeDecodeError as e:
        yield skip('non_utf8', _bad_byte(body, bom + e.start) + ' of the line')
        continue
      except json.JSONDecodeError as e:
        yield skip('not_json', f'not JSON ({e.msg} at column {e.colno})')
        continue
      if not isinstance(row, dict):
        yield skip('no_text', f'{_json_type(row)}, not an object with a "text" field')
      elif 'text' not in row:
        yield skip('no_text', f'no "text" field (fields: {", ".join(list(row)[:8]) or "none"})')
      else:
        text = _check_text(row['text'], max_doc_bytes)
        yield text if isinstance(text, str) else skip(*text)


def _parquet_records(path: Path, max_doc_bytes: int) -> Iterator[Union[str, Skipped]]:
  pf = _parquet_file(path)
  if 'text' not in pf.schema_arrow.names:
    raise ValueError(f'{path} has no "text" column (columns: {pf.schema_arrow.names}).')
  row = 0
  for batch in pf.iter_batches(columns=['text'], batch_size=1024):
    for value in batch.column(0).to_pylist():
      text = _check_text(value, max_doc_bytes)
      yield text if isinstance(text, str) else Skipped(str(path), row, *text, row=True)
      row += 1


def _txt_records(path: Path, max_doc_bytes: int) -> Iterator[Union[str, Skipped]]:
  size = path.stat().st_size
  if size > max_doc_bytes:
    yield Skipped(str(path), 1, 'too_large', 'file of ' + _too_large(size, max_doc_bytes))
    return
  data = path.read_bytes()
  bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
  try:
    text = data[bom:].decode('utf-8')
  except UnicodeDecodeError as e:
    offset = bom + e.start
    line = data.count(b'\n', 0, offset) + 1
    column = offset - (data.rfind(b'\n', 0, offset) + 1)
    yield Skipped(str(path), line, 'non_utf8', f'{_bad_byte(data, offset)} (byte {column} of '
                  f'line {line})')
    return
  if not text.strip():
    yield Skipped(str(path), 1, 'empty', 'empty file' if not text else 'only whitespace')
  else:
    yield text


def records(path: Path, max_doc_bytes: int) -> Iterator[Union[str, Skipped]]:
  """Each document of one input file, or a `Skipped` in its place."""
  if path.name.endswith('.txt'):
    return _txt_records(path, max_doc_bytes)
  if path.name.endswith('.parquet'):
    return _parquet_records(path, max_doc_bytes)
  return _jsonl_records(path, max_doc_bytes)


class Report:
  """Counts the documents read and skipped; prints the first skipped, or stops at one (fail)."""

  def __init__(self, on_error: str, output: Path):
    self.on_error, self.output = on_error, output
    self.read, self.kept = 0, 0
    self.counts: collections.Counter[str] = collections.Counter()
    self.listed: list[Skipped] = []

  def add(self, record: Union[str, Skipped]) -> None:
    self.read += 1
    if not isinstance(record, Skipped):
      self.kept += 1
      return
    if self.on_error == 'fail':
      raise BadDocumentError(
          f'{record.where}: {record.detail}. Nothing was written to {self.output}. To leave '
          f'such documents out instead, run with --on-error skip (the default): each is then '
          f'counted and listed in {self.output / REPORT}.')
    self.counts[record.reason] += 1
    if len(self.listed) < _LISTED:
      self.listed.append(record)
    n = sum(self.counts.values())
    if n <= _PRINTED:
      print(f'[prepare] skipped {record.where}: {record.detail}', flush=True)
    if n == _PRINTED:
      print(f'[prepare] (further skipped documents are counted and listed in {REPORT} only)',
            flush=True)

  def summary(self) -> str:
    skipped = sum(self.counts.values())
    if not skipped:
      return f'{self.read:,} documents read, none skipped'
    kinds = ', '.join(f'{self.counts[k]:,} {label}' for k, label in REASONS.items()
                      if self.counts[k])
    return f'{self.read:,} documents read, {skipped:,} skipped: {kinds}'

  def to_json(self, max_doc_bytes: int) -> dict[str, Any]:
    return {'summary': self.summary(), 'documents_read': self.read, 'documents_kept': self.kept,
            'documents_skipped': sum(self.counts.values()),
            'skipped_by_reason': {k: self.counts[k] for k in REASONS},
            'reasons': REASONS, 'on_error': self.on_error, 'max_doc_bytes': max_doc_bytes,
            'skipped': [s.to_json() for s in self.listed],
            'skipped_not_listed': sum(self.counts.values()) - len(self.listed)}
