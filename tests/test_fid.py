"""--mode fid end to end on a micro image run: train, sample with the paper's sampler, FID, grid."""

import json
import os

import numpy as np
import pytest

from configs import sotu
from prime_jax import build, evaluate, fid
from prime_jax import train as train_lib
from tests.metrics.test_writer import read_events
from tests.test_image_runs import tiny_config


def _fid_config(**overrides):
  return tiny_config(**{'sampler.num_steps': 4, 'sample.fid_ref_images': 8, **overrides})


@pytest.fixture(scope='module')
def image_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('fid') / 'run')
  cfg = _fid_config(**{'train.num_steps': 2, 'train.eval_every': 2, 'train.ckpt_every': 2})
  train_lib.train_and_evaluate(cfg, workdir)
  return cfg, workdir


@pytest.mark.slow  # trains the micro run (module fixture)
def test_fid_mode_micro(image_run):
  _, workdir = image_run
  exp = build.experiment(_fid_config(**{'sample.num_samples': 4, 'sample.batch_size': 2}))
  s = fid.run_fid(exp, workdir)
  assert np.isfinite(s['fid']) and s['fid'] > 0
  assert s['num_samples'] == 4 and s['num_steps'] == 4 and 0 < s['nfe_per_batch'] <= 4
  assert s['reference'] == 'fashion_mnist train, 8 images'
  assert 'unavailable' in s['inception_score'] and s['sampler']['precision'] == 'fp64'
  assert os.path.basename(s['file']).startswith('fid_step2_n4_T4')
  with open(s['file']) as f:
    assert json.load(f)['fid'] == pytest.approx(s['fid'])
  assert os.path.getsize(s['grid']) > 100
  # The grid and the FID in the run's TensorBoard log, at the checkpoint's step.
  shown = {t: (step, v) for t, step, v in read_events(os.path.join(workdir, 'tensorboard'))
           if t.startswith('mode_fid/')}
  (tag,) = [t for t, (_, v) in shown.items() if isinstance(v, np.ndarray)]
  step, grid = shown[tag]
  assert step == 2 and grid.shape[:2] == (2 + 30, 2 + 8 * 30)  # 4 images of 28 x 28, 8 a row
  assert shown[tag + '/fid'] == (2, pytest.approx(s['fid']))


@pytest.mark.slow  # trains the micro run (module fixture)
def test_fid_mode_inpainting_keeps_the_given_half(image_run):
  _, workdir = image_run
  exp = build.experiment(_fid_config(**{'sample.num_samples': 2, 'sample.batch_size': 2,
                                        'sample.inpaint': True}))
  s = fid.run_fid(exp, workdir, step=2)  # raises if a conditioned pixel changed
  assert s['inpaint'] and np.isfinite(s['fid']) and s['step'] == 2


@pytest.mark.slow  # trains the micro run (module fixture)
def test_image_eval_mode_reports_bpd(image_run):
  cfg, workdir = image_run
  out = evaluate.run_eval(build.experiment(cfg), workdir)
  r = out['results'][0]
  assert 0 < r['bpd'] < 9 and r['bpd'] == pytest.approx(r['nll'] / np.log(2))
  assert r['weights'] == 'ema' and r['examples'] == 16 and r['step'] == 2
  with open(out['file']) as f:
    assert json.load(f)['results'][0]['bpd'] == pytest.approx(r['bpd'])


def test_fid_mode_refuses_text_configs(tmp_path):
  with pytest.raises(ValueError, match='needs an image config'):
    fid.run_fid(build.experiment(sotu.get_config()), str(tmp_path))
  with pytest.raises(ValueError, match='at least 2 samples'):
    fid.run_fid(build.experiment(_fid_config(**{'sample.num_samples': 1})), str(tmp_path))
