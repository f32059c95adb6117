"""Zero-shot likelihood sets (method.md §7.2) with the reference's detokenizers (method.md §10),
read offline.

Every set is a text source of `prime_jax.data.text`: documents are detokenized, GPT-2 tokenized and
MDLM-wrapped like any corpus, so `make_text_pipeline('wikitext2', 'validation', seq_len=1024,
data_dir=DIR, ...)` serves one from the wrapped-token cache. The cache key holds the sha256 of
every file read (or the TFDS split's size and sampled texts) and RULES_VERSION, so edited data or
detokenizer rules never reuse a stale array.

Nothing is downloaded. Files under `data_dir` (first match wins; `*` globs, shards in name order):
  wikitext2    wikitext-2-raw/wiki.valid.raw (wikitext-2-raw-v1.zip)     one document per line
               | wikitext-2-raw-v1/validation-*.parquet (HF, column text)  ('test': wiki.test.raw)
  wikitext103  the same under wikitext-103-raw/ and wikitext-103-raw-v1/
  ptb          ptb/ptb.valid.txt | simple-examples/data/ptb.valid.txt      one sentence per line
  lambada      lambada/lambada_test.jsonl | lambada_test.jsonl (OpenAI)    {"text": passage}
  ag_news      ag_news/test.csv (ag_news_csv: "class","title","description")
               | ag_news/test*.jsonl ({"text"} or {"title", "description"}) | ag_news/test*.parquet
               | TFDS ag_news_subset
  pubmed       scientific_papers/pubmed/val.txt | pubmed-dataset/val.txt (Cohan et al. jsonl, list
               "article_text") | scientific_papers/pubmed/validation*.jsonl ({"article"})
               | scientific_papers/pubmed/validation*.parquet (column article)
               | TFDS scientific_papers/pubmed                               ('test': test.txt ...)
  arxiv        the same with arxiv (arxiv-dataset/val.txt, TFDS scientific_papers/arxiv)
  lm1b         TFDS lm1b, test split (the existing 'lm1b' source)
  moby_dick    the offline asset (`python -m prime_jax.data.assets fetch text`)
Parquet needs pyarrow. `python -m prime_jax.data.zeroshot --data-dir DIR` shows what is present.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from prime_jax.data import assets

RULES_VERSION = 2  # bump when a detokenizer or reader changes: it is part of the cache key


# ----------------------------------------------------------------------------- detokenizers


def _hugging(open_: str, close: str) -> re.Pattern:
  """'( a b )' -> '(a b)': the spaces just inside a bracket pair (no nesting) go."""
  return re.compile(re.escape(open_) + r'\s*([^' + re.escape(close) + r']*?)\s*'
                    + re.escape(close))


_WIKITEXT_PAIRS = tuple((_hugging(o, c), o + r'\1' + c) for o, c in ('()', '[]', '{}', '""', "''"))
_PTB_NUMBER = re.compile(r'(?<= )N(?= )')


def wikitext_detokenize(text: str) -> str:
  """Undo WikiText's tokenization with the reference's rules, in the reference's order.

  The order is part of the result: ' . ' is fixed before ' , ', and quote pairs form before " 's"
  joins its word. The reference's rule meant to join "' 9" is a regex that can only match a literal
  "/' 9/" and would then write "[0-9]" into the text; it is left out.
  """
  text = text.replace("s '", "s'")
  for sym in '-,.':  # number-internal separators: 1 @,@ 000 -> 1,000
    text = text.replace(f' @{sym}@ ', sym)
  for p in ':;.!?,':
    text = text.replace(f' {p} ', f'{p} ')
  for pattern, hugged in _WIKITEXT_PAIRS:
    text = pattern.sub(hugged, text)
  for n in (4, 3, 2):  # heading markers: = = = -> ===
    text = text.replace(' '.join('=' * n), '=' * n)
  text = text.replace(' \N{DEGREE SIGN} ', '\N{DEGREE SIGN}')
  text = text.replace(' \n', '\n').replace('\n ', '\n')
  text = text.replace(' N ', ' 1 ')
  return text.replace(" 's", "'s")


def ptb_detokenize(text: str) -> str:
  """Undo PTB's tokenization (the reference's rules): clitics, '\\/', the number token N -> 1,
  '$ 1' / '# 1', and <unk> -> '?'."""
  text = text.replace(" 's", "'s").replace("s ' ", "s' ").replace(" n't", "n't")
  text = text.replace(' \n ', '\n').replace('\\/', '/')
  text = _PTB_NUMBER.sub('1', text)  # every space-delimited N, runs like 'N N N' included
  text = text.replace('$ 1', '$1').replace('# 1', '#1')
  return text.replace('<unk>', '?')


def lambada_detokenize(text: str) -> str:
  """Curly double quotes -> '"', then "\\n" + the stripped passage (the reference's LAMBADA text).
  Curly single quotes stay: the reference maps only the double ones."""
  text = text.replace('\N{LEFT DOUBLE QUOTATION MARK}', '"')
  text = text.replace('\N{RIGHT DOUBLE QUOTATION MARK}', '"')
  return '\n' + text.strip()


# The reference's LM1B rules, applied in this order (method.md §10; facts of its behaviour, our
# code).
# Contractions split as "is n't" stay split, as in the reference.
_LM1B_RULES = tuple((re.compile(p), r) for p, r in (
    (r'(https?) : / / ', r'\1://'),
    (r" '(\w+)", r"'\1"),  # "it 's" -> "it's"
    (r' (\w+) \. ', r' \1. '),  # a full stop inside the line
    (r' (\w+) \.$', r' \1.'),  # ... and at its end
    (r' \? ', '? '), (r' \?$', '?'),
    (r' ! ', '! '), (r' !$', '!'),
    (r' , ', ', '), (r' : ', ': '), (r' ; ', '; '), (r' / ', '/'),
    (r'" ([^"]+) "', r'"\1"'), (r"' ([^']+) '", r"'\1'"),  # quoted spans hug their quotes
    (r'\( ([^()]+) \)', r'(\1)'), (r'\[ ([^\[\]]+) \]', r'[\1]'),
    (r'\$ ', '$'), (r'£ ', '£'),
))


def lm1b_detokenize(text: str) -> str:
  """Undo LM1B's space-separated punctuation before GPT-2 tokenization (the reference's rules)."""
  for pattern, repl in _LM1B_RULES:
    text = pattern.sub(repl, text)
  return text


def scientific_papers_detokenize(text: str) -> str:
  """PubMed / arXiv articles: the WikiText rules, then the LM1B rules (method.md §10)."""
  return lm1b_detokenize(wikitext_detokenize(text))


# ----------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class ZeroShotSet:
  """A zero-shot set; `name` is also its text source name, `split` the one the reference uses."""
  name: str
  split: str
  description: str


ZERO_SHOT: dict[str, ZeroShotSet] = {s.name: s for s in (
    ZeroShotSet('lambada', 'test', 'LAMBADA, OpenAI lambada_test.jsonl (5153 passages)'),
    ZeroShotSet('wikitext2', 'validation', 'WikiText-2 raw v1, validation, one line per document'),
    ZeroShotSet('wikitext103', 'validation', 'WikiText-103 raw v1, validation (same text as '
                'WikiText-2 validation)'),
    ZeroShotSet('ptb', 'validation', 'Penn Treebank (ptb_text_only), validation sentences'),
    ZeroShotSet('lm1b', 'test', 'One Billion Words, test (heldout) sentences, through TFDS'),
    ZeroShotSet('ag_news', 'test', 'AG News, test (7600 articles): title + " " + description'),
    ZeroShotSet('pubmed', 'validation', 'scientific_papers/pubmed, validation, field article'),
    ZeroShotSet('arxiv', 'validation', 'scientific_papers/arxiv, validation, field article'),
    ZeroShotSet('moby_dick', 'all', 'Moby-Dick chapters, the offline asset (not in the reference)'),
)}


def _field(row: dict, key: str) -> str:
  value = row.get(key)
  if not isinstance(value, str):
    raise ValueError(f'no string field "{key}" (fields: {sorted(row)})')
  return value


def _ag_news_row(row: dict) -> str:
  if 'text' in row:
    return _field(row, 'text')
  return f'{_field(row, "title")} {_field(row, "description")}'  # HF's text joins them so


def _article_row(row: dict) -> str:
  if 'article' in row:
    return _field(row, 'article')
  paragraphs = row.get('article_text')  # the original archive: a list of paragraphs
  if not isinstance(paragraphs, list):
    raise ValueError(f'neither a string "article" nor a list "article_text" '
                     f'(fields: {sorted(row)})')
  return '\n'.join(paragraphs)


def _wikitext_lines(path: Path) -> Iterator[str]:
  """One document per line, as HF's wikitext: the line with its newline, '' when blank."""
  with open(path, encoding='utf-8') as f:
    for line in f:
      yield line if line.strip() else ''


