"""Generative-perplexity scorers (method.md §7.3): the MDLM counting rules, GPT-2 parity with
PyTorch `transformers`, and the offline SmolLM2 GGUF scorer (tokenizer and sanity of its
perplexities).

The GPT-2 test needs the test-only deps in requirements-test.txt (torch, transformers); the SmolLM2
tests need `python -m prime_jax.data.assets fetch scorer`. `make test` provides both (a skip fails).
"""

import math

import numpy as np
import pytest

from prime_jax.data import assets
from prime_jax.metrics import genppl

# ----------------------------------------------------------------------------- protocol

E = 9  # EOS / padding id of the hand-built cases


def _fake_scorer(vocab: int = 10) -> genppl.Scorer:
  """Texts are space-separated ids; the 'NLL' of a target is the target id itself (exact sums)."""

  def nll_fn(params, ids, mask):
    del params, mask
    return ids[:, 1:].astype(np.float32)

  return genppl.Scorer(name='fake', eos_id=E, max_length=6, context_length=64, vocab_size=vocab,
                       encode_batch=lambda texts: [[int(w) for w in t.split()] for t in texts],
                       nll_fn=nll_fn, params={})


def test_first_eos_counts_later_eos_and_padding_do_not():
  ids = np.array([[5, 6, E, 7, E, E],   # EOS inside the text, then padding
                  [E, 1, 2, E, E, E],   # starts with EOS: the next EOS is already the second one
                  [1, 2, 3, 4, 5, 6]])  # no EOS at all
  expected = np.array([[1, 1, 1, 0, 0],
                       [1, 1, 0, 0, 0],
                       [1, 1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(genppl.counted_targets(ids, E), expected)
  assert genppl.counted_targets(ids, E).sum() == 10


def test_protocol_truncates_pads_and_counts_exactly():
  scorer = _fake_scorer()
  # "5 6" pads to [5 6 E E E E]: targets 6 and the first padding EOS count (MDLM: the scorer is
  # charged for ending the text); "1 2 3 4 5 6 7 8" is cut to max_length 6; "3 9 4" has an EOS.
  texts = ['5 6', '1 2 3 4 5 6 7 8', '3 9 4']
  out = genppl.generative_perplexity(texts, scorer, batch_size=2)  # 3 rows: a padded last batch
  counted = [6, E, 2, 3, 4, 5, 6, E, 4]
  assert out['tokens'] == len(counted) and out['num_samples'] == 3 and out['padded_length'] == 6
  assert out['nll'] == pytest.approx(sum(counted) / len(counted))
  assert out['gen_ppl'] == pytest.approx(math.exp(sum(counted) / len(counted)))
  assert out['scorer'] == 'fake'
  # the same texts in one batch, and with max_length 3 (every row truncated or padded to 3)
  assert genppl.generative_perplexity(texts, scorer, batch_size=8)['nll'] == out['nll']
  short = genppl.generative_perplexity(texts, scorer, max_length=3)
  assert short['tokens'] == 6 and short['nll'] == pytest.approx((6 + E + 2 + 3 + E + 4) / 6)


def test_unigram_entropy_counts_padding():
  ids = np.array([[1, 1, 2, 3], [4, 4, 4, 4]])
  np.testing.assert_allclose(genppl.unigram_entropy_bits(ids), [1.5, 0.0])
  # "1 1" is padded to [1 1 E E]: 1 bit because the padding ids are in the histogram (else 0)
  out = genppl.generative_perplexity(['1 1', '1 2 3 4'], _fake_scorer())
  assert out['entropy_bits'] == pytest.approx((1.0 + 2.0) / 2)


def test_scorer_errors_name_the_fix():
  with pytest.raises(ValueError, match='config.json.*model.safetensors'):
    genppl.load_scorer('gpt2')
  with pytest.raises(ValueError, match='smollm2, gpt2'):
    genppl.load_scorer('gpt3')
  with pytest.raises(ValueError, match='vocabulary'):
    genppl.generative_perplexity(['1 12'], _fake_scorer(vocab=10))


# ----------------------------------------------------------------------------- GPT-2


def test_gpt2_matches_transformers(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=50257)
  model = transformers.GPT2LMHeadModel(cfg).eval()
  with torch.no_grad():  # the default init (std 0.02, LN = 1/0) gives near-uniform logits
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path, safe_serialization=True)
  scorer = genppl.load_scorer('gpt2', str(tmp_path))
  assert scorer.eos_id == 50256 and scorer.max_length == 64

  rng = np.random.default_rng(0)
  ids = rng.integers(0, 50257, (3, 40))
  mask = np.ones_like(ids)
  mask[1, 25:] = 0  # a right-padded row
  with torch.no_grad():
    logits = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2),
                                            torch.tensor(ids[:, 1:]), reduction='none').numpy()
  ours = np.asarray(scorer.nll(ids, mask))
  assert ours.shape == (3, 39) and ref.std() > 0.5  # a non-trivial model
  valid = np.ones_like(ref, bool)
  valid[1, 24:] = False  # predictions from padded query positions are never counted
  assert np.abs(ours - ref)[valid].max() < 1e-4

  # The whole protocol against MDLM's own formula on HF outputs (needs the GPT-2 BPE asset).
  try:
    rows = scorer.tokenize(['Hello world, this is a test.<|endoftext|>Next one',
                            'Short text', 'A third sample with a few more words in it.'])
  except FileNotFoundError as e:
    pytest.skip(f'GPT-2 tokenizer asset missing: {e}')
  assert 50256 in rows[0] and len(rows[0]) > 10
  padded, attn = genppl.pad_rows(rows, 50256, 64)
  with torch.no_grad():
    t_ids = torch.tensor(padded, dtype=torch.long)
    logits = model(t_ids, attention_mask=torch.tensor(attn, dtype=torch.long)).logits
    nlls = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), t_ids[:, 1:],
                                             reduction='none')
    first_eos = (t_ids == 50256).cumsum(-1) == 1
    keep = first_eos[:, 1:] | (t_ids != 50256)[:, 1:]
    ref_nll = float((nlls * keep).sum() / keep.sum())
  out = genppl.generative_perplexity(['Hello world, this is a test.<|endoftext|>Next one',
                                      'Short text', 'A third sample with a few more words in it.'],
                                     scorer, batch_size=2)
  assert out['tokens'] == int(keep.sum())
  assert out['nll'] == pytest.approx(ref_nll, abs=1e-5)


