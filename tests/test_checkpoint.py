"""A damaged newest checkpoint: training falls back to the newest readable step and reaches the same
weights; eval/sample/fid get one paragraph naming the step, the file and the other steps."""

import os

import jax
import numpy as np
import pytest

from prime_jax import build, train
from prime_jax import checkpoint as checkpoint_lib
from tests.test_train import tiny_config


def _truncate_arrays(directory: str) -> None:
  """Cuts every array data file of a checkpoint to 100 bytes: a copy that stopped early."""
  for d, _, files in os.walk(directory):
    if os.path.basename(d) == 'd':
      for f in files:
        with open(os.path.join(d, f), 'r+b') as fh:
          fh.truncate(100)


def test_a_truncated_newest_checkpoint_falls_back_and_is_named(tmp_path, capsys):
  cfg = tiny_config(**{'train.num_steps': 4, 'train.ckpt_every': 2, 'train.eval_every': 100,
                       'train.keep_ckpts': 5})
  work = str(tmp_path / 'run')
  train.train_and_evaluate(cfg, work)
  exp = build.experiment(cfg)
  _, abstract, _ = build.abstract_params(exp.make_model)
  good, step = checkpoint_lib.restore_params(work, abstract, which='params')
  assert step == 4

  _truncate_arrays(os.path.join(work, 'checkpoints', '4', 'state'))
  with pytest.raises(checkpoint_lib.DamagedCheckpointError) as err:
    checkpoint_lib.restore_params(work, abstract, which='params')
  message = str(err.value)
  assert 'step 4' in message and 'steps [2]' in message and '--step N' in message
  assert 'checkpoints/4' in message and 'Error reading' in message  # the file that failed
  restored, step = checkpoint_lib.restore_params(work, abstract, step=2, which='params')
  assert step == 2

  # Training skips step 4 with a warning, resumes from step 2 and retrains steps 3 and 4: the
  # same weights as before (randomness and data order are functions of the step).
  capsys.readouterr()
  train.train_and_evaluate(cfg, work)
  out = capsys.readouterr().out
  assert 'checkpoint of step 4' in out and 'resuming from step 2 instead' in out
  assert any(n.startswith('4.damaged-') for n in os.listdir(os.path.join(work, 'checkpoints')))
  again, step = checkpoint_lib.restore_params(work, abstract, which='params')
  assert step == 4
  for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  del restored