def _stripped_lines(path: Path) -> Iterator[str]:
  with open(path, encoding='utf-8') as f:
    for line in f:
      yield line.strip()


def _jsonl(get: Callable[[dict], str]) -> Callable[[Path], Iterator[str]]:
  def read(path: Path) -> Iterator[str]:
    with open(path, encoding='utf-8') as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
          if not isinstance(row, dict):
            raise ValueError('not a JSON object')
          yield get(row)
        except ValueError as e:
          raise ValueError(f'{path}:{line_no}: {e}; see prime_jax/data/zeroshot.py for the '
                           f'expected format.') from e
  return read


def _parquet(column: str) -> Callable[[Path], Iterator[str]]:
  def read(path: Path) -> Iterator[str]:
    try:
      import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ValueError(f'Reading {path} needs pyarrow, which is not installed: `pip install '
                       f'pyarrow`, or convert the file to jsonl.') from e
    pf = pq.ParquetFile(path)
    if column not in pf.schema_arrow.names:
      raise ValueError(f'{path} has no "{column}" column (columns: {pf.schema_arrow.names}).')
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
      yield from (t or '' for t in batch.column(0).to_pylist())
  return read


def _ag_news_csv(path: Path) -> Iterator[str]:
  with open(path, encoding='utf-8', newline='') as f:
    for line_no, row in enumerate(csv.reader(f), 1):
      if len(row) != 3:
        raise ValueError(f'{path}:{line_no}: expected 3 fields "class","title","description", '
                         f'got {len(row)}.')
      yield f'{row[1]} {row[2]}'