# ----------------------------------------------------------------------------- SmolLM2 GGUF

REAL = 'The cat sat on the mat and looked out of the window at the birds in the garden.'
REAL2 = 'I went to the store yesterday to buy some milk and bread for breakfast.'


@pytest.fixture(scope='module')
def smollm2():
  try:
    assets.path('smollm2')
  except FileNotFoundError as e:
    pytest.skip(str(e))
  return genppl.load_scorer('smollm2')


def test_smollm2_tokenizer(smollm2):
  texts = ['Plain English, with punctuation; and "quotes".', 'Numbers: 2024, 3.14159 and  42.',
           'Ünïcödé ñ 日本語 🙂\n\n  indented\ttabs  ', "can't won't I'm they've",
           'doc one<|endoftext|>doc two', '']
  rows = smollm2.tokenize(texts)
  for text, ids in zip(texts, rows):
    assert smollm2.decode(ids) == text
  the, the_sp, cat = smollm2.tokenize(['The', ' the', ' cat'])
  assert the == [504] and the_sp == [260] and len(cat) == 1  # common words are single tokens
  assert smollm2.tokenize(['2024'])[0] == smollm2.tokenize(['2 0 2 4'])[0][::2]  # digit by digit
  assert rows[4].count(0) == 1 and smollm2.eos_id == 0  # "<|endoftext|>" is the EOS id 0
  assert all(0 <= i < smollm2.vocab_size for r in rows for i in r)


def test_smollm2_tokenizer_matches_hf_tokenizers(smollm2):
  """Our tiktoken regex + ranks == an HF `tokenizers` BPE with llama.cpp's "smollm" pre-split."""
  tk = pytest.importorskip('tokenizers')
  tok = smollm2.tokenizer
  hf = tk.Tokenizer(tk.models.BPE(vocab={t: i for i, t in enumerate(tok.tokens)},
                                  merges=[tuple(m.split(' ')) for m in tok.merges]))
  hf.pre_tokenizer = tk.pre_tokenizers.Sequence([
      tk.pre_tokenizers.Digits(individual_digits=True),
      tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  hf.add_special_tokens([tk.AddedToken(t, special=True) for t in tok.special_tokens])
  texts = ['In 1999, 42 people paid $3.50 each.  Then   7 more<|endoftext|>came.',
           'a  1b 2\n 3\n\n4  \n x\t\t7', "We'll see; it's 10:30 -- isn't it?\r\n",
           'Ünïcödé ñ 日本語のテキスト 🙂🚀  ', 'ctrl\x04 chars \x1d here',
           '<|im_start|>user\nhi']
  for text in texts:
    assert smollm2.tokenize([text])[0] == hf.encode(text).ids, text


def test_smollm2_perplexity_is_sane(smollm2):
  rng = np.random.default_rng(0)
  ppl = {}
  for text in (REAL, REAL2):
    words = text.rstrip('.').split()
    shuffled = ' '.join(rng.permutation(words)) + '.'
    for key, t in ((text, text), ('shuffled ' + text, shuffled)):
      out = genppl.generative_perplexity([t], smollm2)  # every call pads to (1, 32): one compile
      assert out['scorer'] == 'SmolLM2-135M-Instruct (Q4_1 GGUF)'
      ppl[key] = out['gen_ppl']
  for text in (REAL, REAL2):
    assert 3 < ppl[text] < 60
    assert ppl['shuffled ' + text] > 10 * ppl[text]
  # Measured with the interleaved-pair rotary (half-split rotary gives 38.3 and 21.3); matches
  # transformers' own GGUF loader on the same file to 1e-3 in PPL.
  assert ppl[REAL] == pytest.approx(25.27, rel=0.02)
  assert ppl[REAL2] == pytest.approx(15.26, rel=0.02)


# ----------------------------------------------------------------------------- --mode sample


def test_run_sample_loads_the_scorer_before_sampling(tmp_path, monkeypatch):
  """A missing or unknown scorer fails at once: before the checkpoint is restored or any sample is
  drawn (here there is no checkpoint at all)."""
  from configs import sotu  # pylint: disable=import-outside-toplevel
  from prime_jax import build, evaluate, sample  # pylint: disable=import-outside-toplevel

  def too_early(*args, **kwargs):
    del args, kwargs
    pytest.fail('restored or sampled before the scorer was loaded')

  monkeypatch.setattr(evaluate, 'Restored', too_early)
  monkeypatch.setattr(sample, 'sample_text', too_early)
  cfg = sotu.get_config()
  cfg.unlock()
  cfg.sample.scorer = 'gpt3'
  with pytest.raises(ValueError, match='smollm2, gpt2'):
    sample.run_sample(build.experiment(cfg), str(tmp_path))
  cfg.sample.scorer = 'gpt2'  # no sample.scorer_path
  with pytest.raises(ValueError, match='config.json.*model.safetensors'):
    sample.run_sample(build.experiment(cfg), str(tmp_path))
  assert list(tmp_path.iterdir()) == []
