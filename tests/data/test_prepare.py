"""`python -m prime_jax.data.text prepare`: bad documents skipped and reported with file:line (or
stopping the run), the output folder published only when complete, and the unigram baseline of a
prepared dataset through the experiment the config builds."""

import gzip
import json
import socket
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs import owt as owt_config
from prime_jax import build
from prime_jax.data import documents, owt, pipeline, text, tokenizer
from prime_jax.data.tokenizer import VOCAB_SIZE, get_tokenizer
from prime_jax.metrics import unigram

L = 32
LIMIT = 1000  # --max-doc-bytes of these tests: every good document is far shorter


def _docs(n, seed=0):
  rng = np.random.default_rng(seed)
  words = ['the', 'cat', 'sat', 'on', 'a', 'mat', 'and', 'wrote', 'JAX', 'code', '.', 'é']
  return [' '.join(rng.choice(words, rng.integers(5, 40))) for _ in range(n)]


def _line(text):
  return json.dumps({'text': text}).encode() + b'\n'


def _read_back(out, split):
  batches = pipeline.make_text_pipeline('owt', split, seq_len=L, batch_size=4, seed=0, train=False,
                                        shard_index=0, shard_count=1, data_dir=str(out))
  return np.concatenate([b['tokens'] for b in batches])


def _wrapped(texts):
  return text.wrap(get_tokenizer().encode_batch(texts), L, docs_per_group=None)


def _siblings(out):
  return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name))


def _bad_corpus(folder):
  """a.jsonl with good rows and every kind of bad one, b.jsonl.gz good rows and an oversized last
  line without a newline; returns (good texts in order, {(file, line): reason})."""
  folder.mkdir()
  good = _docs(24)
  huge = 'x' * 5000
  a = folder / 'a.jsonl'
  lines = [_line(good[0]), _line(good[1]),
           b'\n',                                         # 3: empty line
           _line(good[2]),
           b'{"text": "caf\xff au lait"}\n',              # 5: non-UTF-8 byte at offset 13
           b'{"id": 7, "url": "u"}\n',                    # 6: no "text"
           b'{"text": 17}\n',                             # 7: non-string text
           _line(huge),                                   # 8: over the limit
           _line(good[3]),
           b'{"text": "broken\n',                         # 10: not JSON
           b'{"text": "lone \\udcff surrogate"}\n',       # 11: an escaped non-UTF-8 byte
           _line('  \n '),                                # 12: only whitespace
           b'["a list"]\n',                               # 13: not an object
           b'{"text": null}\n']                           # 14: null text
  lines += [_line(t) for t in good[4:16]]
  a.write_bytes(b''.join(lines))
  with gzip.open(folder / 'b.jsonl.gz', 'wb') as f:
    f.write(b''.join(_line(t) for t in good[16:]) + _line(huge)[:-1])  # 9: huge, no newline
  bad = {('a.jsonl', 3): 'empty', ('a.jsonl', 5): 'non_utf8', ('a.jsonl', 6): 'no_text',
         ('a.jsonl', 7): 'not_string', ('a.jsonl', 8): 'too_large', ('a.jsonl', 10): 'not_json',
         ('a.jsonl', 11): 'non_utf8', ('a.jsonl', 12): 'empty', ('a.jsonl', 13): 'no_text',
         ('a.jsonl', 14): 'no_text', ('b.jsonl.gz', 9): 'too_large'}
  return good, bad


def test_skip_keeps_every_good_document_and_reports_each_bad_one(tmp_path, capsys):
  good, bad = _bad_corpus(tmp_path / 'in')
  out = tmp_path / 'owt'
  meta = owt.prepare_owt([tmp_path / 'in'], out, seq_len=L, num_validation_docs=5,
                          sequences_per_shard=7, max_doc_bytes=LIMIT)
  assert meta['splits']['train']['num_documents'] == 19
  assert meta['splits']['validation']['num_documents'] == 5
  for split, part in [('train', good[:19]), ('validation', good[19:])]:
    np.testing.assert_array_equal(_read_back(out, split), _wrapped(part))

  report = json.loads((out / documents.REPORT).read_text())
  assert report['documents_read'] == len(good) + len(bad) == 35
  assert report['documents_kept'] == 24 and report['documents_skipped'] == 11
  assert report['skipped_by_reason'] == {'non_utf8': 2, 'empty': 2, 'not_json': 1, 'no_text': 3,
                                         'not_string': 1, 'too_large': 2}
  listed = {(e['file'].rsplit('/', 1)[-1], e['line']): e for e in report['skipped']}
  assert {k: e['reason'] for k, e in listed.items()} == bad
  assert listed[('a.jsonl', 5)]['detail'] == 'non-UTF-8 byte 0xff at byte offset 13 of the line'
  assert 'lone surrogate U+DCFF' in listed[('a.jsonl', 11)]['detail']
  assert listed[('a.jsonl', 8)]['detail'].startswith('line of 5,012 bytes, over the limit of 1,000')
  assert listed[('b.jsonl.gz', 9)]['detail'].startswith('line of 5,012 bytes')
  summary = ('35 documents read, 11 skipped: 2 non-UTF-8, 2 empty, 1 not JSON, 3 without text, '
             '1 with non-string text, 2 too large')
  assert report['summary'] == summary
  printed = capsys.readouterr().out
  assert f'[prepare] skipped {tmp_path}/in/a.jsonl:3: empty line\n' in printed
  assert f'[prepare] skipped {tmp_path}/in/a.jsonl:7: "text" is a number, not a string' in printed
  assert f'[prepare] {summary} (report: {out}/prepare_report.json)' in printed
  assert meta['documents'] == {'read': 35, 'skipped': 11, 'report': 'prepare_report.json'}
  assert _siblings(out) == ['owt']  # the partial folder was renamed, nothing else is left