@dataclasses.dataclass(frozen=True)
class _FileSet:
  """How one set is found: local layouts per split (glob, reader), an optional TFDS fallback."""
  splits: dict[str, tuple[tuple[str, Callable[[Path], Iterator[str]]], ...]]
  aliases: dict[str, str]
  detokenize: Optional[Callable[[str], str]]
  tfds: Optional[tuple[str, Callable[[dict], str]]]  # builder name, example -> raw text
  how_to_get: str


def _wikitext(size: str) -> _FileSet:
  return _FileSet(
      {split: ((f'wikitext-{size}-raw/wiki.{short}.raw', _wikitext_lines),
               (f'wikitext-{size}-raw-v1/{split}-*.parquet', _parquet('text')))
       for split, short in (('validation', 'valid'), ('test', 'test'))},
      {'valid': 'validation'}, wikitext_detokenize, None,
      f'unzip wikitext-{size}-raw-v1.zip (Merity et al.) into DATA_DIR, or copy the HF parquet '
      f'files of wikitext/wikitext-{size}-raw-v1 into DATA_DIR/wikitext-{size}-raw-v1/')


def _papers(kind: str) -> _FileSet:
  folder = f'scientific_papers/{kind}'
  return _FileSet(
      {split: ((f'{folder}/{short}.txt', _jsonl(_article_row)),
               (f'{kind}-dataset/{short}.txt', _jsonl(_article_row)),
               (f'{folder}/{split}*.jsonl', _jsonl(_article_row)),
               (f'{folder}/{split}*.parquet', _parquet('article')))
       for split, short in (('validation', 'val'), ('test', 'test'))},
      {'valid': 'validation'}, scientific_papers_detokenize,
      (f'scientific_papers/{kind}', lambda ex: ex['article']),
      f'unzip {kind}-dataset.zip (Cohan et al., 2018) into DATA_DIR, or copy the HF parquet '
      f'files of scientific_papers/{kind} into DATA_DIR/{folder}/, or `tfds build '
      f'scientific_papers/{kind} --data_dir DATA_DIR --file_format=array_record`')


