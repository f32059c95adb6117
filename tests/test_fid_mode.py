"""--mode fid end to end on a micro image run: train, sample with the paper's sampler, FID, grid."""

import json
import os

import numpy as np
import pytest

from prime_jax import evaluate, evaluate_images
from prime_jax import train as train_lib
from tests.test_images import tiny_config


@pytest.fixture(scope='module')
def image_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('fid') / 'run')
  cfg = tiny_config(**{'train.num_steps': 2, 'train.eval_every': 2, 'train.ckpt_every': 2,
                       'sampler.num_steps': 4})
  train_lib.train_and_evaluate(cfg, workdir)
  return cfg, workdir


def test_fid_mode_micro(image_run):
  cfg, workdir = image_run
  s = evaluate_images.run_fid(cfg, workdir, num_samples=4, batch_size=2, ref_images=8)
  assert np.isfinite(s['fid']) and s['fid'] > 0
  assert s['num_samples'] == 4 and s['num_steps'] == 4 and 0 < s['nfe_per_batch'] <= 4
  assert s['reference'] == 'fashion_mnist train, 8 images'
  assert 'unavailable' in s['inception_score']
  with open(os.path.join(workdir, 'fid_step2_n4_T4.json')) as f:
    assert json.load(f)['fid'] == pytest.approx(s['fid'])
  assert os.path.getsize(s['grid']) > 100


def test_fid_mode_inpainting_keeps_the_given_half(image_run):
  cfg, workdir = image_run
  s = evaluate_images.run_fid(cfg, workdir, num_samples=2, batch_size=2, ref_images=8,
                              inpaint=True)  # raises if a conditioned pixel changed
  assert s['inpaint'] and np.isfinite(s['fid'])


def test_image_eval_mode_reports_bpd(image_run):
  cfg, workdir = image_run
  out = evaluate.run_eval(cfg, workdir)
  r = out['results'][0]
  assert 0 < r['bpd'] < 9 and r['bpd'] == pytest.approx(r['nll'] / np.log(2))


def test_fid_mode_refuses_text_configs(tmp_path):
  from tests.test_train import tiny_config as text_config
  with pytest.raises(ValueError, match='needs an image config'):
    evaluate_images.run_fid(text_config(), str(tmp_path))
