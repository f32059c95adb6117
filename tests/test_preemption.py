"""SIGTERM and SIGINT end a real training process after the current step with a checkpoint and exit
128 + signum; the same command resumes it to the same parameters as a run never interrupted."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import sotu
from prime_jax import build, preemption
from prime_jax import checkpoint as checkpoint_lib
from prime_jax import train as train_lib
from prime_jax.metrics import writer as writer_lib
from tests.metrics.test_writer import read_events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
# No periodic checkpoint before the end: the stop's checkpoint is the only one.
RUN = {'model.dim': 32, 'model.num_heads': 2, 'model.num_layers': 2, 'model.dropout': 0.1,
       'data.seq_len': 32, 'data.batch_size': 8, 'eval.batch_size': 8, 'eval.num_batches': 1,
       'train.num_steps': STEPS, 'train.log_every': 1, 'train.eval_every': 1000,
       'train.ckpt_every': 1000}


def _start(workdir):
  cmd = [sys.executable, '-m', 'prime_jax.main', '--config', 'configs/sotu.py', '--workdir',
         str(workdir), *(f'--config.{k}={v}' for k, v in RUN.items())]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _final_state(workdir):
  cfg = sotu.get_config()
  cfg.update_from_flattened_dict(RUN)
  tr = train_lib.Trainer(build.experiment(cfg), devices=jax.devices()[:1])
  ckpt = checkpoint_lib.Checkpointer(str(workdir))
  assert ckpt.latest_step() == STEPS
  state, _ = ckpt.restore(tr.abs_state)
  ckpt.close()
  return jax.device_get(state)


def _losses(workdir):
  rows = [r for r in writer_lib.read_jsonl(workdir / 'metrics.jsonl') if 'train/loss' in r]
  return [(r['step'], r['train/loss']) for r in rows]


@pytest.mark.slow  # three real training processes (~1 min on 2 cores)
def test_sigterm_checkpoints_the_step_and_the_same_command_resumes_bit_for_bit(tmp_path):
  ref = _start(tmp_path / 'ref')
  run = _start(tmp_path / 'run')
  seen = []
  for line in run.stdout:  # signalled after step 3, long before the end
    seen.append(line)
    if line.startswith('step       3/'):
      run.send_signal(signal.SIGTERM)
    if 'SIGTERM received:' in line:
      run.send_signal(signal.SIGINT)  # a second signal while stopping is only acknowledged
      break
  out = ''.join(seen) + run.communicate(timeout=300)[0]
  assert run.returncode == 128 + signal.SIGTERM == 143, out
  assert 'SIGINT received again: saving the checkpoint, please wait' in out
  ckpt_dir = tmp_path / 'run' / 'checkpoints'
  (stopped,) = [int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()]
  assert 3 <= stopped < STEPS
  assert (f'Stopped by SIGTERM after step {stopped}/{STEPS}; its checkpoint is in {ckpt_dir}. Run '
          'the same command again to resume from it. Exit status 143 (128 + SIGTERM).') in out
  assert 'Traceback' not in out
  resumed = _start(tmp_path / 'run')
  out = resumed.communicate(timeout=300)[0]
  assert resumed.returncode == 0, out
  assert f'Resumed from step {stopped}' in out
  ref_out = ref.communicate(timeout=300)[0]
  assert ref.returncode == 0, ref_out
  # Randomness and data order are functions of the step: the same trajectory, bit for bit.
  want, got = _final_state(tmp_path / 'ref'), _final_state(tmp_path / 'run')
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(a, b)
  assert _losses(tmp_path / 'run') == _losses(tmp_path / 'ref')  # each step logged once
  shown = sorted(s for tag, s, _ in read_events(tmp_path / 'run' / 'tensorboard')
                 if tag == 'train/loss')
  assert shown == list(range(1, STEPS + 1))


def test_stop_request_agrees_across_processes_one_step_late(monkeypatch):
  """The multi-process path on this process's 8 devices: the flags are reduced on the devices and
  read one call later, so every process stops at the same step; the signal's number comes along."""
  with preemption.StopRequest(sync=True) as stop:
    assert signal.getsignal(signal.SIGTERM) == stop._handle
    assert not stop.should_stop() and not stop.should_stop()
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.signum == signal.SIGTERM
    assert not stop.should_stop()  # dispatched now, read at the next call
    assert stop.should_stop() and stop.signum == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
  # What SIGINT did before (Python's KeyboardInterrupt; ignored when started in the background).
  before = signal.getsignal(signal.SIGINT)
  with preemption.StopRequest() as stop:  # one process: at once
    assert not stop.should_stop()
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.should_stop() and stop.signum == signal.SIGINT
  assert signal.getsignal(signal.SIGINT) == before