_FILE_SETS: dict[str, _FileSet] = {
    'wikitext2': _wikitext('2'),
    'wikitext103': _wikitext('103'),
    'ptb': _FileSet(
        {split: ((f'ptb/ptb.{short}.txt', _stripped_lines),
                 (f'simple-examples/data/ptb.{short}.txt', _stripped_lines))
         for split, short in (('validation', 'valid'), ('test', 'test'))},
        {'valid': 'validation'}, ptb_detokenize, None,
        'copy ptb.valid.txt / ptb.test.txt (Mikolov\'s simple-examples/data) into DATA_DIR/ptb/'),
    'lambada': _FileSet(
        {'test': (('lambada/lambada_test.jsonl', _jsonl(lambda r: _field(r, 'text'))),
                  ('lambada_test.jsonl', _jsonl(lambda r: _field(r, 'text'))))},
        {'validation': 'test', 'valid': 'test'}, lambada_detokenize, None,
        "copy OpenAI's lambada_test.jsonl (GPT-2 release, 5153 lines) into DATA_DIR/lambada/"),
    'ag_news': _FileSet(
        {'test': (('ag_news/test.csv', _ag_news_csv),
                  ('ag_news_csv/test.csv', _ag_news_csv),
                  ('ag_news/test*.jsonl', _jsonl(_ag_news_row)),
                  ('ag_news/test*.parquet', _parquet('text')))},
        {'validation': 'test', 'valid': 'test'}, None,
        ('ag_news_subset', lambda ex: f'{ex["title"]} {ex["description"]}'),
        'copy test.csv of ag_news_csv.tgz (Zhang et al., 2015) into DATA_DIR/ag_news/, or the HF '
        'parquet of ag_news there, or `tfds build ag_news_subset --data_dir DATA_DIR '
        '--file_format=array_record`'),
    'pubmed': _papers('pubmed'),
    'arxiv': _papers('arxiv'),
}
FILE_SOURCES = tuple(_FILE_SETS)  # the sets this module reads; lm1b and moby_dick live in text.py
FILE_SPLITS = {name: tuple(s.splits) for name, s in _FILE_SETS.items()}
FILE_ALIASES = {name: dict(s.aliases) for name, s in _FILE_SETS.items()}


# ----------------------------------------------------------------------------- finding and reading


def _file_set(name: str, split: str) -> _FileSet:
  if name not in _FILE_SETS:
    raise ValueError(f'{name!r} is not a file-backed zero-shot set; choose one of '
                     f'{", ".join(FILE_SOURCES)}.')
  fs = _FILE_SETS[name]
  if split not in fs.splits:
    raise ValueError(f'{name!r} has no split {split!r}; its splits are {tuple(fs.splits)}.')
  return fs


def expected_files(name: str, split: str) -> list[str]:
  """The local layouts (relative globs under data_dir) that `name`/`split` is read from."""
  return [pattern for pattern, _ in _file_set(name, split).splits[split]]


def _find_local(fs: _FileSet, split: str, data_dir: Path):
  for pattern, read in fs.splits[split]:
    files = sorted(p for p in data_dir.glob(pattern) if p.is_file())
    if files:
      return pattern, files, read
  return None


def _tfds_prepared(tfds_name: str, split: str, data_dir: Path) -> bool:
  """A complete TFDS ArrayRecord preparation (dataset_info.json is written last)."""
  for info in data_dir.glob(f'{tfds_name}/*/dataset_info.json'):
    if any(info.parent.glob(f'*-{split}.array_record*')):
      return True
  return False


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
  """sha256 of a file's bytes, memoized per (path, size, mtime) so repeated lookups stay cheap."""
  st = path.stat()
  key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
  if key not in _DIGESTS:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
      for block in iter(lambda: f.read(1 << 20), b''):
        h.update(block)
    _DIGESTS[key] = h.hexdigest()
  return _DIGESTS[key]