def test_parquet_rows_and_txt_files_are_checked(tmp_path):
  good = _docs(6, seed=1)
  (tmp_path / 'in').mkdir()
  pq.write_table(pa.table({'text': [good[0], None, '', good[1]]}), tmp_path / 'in' / 'a.parquet')
  pq.write_table(pa.table({'text': pa.array([good[2].encode(), b'ok \xfe'], pa.binary())}),
                 tmp_path / 'in' / 'b.parquet')
  (tmp_path / 'in' / 'c.txt').write_bytes(b'line one\nline two\nbad \xc3( here\n')
  (tmp_path / 'in' / 'd.txt').write_bytes(b'')
  for i, t in enumerate(good[3:]):
    (tmp_path / 'in' / f'e{i}.txt').write_text(t)
  out = tmp_path / 'owt'
  owt.prepare_owt([tmp_path / 'in'], out, seq_len=L, num_validation_docs=2)
  np.testing.assert_array_equal(_read_back(out, 'train'), _wrapped(good[:4]))
  np.testing.assert_array_equal(_read_back(out, 'validation'), _wrapped(good[4:]))
  report = json.loads((out / documents.REPORT).read_text())
  got = [(e['file'].rsplit('/', 1)[-1], e.get('row', e.get('line')), 'row' in e, e['reason'],
          e['detail']) for e in report['skipped']]
  assert got == [
      ('a.parquet', 1, True, 'no_text', '"text" is null'),
      ('a.parquet', 2, True, 'empty', '"text" is empty'),
      ('b.parquet', 1, True, 'non_utf8', 'non-UTF-8 byte 0xfe at byte offset 3'),
      ('c.txt', 3, False, 'non_utf8', 'non-UTF-8 byte 0xc3 at byte offset 22 (byte 4 of line 3)'),
      ('d.txt', 1, False, 'empty', 'empty file')]


def test_fail_stops_at_the_first_bad_document_and_writes_nothing(tmp_path, capsys):
  _bad_corpus(tmp_path / 'in')
  out = tmp_path / 'owt'
  argv = ['prepare', '--input', str(tmp_path / 'in'), '--output', str(out), '--seq-len', str(L),
          '--num-validation-docs', '5', '--max-doc-bytes', str(LIMIT), '--on-error', 'fail']
  assert text.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'prepare: error: {tmp_path}/in/a.jsonl:3: empty line. Nothing was '
                        f'written to {out}.')
  assert 'run with --on-error skip' in err
  assert _siblings(out) == []

  (tmp_path / 'one').mkdir()
  (tmp_path / 'one' / 'a.jsonl').write_bytes(_line('fine') + b'{"text": "caf\xff"}\n')
  with pytest.raises(documents.BadDocumentError,
                     match=r'a\.jsonl:2: non-UTF-8 byte 0xff at byte offset 13 of the line'):
    owt.prepare_owt([tmp_path / 'one'], out, seq_len=L, num_validation_docs=1, on_error='fail')
  assert _siblings(out) == []


