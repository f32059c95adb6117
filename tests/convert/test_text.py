"""The authors' text checkpoints (fixtures written by their own code) in and out: logit parity,
the EMA/raw choice, refusals, the workdir import, export round trips and torch's own reader."""

import collections
import json
import os
import pickle
import zipfile

import jax
import numpy as np
import pytest
import torch

from configs import base
from prime_jax import build, convert, torchfile
from prime_jax import checkpoint as checkpoint_lib
from prime_jax.convert import __main__ as cli
from prime_jax.convert import text
from prime_jax.diffusion import parameterization
from tests.conftest import SHARED

FIXTURES = SHARED / 'fixtures' / 'official'
PRIME, MDLM, AR = (str(FIXTURES / f'{n}.ckpt') for n in ('text_prime_l2', 'text_mdlm_l1',
                                                          'text_ar'))


def fixture_config(ell: int, *, name: str = 'dit', dim: int = 64, carry_over: bool = True):
  """The fixtures' sizes: C = 1000, D = 64, 2 blocks of 2 heads, cond 64, L = 32."""
  c = base.get_config()
  c.diffusion.vocab_size = 1000
  c.diffusion.ell = ell
  c.diffusion.carry_over = carry_over
  c.model.name = name
  c.model.dim, c.model.num_heads, c.model.num_layers, c.model.cond_dim = dim, 2, 2, 64
  c.model.dropout = 0.0
  c.data.seq_len, c.data.batch_size = 32, 2
  c.eval.batch_size = 2
  c.lock()
  return c


def _npz(path: str):
  z = np.load(path.replace('.ckpt', '.npz'))
  return {k: z[k] for k in z.files}


@pytest.mark.parametrize('path,ell', [(PRIME, 2), (MDLM, 1)])
@pytest.mark.parametrize('weights', ['raw', 'ema'])
def test_logits_and_carry_over_log_probs_match_the_authors(path, ell, weights):
  z = _npz(path)
  model = convert.load(path, fixture_config(ell), weights=weights)
  y = z['ids'].reshape(2, 32, ell)
  logits = np.asarray(model(y))
  ref = z[f'logits_{weights}']
  assert logits.shape == (2, 32, 1000)
  assert np.abs(logits - ref[..., :1000]).max() < 1e-4  # measured: 7e-7 .. 2e-6
  # The module's output: carry-over filter (Prime: -inf on classes that contradict a visible digit)
  # or SUBS (MDLM: -1e6). The same classes are kept, with the same log-probabilities.
  codec = build.experiment(fixture_config(ell)).codec
  logp = np.asarray(parameterization.log_probs(logits, y, codec, carry_over=True))
  ref_logp = z[f'logp_{weights}'][..., :1000]
  kept = ref_logp > -1e5
  np.testing.assert_array_equal(logp > -1e5, kept)
  assert np.abs(logp[kept] - ref_logp[kept]).max() < 1e-4


@pytest.mark.parametrize('path,ell', [(PRIME, 2), (MDLM, 1)])
def test_the_wrong_weights_are_caught(path, ell):
  z = _npz(path)
  raw = convert.load(path, fixture_config(ell), weights='raw')
  logits = np.asarray(raw(z['ids'].reshape(2, 32, ell)))
  assert np.abs(logits - z['logits_ema'][..., :1000]).max() > 0.1


def test_time_conditioned_call_matches_the_authors():
  # Their EMA backbone fed sigma itself: a time_conditioning=True model sees the same numbers.
  z = _npz(PRIME)
  cfg = fixture_config(2).copy_and_resolve_references()
  with cfg.unlocked():
    cfg.model.time_conditioning = True  # the file says False: the converter sets it back
  _, conv, used = convert.read(PRIME, cfg)
  assert used.model.time_conditioning is False
  assert any('time_conditioning' in n for n in conv.notes)
  m = conv.model()
  m.time_conditioning = True  # what a time-conditioned config would run
  logits = np.asarray(m(z['ids'].reshape(2, 32, 2), z['sigma']))
  assert np.abs(logits[..., :512] - z['logits_ema_sigma_head512']).max() < 1e-4


def test_ar_logits_log_probs_and_nll_match_the_authors():
  z = _npz(AR)
  for weights in ('raw', 'ema'):
    model = convert.load(AR, fixture_config(1, name='ar'), weights=weights)
    logits = np.asarray(model(z['input_ids']))
    assert np.abs(logits - z[f'logits_{weights}'][..., :1000]).max() < 1e-4
    logp = jax.nn.log_softmax(logits, axis=-1)
    assert np.abs(logp - z[f'logp_{weights}'][..., :1000]).max() < 1e-4
    counted = z['nll_mask'] > 0  # padding (id 1000) is never scored
    target = np.where(counted, z['targets'], 0)
    nll = -np.take_along_axis(np.asarray(logp), target[..., None], -1)[..., 0]
    assert np.abs(np.where(counted, nll, 0) - z[f'nll_{weights}']).max() < 1e-4


