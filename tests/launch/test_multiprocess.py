"""True multi-process training: 2 processes x 4 CPU devices (jax.distributed over 127.0.0.1, gloo
collectives), started the way launchers start them (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID), against 1 process x 8 devices: the same loss trajectory and weights; the 2-process
checkpoint then restores in 1 process."""

import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from prime_jax import build
from prime_jax import checkpoint as checkpoint_lib
from tests.test_train import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERRIDES = {'model.dim': 32, 'model.num_heads': 2, 'model.num_layers': 2, 'model.dropout': 0.1,
             'data.seq_len': 32, 'data.batch_size': 8, 'diffusion.objective': 'nelbo',
             'eval.batch_size': 8, 'eval.num_batches': 2, 'train.num_steps': 4,
             'train.log_every': 1, 'train.eval_every': 4, 'train.ckpt_every': 2,
             'optim.warmup_steps': 2, 'mesh.data': -1}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _command(workdir: str) -> list[str]:
  return ([sys.executable, '-m', 'prime_jax.main', '--config', 'configs/sotu.py:ell=2',
           '--workdir', workdir]
          + [f'--config.{k}={v}' for k, v in OVERRIDES.items()])


def _losses(out: str) -> list[str]:
  return re.findall(r'step +\d+/\d+ loss (\S+)', out)


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  port = _free_port()
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  procs = []
  for pid in range(2):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
               JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
               JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen(_command(multi), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  one = subprocess.run(_command(single), cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
  assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]

  assert len(_losses(outs[0])) == 4
  assert _losses(outs[0]) == _losses(one.stdout)  # process 0 logs; the trajectory is the same
  assert 'devices=8' in outs[0]

  # The 2-process checkpoint restores in this single process (8 devices), equal to 1 x 8's.
  cfg = tiny_config(**{k: v for k, v in OVERRIDES.items()})
  exp = build.experiment(cfg)
  _, abstract, _ = build.abstract_params(exp.make_model)
  a, step_a = checkpoint_lib.restore_params(multi, abstract, which='params')
  b, step_b = checkpoint_lib.restore_params(single, abstract, which='params')
  assert step_a == step_b == 4
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
