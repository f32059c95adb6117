"""launch/sweep_ell.py end to end on a micro config: trains, evaluates, samples, tabulates,
plots."""

import json
import os

import pytest

from launch import sweep_ell


@pytest.mark.slow  # trains and evaluates three micro runs
def test_sweep_micro(tmp_path):
  workdir = str(tmp_path / 'sweep')
  rc = sweep_ell.main([
      '--ells', '1,2', '--workdir', workdir, '--num_samples', '2', '--eval_batches', '1',
      '--bench_steps', '1', '--set', 'train.num_steps=2', '--set', 'model.dim=32',
      '--set', 'model.num_layers=1', '--set', 'data.seq_len=16', '--set', 'data.batch_size=8',
      '--set', 'eval.batch_size=8', '--set', 'eval.num_batches=1', '--set', 'train.eval_every=2'])
  assert rc == 0
  with open(os.path.join(workdir, 'sweep.json')) as f:
    rows = json.load(f)
  assert [r['ell'] for r in rows] == [1, 2] and [r['base'] for r in rows] == [50257, 225]
  for r in rows:
    assert r['ppl_bound'] > 1 and r['gen_ppl'] > 1 and 0 <= r['idle_fraction'] <= 1
    assert r['sampling_steps'] == 16 and 0 < r['nfe'] <= 17 and r['step_s'] > 0
  # Idle steps get rarer as ell grows: (1 - 1/T)^(L ell).
  assert rows[0]['expected_idle_fraction'] > rows[1]['expected_idle_fraction']
  md = open(os.path.join(workdir, 'sweep.md')).read()
  assert sum(line.startswith('| ') for line in md.splitlines()) == 3  # header + 2 rows
  assert 'SmolLM2' in md  # the scorer is named
  assert os.path.getsize(os.path.join(workdir, 'sweep.png')) > 10_000
  # A second call reuses the finished rows instead of retraining.
  assert sweep_ell.main(['--ells', '2', '--workdir', workdir, '--set', 'data.seq_len=16']) == 0
