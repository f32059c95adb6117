"""The autoregressive baseline through the real pipeline: model.name='ar' trains on SOTU with
train_and_evaluate, reports its exact NLL ("PPL = exp(NLL)", never a bound), samples, and
configs it cannot run are refused by field."""

import io
import json
import math
import os
from contextlib import redirect_stdout

import jax
import numpy as np
import pytest

from configs import fashion_mnist
from prime_jax import build, evaluate, report, sample
from prime_jax import train as train_lib
from prime_jax.data.tokenizer import BOS_ID
from prime_jax.metrics import writer as writer_lib
from tests.test_train import tiny_config


def ar_config(**overrides):
  return tiny_config(**{'model.name': 'ar', 'diffusion.ell': 1, 'model.dropout': 0.0,
                        'train.num_steps': 8, 'train.eval_every': 8, 'train.ckpt_every': 8,
                        **overrides})


def test_ar_trains_evaluates_and_samples(tmp_path):
  cfg = ar_config()
  workdir = str(tmp_path / 'ar')
  one = jax.devices()[:1]  # the 8 fake CPU devices would each run the whole batch
  summary = train_lib.train_and_evaluate(cfg, workdir, devices=one)
  rows = [r for r in writer_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
          if 'train/loss' in r]
  loss = [r['train/loss'] for r in rows]
  assert len(loss) == 8 and np.all(np.isfinite(loss)) and loss[-1] < loss[0]
  assert all(r['train/nelbo'] == r['train/paper'] == r['train/loss'] for r in rows)
  # The evaluation: exact, over L - 1 predicted tokens per sequence, no control variate.
  assert summary['autoregressive'] and 'nll_cv' not in summary
  assert summary['ppl'] == pytest.approx(math.exp(summary['nll']))
  assert summary['tokens'] == summary['examples'] * (cfg.data.seq_len - 1)
  assert 0 < summary['nll_se'] < summary['nll'] < 12
  line = report.format_eval(summary)
  assert 'PPL = exp(NLL)' in line and '<=' not in line and 'bound' not in line
  out = io.StringIO()
  with redirect_stdout(out):
    report.print_summary(workdir, summary, source='sotu', ell=1, unigram_nll=7.0)
  assert 'autoregressive' in out.getvalue() and 'PPL = exp(NLL)' in out.getvalue()
  assert '<=' not in out.getvalue()

  # --mode eval on the checkpoint gives the same exact number (EMA weights both times).
  exp = build.experiment(cfg)
  evaluated = evaluate.run_eval(exp, workdir)
  res = evaluated['results'][0]
  assert res['nll'] == pytest.approx(summary['nll'], rel=1e-5) and res['num_t'] == 0
  assert 'PPL = exp(NLL)' in report.format_result(res)
  assert os.path.basename(evaluated['file']).startswith('eval_step8_')
  with open(evaluated['file']) as f:
    assert json.load(f)['results'][0]['autoregressive']

  # Ancestral sampling: unconditional from BOS, and after a kept prefix.
  r = evaluate.Restored(exp, workdir, devices=one)
  records, s = sample.sample_text(exp.data, r.task, r.graphdef, r.params, num_samples=2,
                                  batch_size=2, steps=5, nucleus_p=0.9, seed=0)
  assert [rec['tokens'][0] for rec in records] == [BOS_ID, BOS_ID]
  assert s['steps'] == s['nfe_per_batch'] == cfg.data.seq_len - 1 and s['precision'] == 'fp32'
  records, s = sample.sample_text(exp.data, r.task, r.graphdef, r.params, num_samples=2,
                                  batch_size=2, steps=5, prefix_len=4, seed=0)
  assert s['prefix_kept'] and s['steps'] == cfg.data.seq_len - 4
  assert all(len(rec['tokens']) == cfg.data.seq_len for rec in records)


@pytest.mark.parametrize('overrides,match', [
    ({'diffusion.ell': 2}, 'diffusion.ell must be 1'),
    ({'model.scan_layers': True}, 'model.scan_layers'),
    ({'model.time_conditioning': True}, 'model.time_conditioning'),
])
def test_impossible_ar_configs_name_the_field(overrides, match):
  with pytest.raises(ValueError, match=match):
    build.experiment(ar_config(**overrides))


def test_ar_on_images_is_refused():
  cfg = fashion_mnist.get_config()
  cfg.unlock()
  cfg.model.name = 'ar'
  cfg.diffusion.ell = 1
  with pytest.raises(ValueError, match="model.name='ar'.*is for text"):
    build.experiment(cfg)


def test_eval_time_grid_is_refused_for_ar(tmp_path):
  exp = build.experiment(ar_config(**{'eval.t_grid': '0.5'}))
  with pytest.raises(ValueError, match='t_grid'):
    evaluate.run_eval(exp, str(tmp_path))