def test_a_config_that_cannot_hold_the_file_names_the_tensor_and_both_shapes():
  with pytest.raises(convert.ConversionError,
                     match=r"vocab_embed\.embedding.*\(33, 32\).*\(33, 48\)"):
    convert.load(PRIME, fixture_config(2, dim=96))
  with pytest.raises(convert.ConversionError, match=r'trained with ℓ = 2'):
    convert.load(PRIME, fixture_config(4))
  with pytest.raises(convert.ConversionError, match=r'trained with ℓ = 1'):
    convert.load(MDLM, fixture_config(2))
  with pytest.raises(convert.ConversionError, match='image'):
    convert.load(str(FIXTURES / 'image_prime_l2.pth'), fixture_config(2))


def _zip_with_pickle(tmp_path, payload: bytes):
  path = tmp_path / 'evil.ckpt'
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('archive/data.pkl', payload)
  return str(path)


class _Evil:
  def __reduce__(self):
    return (os.system, ('echo pwned',))


def test_a_pickle_that_asks_to_run_code_is_refused(tmp_path):
  with pytest.raises(torchfile.UnsafePickleError, match=r'system'):
    torchfile.read(_zip_with_pickle(tmp_path, pickle.dumps({'x': _Evil()}, protocol=2)))
  evil = b'\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.'
  with pytest.raises(torchfile.UnsafePickleError, match=r'builtins\.eval'):
    torchfile.read(_zip_with_pickle(tmp_path, evil))
  popen = b'\x80\x02csubprocess\nPopen\nX\x02\x00\x00\x00ls\x85R.'
  with pytest.raises(torchfile.UnsafePickleError, match=r'subprocess\.Popen'):
    torchfile.read(_zip_with_pickle(tmp_path, popen))
  assert main_rc(['import', '--checkpoint', _zip_with_pickle(tmp_path, evil), '--config',
                  'configs/official.py:setup=results_prime_l2_owt', '--workdir',
                  str(tmp_path / 'w')]) == 2
  assert not (tmp_path / 'w' / 'checkpoints').exists()


def main_rc(argv) -> int:
  return cli.main(argv)


def test_unknown_classes_become_inert_stubs_and_the_authors_config_is_read():
  with torchfile.TorchFile(PRIME) as f:
    hp = f.root['hyper_parameters']
    assert isinstance(hp['tokenizer'], torchfile.Stub)
    assert hp['tokenizer'].qualname.endswith('GPT2TokenizerFast')
    fc = text.file_config(f.root)
  assert fc['prime'] == {'target_length': 2, 'base': 32, 'vocab_size': 1000, 'seq_length': 32,
                         'carry_over': True}
  assert fc['time_conditioning'] is False and fc['backbone'] == 'dit'