def _text(value: Any) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _tfds_locate(fs: _FileSet, split: str, data_dir: Path, missing: str):
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    ds = tfds.data_source(fs.tfds[0], split=split, data_dir=str(data_dir), download=False)
    n = len(ds)
  except Exception as e:  # TFDS raises several unrelated types for "not prepared here"
    raise FileNotFoundError(f'{missing} (TFDS {fs.tfds[0]} {split}: {type(e).__name__}: '
                            f'{str(e)[:300]})') from e
  if n == 0:
    raise ValueError(f'TFDS {fs.tfds[0]} {split} under {data_dir} is empty; prepare it again.')
  to_text = fs.tfds[1]
  probe = [to_text({k: _text(v) for k, v in ds[i].items()}) for i in sorted({0, n // 2, n - 1})]
  identity = json.dumps([RULES_VERSION, 'tfds', fs.tfds[0], split, str(data_dir.resolve()), n,
                         hashlib.sha256(repr(probe).encode()).hexdigest()])

  def load() -> list[str]:
    docs = []
    for start in range(0, n, 10_000):
      keys = list(range(start, min(n, start + 10_000)))
      try:
        examples = ds.__getitems__(keys)  # batched ArrayRecord reads
      except (AttributeError, TypeError):  # sources without batched reads (tfds mock_data)
        examples = [ds[k] for k in keys]
      docs.extend(to_text({k: _text(v) for k, v in ex.items()}) for ex in examples)
    return [fs.detokenize(d) for d in docs] if fs.detokenize else docs

  return identity, load


def locate(name: str, split: str, data_dir: Optional[os.PathLike]
           ) -> tuple[str, Callable[[], list[str]]]:
  """(cache identity, loader of the detokenized documents) of a file-backed set's split.

  Local files win over TFDS. Raises FileNotFoundError naming the expected files and how to get
  them when neither is there; nothing is ever downloaded.
  """
  fs = _file_set(name, split)
  patterns = ', '.join(expected_files(name, split))
  if data_dir is None:
    raise ValueError(f'Zero-shot set {name!r} needs data_dir, the folder holding {patterns} '
                     f'(to get it: {fs.how_to_get}).')
  if '://' in os.fspath(data_dir):
    raise ValueError(f'Zero-shot set {name!r} is read from a local folder ({patterns} or a TFDS '
                     f'folder), not from {data_dir}: copy it first (gsutil -m cp -r {data_dir} '
                     'DIR) and pass eval.sets_dir=DIR.')
  data_dir = Path(data_dir)
  found = _find_local(fs, split, data_dir)
  missing = (f'Zero-shot set {name!r} ({split}) is not in {data_dir}: expected one of {patterns} '
             f'there. To get it: {fs.how_to_get}. Nothing is downloaded.')
  if found is None:
    if fs.tfds is None:
      raise FileNotFoundError(missing)
    return _tfds_locate(fs, split, data_dir, missing)
  pattern, files, read = found
  identity = json.dumps([RULES_VERSION, name, split, pattern,
                         [(f.relative_to(data_dir).as_posix(), _file_digest(f)) for f in files]])

  def load() -> list[str]:
    docs = [doc for f in files for doc in read(f)]
    if not docs:
      raise ValueError(f'{", ".join(map(str, files))} holds no documents; copy the full file.')
    return [fs.detokenize(d) for d in docs] if fs.detokenize else docs

  return identity, load


def documents(name: str, split: Optional[str] = None, data_dir: Optional[os.PathLike] = None
              ) -> list[str]:
  """The detokenized documents of a file-backed set, exactly as they are tokenized and wrapped."""
  if name not in _FILE_SETS:
    raise ValueError(f'{name!r} is not a file-backed zero-shot set; choose one of '
                     f'{", ".join(FILE_SOURCES)}.')
  split = split or ZERO_SHOT[name].split
  split = FILE_ALIASES[name].get(split, split)
  return locate(name, split, data_dir)[1]()


def available(data_dir: Optional[os.PathLike]) -> list[str]:
  """Names of the ZERO_SHOT sets whose default split can be read here (cheap: no tokenizing)."""
  out = []
  for name, zs in ZERO_SHOT.items():
    if name == 'moby_dick':
      present = assets.status(['moby_dick'])['moby_dick'] is None
    elif data_dir is None or '://' in os.fspath(data_dir):  # local folders only (see locate)
      present = False
    elif name == 'lm1b':
      present = _tfds_prepared('lm1b', zs.split, Path(data_dir))
    else:
      fs = _FILE_SETS[name]
      present = (_find_local(fs, zs.split, Path(data_dir)) is not None
                 or (fs.tfds is not None and _tfds_prepared(fs.tfds[0], zs.split, Path(data_dir))))
    if present:
      out.append(name)
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m prime_jax.data.zeroshot',
                                   description='Which zero-shot sets a data folder holds.')
  parser.add_argument('--data-dir', default=None, help='folder of the local files / TFDS data')
  args = parser.parse_args(argv)
  present = set(available(args.data_dir))
  for name, zs in ZERO_SHOT.items():
    if name in _FILE_SETS:
      options = expected_files(name, zs.split)
      if _FILE_SETS[name].tfds is not None:
        options.append(f'TFDS {_FILE_SETS[name].tfds[0]}')
      where = ' | '.join(options)
    else:
      where = 'TFDS lm1b' if name == 'lm1b' else 'python -m prime_jax.data.assets fetch text'
    print(f'{"present" if name in present else "missing":8s} {name:12s} {zs.split:11s} {where}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
