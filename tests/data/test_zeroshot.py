"""prime_jax.data.zeroshot: the reference's detokenizers, the zero-shot loaders, their pipelines.

Every data file here is a small synthetic one written into tmp_path; nothing is downloaded.
"""

import json

import numpy as np
import pytest

from prime_jax.data import assets, pipeline, text, zeroshot
from prime_jax.data.tokenizer import EOS_ID, get_tokenizer

L = 16  # short sequences: the tiny synthetic files still give several wrapped rows

WIKI_RAW = (' \n'
            ' = Title = \n'
            ' \n'
            ' The 2 @,@ 000 cats , he said . \n'
            ' = = Section = = \n'
            " It 's N years old . \n")
WIKI_DOCS = ['', ' = Title =\n', '', ' The 2,000 cats, he said.\n', ' == Section ==\n',
             " It's 1 years old.\n"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
  monkeypatch.setenv(text.CACHE_ENV_VAR, str(tmp_path / 'cache'))


def _write(path, content):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(content, encoding='utf-8')
  return path


def _jsonl(path, rows):
  return _write(path, ''.join(json.dumps(r) + '\n' for r in rows))


def _wrapped(docs, seq_len=L):
  return text.wrap(get_tokenizer().encode_batch(docs), seq_len, docs_per_group=None)


def _served(source, split, data_dir, seq_len=L):
  batches = pipeline.make_text_pipeline(source, split, seq_len=seq_len, batch_size=4, seed=0,
                                        train=False, shard_index=0, shard_count=1,
                                        data_dir=str(data_dir))
  return np.concatenate([b['tokens'] for b in batches])


# ----------------------------------------------------------------------------- detokenizers


def test_wikitext_detokenizer():
  d = zeroshot.wikitext_detokenize
  assert d(' The 2 @,@ 000 @-@ year @-@ old wall , 1 @.@ 5 m high , is " famous " ( see below )'
           ' . \n') == ' The 2,000-year-old wall, 1.5 m high, is "famous" (see below).\n'
  assert d(' = = Early life = = \n') == ' == Early life ==\n'
  assert d(' = = = Sub = = = \n') == ' === Sub ===\n'
  assert d(' = = = = Deep = = = = \n') == ' ==== Deep ====\n'
  # Quote pairs form before " 's" joins, so two possessives still come out right.
  assert d("the boy 's dog and the girl 's cat") == "the boy's dog and the girl's cat"
  assert d("the players ' union") == "the players' union"
  assert d('it was 30 \N{DEGREE SIGN} C ; N people [ 1 ] { x }') == (
      'it was 30\N{DEGREE SIGN}C; 1 people [1] {x}')
  assert d('a \n b') == 'a\nb'
  assert d('a . , b') == 'a., b'  # ' . ' is fixed before ' , ' (the other order gives 'a ., b')
  assert d('Wait ! Why ? Yes : no') == 'Wait! Why? Yes: no'


def test_ptb_detokenizer():
  d = zeroshot.ptb_detokenize
  assert d("the company 's shares rose N N N cents to $ N a share <unk> said mr. <unk> he does n't"
           ) == "the company's shares rose 1 1 1 cents to $1 a share ? said mr. ? he doesn't"
  assert d("the investors ' money at # N a\\/b N") == "the investors' money at #1 a/b N"
  assert d('N N of # N items') == 'N 1 of #1 items'  # only space-delimited N is a number
  assert d('NASA and N.Y. stay') == 'NASA and N.Y. stay'


def test_lambada_detokenizer():
  d = zeroshot.lambada_detokenize
  assert d('  \N{LEFT DOUBLE QUOTATION MARK}I know,\N{RIGHT DOUBLE QUOTATION MARK} she said. '
           '\N{LEFT SINGLE QUOTATION MARK}Fine.\N{RIGHT SINGLE QUOTATION MARK} \n') == (
               '\n"I know," she said. \N{LEFT SINGLE QUOTATION MARK}Fine.'
               '\N{RIGHT SINGLE QUOTATION MARK}')
  assert d('plain') == '\nplain'


def test_lm1b_and_scientific_papers_detokenizers():
  assert text.lm1b_detokenize is zeroshot.lm1b_detokenize  # moved, still reachable from text
  d = zeroshot.lm1b_detokenize
  # The reference's rules: "n't" stays split; ' %' and ' - ' are left alone.
  assert d('He said , " it is n\'t mine . "') == 'He said, "it is n\'t mine."'
  assert d("costs $ 5 ( or 10 % ) ; they 're here / there - ok !") == (
      "costs $5 (or 10 %); they're here/there - ok!")
  # Scientific papers: the WikiText rules first (@.@, ' , ', brackets), then the LM1B ones.
  assert zeroshot.scientific_papers_detokenize('the rate was 5 @.@ 2 % ( n = 10 ) , i.e. , high .'
                                               ) == 'the rate was 5.2 % (n = 10), i.e., high.'


# ----------------------------------------------------------------------------- loaders


def test_wikitext_lines_are_documents_and_the_pipeline_serves_them(tmp_path):
  data = tmp_path / 'data'
  _write(data / 'wikitext-2-raw' / 'wiki.valid.raw', WIKI_RAW)
  assert zeroshot.documents('wikitext2', data_dir=data) == WIKI_DOCS
  expected = _wrapped(WIKI_DOCS)
  assert expected.shape == (2, L)  # 6 documents, blank lines included as bare EOS
  got = _served('wikitext2', 'validation', data)
  np.testing.assert_array_equal(got, expected)
  assert (got[:, 0] == EOS_ID).all() and (got[:, -1] == EOS_ID).all()
  assert pipeline.num_sequences('wikitext2', 'valid', L, data_dir=str(data)) == 2
  assert pipeline.unigram_counts('wikitext2', 'validation', L, data_dir=str(data)).sum() == 2 * L

  # WikiText-103 reads its own folder; the parquet form (HF rows are already lines) works too.
  pq = pytest.importorskip('pyarrow.parquet')
  pa = pytest.importorskip('pyarrow')
  (data / 'wikitext-103-raw-v1').mkdir()
  pq.write_table(pa.table({'text': ['', ' = Title = \n', ' a , b . \n']}),
                 data / 'wikitext-103-raw-v1' / 'validation-00000-of-00001.parquet')
  assert zeroshot.documents('wikitext103', data_dir=data) == ['', ' = Title =\n', ' a, b.\n']


def test_cache_follows_the_file_contents(tmp_path, monkeypatch):
  data = tmp_path / 'data'
  raw = _write(data / 'wikitext-2-raw' / 'wiki.valid.raw', WIKI_RAW)
  first = np.array(text.wrapped_tokens('wikitext2', 'validation', L, data_dir=str(data)))
  with monkeypatch.context() as m:  # the same files: served from the cache
    m.setattr(text, '_tokenize_and_wrap', lambda *a: pytest.fail('re-tokenized'))
    np.testing.assert_array_equal(text.wrapped_tokens('wikitext2', 'validation', L,
                                                      data_dir=str(data)), first)
  raw.write_text(WIKI_RAW + ' More text about cats and dogs , here . \n' * 3, encoding='utf-8')
  second = text.wrapped_tokens('wikitext2', 'validation', L, data_dir=str(data))
  docs = zeroshot.documents('wikitext2', 'validation', data)
  assert len(docs) == 9
  np.testing.assert_array_equal(second, _wrapped(docs))
  assert second.shape[0] > first.shape[0]
  assert len(list((tmp_path / 'cache').glob('wikitext2-validation-L16-*.npy'))) == 2


def test_ptb_and_lambada_loaders(tmp_path):
  data = tmp_path / 'data'
  _write(data / 'ptb' / 'ptb.valid.txt',
         " consumers may want to move their telephones a little closer to the tv set \n"
         " <unk> <unk> watching abc 's monday night football can now vote N times \n")
  assert zeroshot.documents('ptb', data_dir=data) == [
      'consumers may want to move their telephones a little closer to the tv set',
      "? ? watching abc's monday night football can now vote 1 times"]
  _write(data / 'simple-examples' / 'data' / 'ptb.test.txt', 'a <unk> b\n')  # the original layout
  assert zeroshot.documents('ptb', 'test', data) == ['a ? b']

  _jsonl(data / 'lambada' / 'lambada_test.jsonl', [
      {'text': '\N{LEFT DOUBLE QUOTATION MARK}Go,\N{RIGHT DOUBLE QUOTATION MARK} he said to Tom'},
      {'text': '  She looked at the sky and said nothing  '}])
  docs = zeroshot.documents('lambada', data_dir=data)
  assert docs == ['\n"Go," he said to Tom', '\nShe looked at the sky and said nothing']
  np.testing.assert_array_equal(_served('lambada', 'validation', data, seq_len=8),
                                _wrapped(docs, 8))


def test_ag_news_csv_jsonl_and_parquet(tmp_path):
  csv_dir = tmp_path / 'csv'
  _write(csv_dir / 'ag_news' / 'test.csv',
         '"3","Fears for T N pension","Unions at Turner   Newall say"\n'
         '"4","A ""quoted"" title","desc, with comma"\n')
  expected = ['Fears for T N pension Unions at Turner   Newall say',  # no detokenizer
              'A "quoted" title desc, with comma']
  assert zeroshot.documents('ag_news', data_dir=csv_dir) == expected
  np.testing.assert_array_equal(_served('ag_news', 'test', csv_dir, seq_len=8),
                                _wrapped(expected, 8))

  js = tmp_path / 'jsonl'
  _jsonl(js / 'ag_news' / 'test.jsonl', [{'text': 'joined already', 'label': 1},
                                         {'title': 'T', 'description': 'D'}])
  assert zeroshot.documents('ag_news', data_dir=js) == ['joined already', 'T D']
  pq = pytest.importorskip('pyarrow.parquet')
  pa = pytest.importorskip('pyarrow')
  (tmp_path / 'pq' / 'ag_news').mkdir(parents=True)
  pq.write_table(pa.table({'text': ['x y', 'z'], 'label': [0, 1]}),
                 tmp_path / 'pq' / 'ag_news' / 'test-00000-of-00001.parquet')
  assert zeroshot.documents('ag_news', data_dir=tmp_path / 'pq') == ['x y', 'z']


def test_scientific_papers_loaders(tmp_path):
  data = tmp_path / 'data'
  # The original archive: JSON lines with the article as a list of paragraphs.
  _jsonl(data / 'scientific_papers' / 'pubmed' / 'val.txt', [
      {'article_id': 'a', 'article_text': ['the rate was 5 @.@ 2 % .', 'second para .'],
       'abstract_text': ['<S> x </S>'], 'section_names': ['intro']},
      {'article_id': 'b', 'article_text': ['( see table 1 ) , done !'], 'abstract_text': []}])
  docs = zeroshot.documents('pubmed', data_dir=data)
  assert docs == ['the rate was 5.2 % .\nsecond para.', '(see table 1), done!']
  np.testing.assert_array_equal(_served('pubmed', 'validation', data, seq_len=8),
                                _wrapped(docs, 8))
  _jsonl(data / 'arxiv-dataset' / 'test.txt', [{'article_text': ['we show that x , y .']}])
  assert zeroshot.documents('arxiv', 'test', data) == ['we show that x, y.']
  pq = pytest.importorskip('pyarrow.parquet')
  pa = pytest.importorskip('pyarrow')
  folder = data / 'scientific_papers' / 'arxiv'
  folder.mkdir(parents=True)
  for i, article in enumerate(['second shard', 'first shard , here']):
    pq.write_table(pa.table({'article': [article], 'abstract': ['-']}),
                   folder / f'validation-0000{1 - i}-of-00002.parquet')
  assert zeroshot.documents('arxiv', 'validation', data) == ['first shard, here', 'second shard']


def test_tfds_fallback_for_ag_news_and_papers(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=12):
    news = tfds.data_source('ag_news_subset', split='test', data_dir=str(tmp_path))
    expected = [f'{ex["title"]} {ex["description"]}' for ex in news]
    assert zeroshot.documents('ag_news', data_dir=tmp_path) == expected
    np.testing.assert_array_equal(_served('ag_news', 'test', tmp_path), _wrapped(expected))
    papers = tfds.data_source('scientific_papers/arxiv', split='validation', data_dir=str(tmp_path))
    assert zeroshot.documents('arxiv', data_dir=tmp_path) == [
        zeroshot.scientific_papers_detokenize(ex['article']) for ex in papers]


# ----------------------------------------------------------------------------- errors and registry


def test_missing_data_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="'wikitext2' needs data_dir.*wikitext-2-raw/wiki.valid.raw"):
    pipeline.make_text_pipeline('wikitext2', 'validation', seq_len=L, batch_size=2, seed=0,
                                train=False, shard_index=0, shard_count=1)
  with pytest.raises(FileNotFoundError, match=r'(?s)wikitext-2-raw/wiki\.valid\.raw.*unzip'):
    pipeline.num_sequences('wikitext2', 'validation', L, data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r'lambada/lambada_test\.jsonl.*lambada_test\.jsonl'):
    zeroshot.documents('lambada', data_dir=tmp_path)
  with pytest.raises(FileNotFoundError, match=r'(?s)ag_news/test\.csv.*tfds build ag_news_subset'):
    zeroshot.documents('ag_news', data_dir=tmp_path)
  with pytest.raises(ValueError, match=r"splits are \('validation', 'test'\)"):
    text.canonical_split('ptb', 'train')
  _write(tmp_path / 'lambada' / 'lambada_test.jsonl', '{"text": "ok"}\n{"passage": "no"}\n')
  with pytest.raises(ValueError, match=r'lambada_test\.jsonl:2: no string field "text"'):
    zeroshot.documents('lambada', data_dir=tmp_path)
  with pytest.raises(ValueError, match='not a file-backed zero-shot set'):
    zeroshot.documents('lm1b', data_dir=tmp_path)