def test_an_interrupted_run_leaves_no_output_and_keeps_the_old_one(tmp_path, monkeypatch):
  good = _docs(25)
  (tmp_path / 'in').mkdir()
  (tmp_path / 'in' / 'a.jsonl').write_bytes(b''.join(map(_line, good)))
  out = tmp_path / 'owt'
  encode_batch = tokenizer.Tokenizer.encode_batch

  def crash_on_validation(self, texts, num_threads=8):
    if good[-1] in texts:  # the validation group: train shards are on disk by now
      raise KeyboardInterrupt
    return encode_batch(self, texts, num_threads)

  monkeypatch.setattr(tokenizer.Tokenizer, 'encode_batch', crash_on_validation)
  with pytest.raises(KeyboardInterrupt):
    owt.prepare_owt([tmp_path / 'in'], out, seq_len=L, num_validation_docs=5)
  assert _siblings(out) == []

  monkeypatch.setattr(tokenizer.Tokenizer, 'encode_batch', encode_batch)
  before = owt.prepare_owt([tmp_path / 'in'], out, seq_len=L, num_validation_docs=5)
  monkeypatch.setattr(tokenizer.Tokenizer, 'encode_batch', crash_on_validation)
  with pytest.raises(KeyboardInterrupt):
    owt.prepare_owt([tmp_path / 'in'], out, seq_len=L, num_validation_docs=3, overwrite=True)
  assert _siblings(out) == ['owt']  # the dataset that was there is untouched
  assert owt.owt_metadata(out) == before


def test_output_folder_is_refused_replaced_or_cleaned(tmp_path, capsys):
  (tmp_path / 'in').mkdir()
  (tmp_path / 'in' / 'a.jsonl').write_bytes(b''.join(map(_line, _docs(12))))
  out = tmp_path / 'owt'
  out.mkdir()  # an empty folder made ahead of time is fine
  owt.prepare_owt([tmp_path / 'in'], out, seq_len=L, num_validation_docs=2)
  with pytest.raises(FileExistsError, match=f'{out} already exists and holds prepared data; pass '
                     '--overwrite'):
    owt.prepare_owt([tmp_path / 'in'], out, seq_len=L, num_validation_docs=2)
  meta = owt.prepare_owt([tmp_path / 'in'], out, seq_len=16, num_validation_docs=3, overwrite=True)
  assert owt.owt_metadata(out, 16) == meta and meta['splits']['validation']['num_documents'] == 3

  mine = tmp_path / 'mine'
  mine.mkdir()
  (mine / 'notes.txt').write_text('not a dataset')
  with pytest.raises(FileExistsError, match='holds other files; pass --overwrite'):
    owt.prepare_owt([tmp_path / 'in'], mine, seq_len=L, num_validation_docs=2)
  with pytest.raises(FileExistsError, match=r'Refusing to replace .*mine: .*\(notes\.txt\)'):
    owt.prepare_owt([tmp_path / 'in'], mine, seq_len=L, num_validation_docs=2, overwrite=True)
  assert (mine / 'notes.txt').exists()

  # A partial folder of a dead run on this host is no dataset, and the next run removes it.
  dead = subprocess.Popen(['true'])
  dead.wait()
  partial = tmp_path / f'new.partial-{socket.gethostname()}-{dead.pid}'
  partial.mkdir()
  (partial / 'metadata.json').write_text((out / 'metadata.json').read_text())
  with pytest.raises(ValueError, match='unfinished output of a prepare run'):
    owt.owt_metadata(partial)
  owt.prepare_owt([tmp_path / 'in'], tmp_path / 'new', seq_len=L, num_validation_docs=2)
  assert f'removing {partial}, left by an interrupted run' in capsys.readouterr().out
  assert _siblings(tmp_path / 'new') == ['new']


def test_unigram_baseline_of_a_prepared_owt_through_the_experiment(tmp_path):
  (tmp_path / 'in').mkdir()
  (tmp_path / 'in' / 'a.jsonl').write_bytes(b''.join(map(_line, _docs(40))))
  out = tmp_path / 'owt'
  owt.prepare_owt([tmp_path / 'in'], out, seq_len=L, num_validation_docs=8)
  cfg = owt_config.get_config('ell=2')
  with cfg.unlocked():
    cfg.data.data_dir = str(out)
    cfg.data.seq_len = L
  data = build.experiment(cfg).data
  counts = {s: np.bincount(_read_back(out, s).reshape(-1), minlength=VOCAB_SIZE)
            for s in ('train', 'validation')}
  log_p = np.log((counts['train'] + 1.0) / (counts['train'].sum() + VOCAB_SIZE))
  nll = data.unigram_baseline_nll()
  assert np.isfinite(nll) and 0 < nll < np.log(VOCAB_SIZE)
  np.testing.assert_allclose(nll, unigram.cross_entropy(log_p, counts['validation']), rtol=1e-12)

  with cfg.unlocked():
    cfg.data.data_dir = ''
  with pytest.raises(ValueError, match=r'needs data_dir \(--config.data.data_dir\)'):
    build.experiment(cfg).data.unigram_baseline_nll()