def test_a_truncated_file_fails_clearly(tmp_path):
  data = open(PRIME, 'rb').read()
  for cut in (len(data) // 2, len(data) - 100):
    path = tmp_path / f'cut{cut}.ckpt'
    path.write_bytes(data[:cut])
    with pytest.raises(torchfile.FormatError, match=r'truncated|damaged'):
      convert.load(str(path), fixture_config(2))


def test_reader_equals_torch_load_on_every_tensor():
  ref = torch.load(str(FIXTURES / 'image_prime_l2.pth'), map_location='cpu', weights_only=False)
  ours = torchfile.read(str(FIXTURES / 'image_prime_l2.pth'))
  assert list(ours['model']) == list(ref['model'])
  for k, v in ref['model'].items():
    np.testing.assert_array_equal(ours['model'][k], v.numpy())
  state = ref['optimizer']['state'][0]
  np.testing.assert_array_equal(ours['optimizer']['state'][0]['exp_avg'],
                                state['exp_avg'].numpy())


def test_import_into_a_workdir_then_export_round_trips_bit_identically(tmp_path):
  cfg = fixture_config(2)
  work = str(tmp_path / 'w')
  out = convert.import_checkpoint(PRIME, cfg, work)
  assert out['step'] == 1 and json.load(open(f'{work}/converted.json'))['weights'] == 'ema'
  exp = build.experiment(cfg)
  _, abstract, _ = build.abstract_params(exp.make_model)
  ema, step = checkpoint_lib.restore_params(work, abstract, which='ema')
  raw, _ = checkpoint_lib.restore_params(work, abstract, which='params')
  with torchfile.TorchFile(PRIME) as f:
    their_ema = [t.numpy() for t in f.root['ema']['shadow_params']]
    their_raw = collections.OrderedDict((k, t.numpy()) for k, t in f.root['state_dict'].items())
  assert step == 1
  np.testing.assert_array_equal(np.asarray(ema['embed']['table'][...]), their_ema[0])
  np.testing.assert_array_equal(np.asarray(raw['embed']['table'][...]),
                                their_raw['backbone.vocab_embed.embedding'])
  with pytest.raises(FileExistsError, match='new --workdir'):
    convert.import_checkpoint(PRIME, cfg, work)

  exported = str(tmp_path / 'exported.ckpt')
  assert main_rc(['export', '--workdir', work, '--out', exported]) == 0  # config.json is read
  # torch itself reads it (no pickled classes: weights_only=True suffices) ...
  theirs = torch.load(exported, map_location='cpu', weights_only=True)
  assert list(theirs['state_dict']) == list(their_raw)  # the authors' key order, buffer included
  for k, v in theirs['state_dict'].items():
    np.testing.assert_array_equal(v.numpy(), their_raw[k])
  assert len(theirs['ema']['shadow_params']) == len(their_ema)
  for a, b in zip(theirs['ema']['shadow_params'], their_ema):
    np.testing.assert_array_equal(a.numpy(), b)
  assert theirs['global_step'] == 1
  assert theirs['loops']['fit_loop']['epoch_loop.batch_progress']['current']['completed'] == 1
  # ... and importing the export gives the same weights, bit for bit.
  again = str(tmp_path / 'again')
  assert main_rc(['import', '--checkpoint', exported, '--config',
                  f'{work}/config.json', '--workdir', again]) == 0
  ema2, _ = checkpoint_lib.restore_params(again, abstract, which='ema')
  raw2, _ = checkpoint_lib.restore_params(again, abstract, which='params')
  for a, b in zip(jax.tree.leaves(ema) + jax.tree.leaves(raw),
                  jax.tree.leaves(ema2) + jax.tree.leaves(raw2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_scanned_layers_convert_to_the_same_model():
  z = _npz(PRIME)
  cfg = fixture_config(2).copy_and_resolve_references()
  with cfg.unlocked():
    cfg.model.scan_layers = True
  logits = np.asarray(convert.load(PRIME, cfg)(z['ids'].reshape(2, 32, 2)))
  assert np.abs(logits - z['logits_ema']).max() < 1e-4


def test_a_v2_permutation_file_shuffles_the_codec(tmp_path):
  perm = torch.randperm(1024, generator=torch.Generator().manual_seed(0))
  path = str(tmp_path / 'perm_1.0_1024.pt')
  torch.save(perm, path)
  cfg = fixture_config(10).copy_and_resolve_references()
  with cfg.unlocked():
    cfg.diffusion.permutation_file = path
  codec = build.experiment(cfg).codec
  assert codec.shuffled and codec.base == 2
  np.testing.assert_array_equal(codec.codes, perm.numpy()[:1000])
  torch.save({'not': 'a tensor'}, path)
  with pytest.raises(ValueError, match='permutation_file'):
    build.experiment(cfg)


@pytest.mark.slow
def test_a_model_trained_here_exports_and_evaluates_the_same_after_import(tmp_path):
  """Train (2 steps) -> export to the authors' format -> import into a new workdir -> --mode eval
  gives the same numbers as on the original workdir."""
  from prime_jax import evaluate, train
  from tests.test_train import tiny_config
  cfg = tiny_config(**{'model.rope_base': 10000.0, 'model.distance_bias_slope': 0.0,
                       'train.num_steps': 2, 'train.eval_every': 2, 'train.ckpt_every': 2})
  cfg.lock()
  work, again = str(tmp_path / 'trained'), str(tmp_path / 'imported')
  train.train_and_evaluate(cfg, work)
  exported = str(tmp_path / 'trained.ckpt')
  convert.export_checkpoint(work, exported)
  convert.import_checkpoint(exported, cfg, again)
  exp = build.experiment(cfg)
  a, b = evaluate.run_eval(exp, work), evaluate.run_eval(exp, again)
  assert a['step'] == b['step'] == 2
  assert a['results'][0]['nll'] == b['results'][0]['nll']
  with pytest.raises(convert.ConversionError, match='distance penalty'):
    convert.export_checkpoint(work, exported, tiny_config())  # the sotu default has one