def test_registry_and_available(tmp_path):
  assert list(zeroshot.ZERO_SHOT) == ['lambada', 'wikitext2', 'wikitext103', 'ptb', 'lm1b',
                                      'ag_news', 'pubmed', 'arxiv', 'moby_dick']
  for name, zs in zeroshot.ZERO_SHOT.items():
    assert zs.name == name and name in text.SOURCES and zs.description
    assert text.canonical_split(name, zs.split) == zs.split  # every default split is servable
  assert (zeroshot.ZERO_SHOT['lm1b'].split, zeroshot.ZERO_SHOT['pubmed'].split) == (
      'test', 'validation')

  moby = ['moby_dick'] if assets.status(['moby_dick'])['moby_dick'] is None else []
  assert zeroshot.available(None) == moby
  assert zeroshot.available(tmp_path) == moby
  _write(tmp_path / 'wikitext-2-raw' / 'wiki.valid.raw', WIKI_RAW)
  _write(tmp_path / 'wikitext-103-raw' / 'wiki.test.raw', WIKI_RAW)  # not the default split
  _jsonl(tmp_path / 'lambada_test.jsonl', [{'text': 'x'}])
  for name, split in [('lm1b', 'test'), ('scientific_papers/pubmed', 'validation')]:
    version = tmp_path / name / '1.0.0'  # what a finished TFDS ArrayRecord preparation leaves
    _write(version / 'dataset_info.json', '{}')
    _write(version / f'{name.split("/")[0]}-{split}.array_record-00000-of-00001', '')
  _write(tmp_path / 'ag_news_subset' / '1.0.0' / 'ag_news_subset-test.array_record-00000', '')
  assert zeroshot.available(tmp_path) == ['lambada', 'wikitext2', 'lm1b', 'pubmed'] + moby
