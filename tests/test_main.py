"""The command line: a user's mistake prints one line and exits 2, a bug keeps its traceback."""

import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from prime_jax import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  out = subprocess.run([sys.executable, '-m', 'prime_jax.main', *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  return out.returncode, out.stderr.strip()


@pytest.mark.parametrize('args,expected', [
    (('--config', 'configs/sotu.py', '--config.model.dimm=3', '--mode', 'bench'),
     "unknown config field 'model.dimm': model has no field 'dimm'; did you mean model.dim"),
    (('--config', 'configs/sotu.py', '--config.modell.dim=3', '--mode', 'bench'),
     "the config has no field 'modell'; did you mean model?"),
    (('--config', 'configs/nope.py', '--mode', 'bench'),
     "cannot read the config file 'configs/nope.py'"),
    (('--config', 'configs/sotu.py:elll=2', '--mode', 'bench'),
     "Config argument 'elll=2': expected key=value with a key among ['ell', 'objective']"),
    (('--config', 'configs/sotu.py:ell=0', '--mode', 'bench'),
     'ell (sub-tokens per token) must be >= 1, got 0.'),
    (('--config', 'configs/sotu.py', '--mode', 'foo'),
     'flag --mode=foo: value should be one of'),
    (('--mode', 'eval', '--workdir', '/nonexistent/run'),
     '--config is not given and /nonexistent/run/config.json does not exist'),
    (('--config', 'configs/sotu.py', '--mode', 'eval', '--workdir', '/nonexistent/run'),
     'No checkpoint in /nonexistent/run/checkpoints'),
])
def test_user_mistakes_print_one_line_and_exit_2(args, expected):
  rc, err = _run(*args)
  assert rc == 2, err
  assert len(err.splitlines()) == 1 and err.startswith('error: '), err
  assert expected in err


def test_only_our_own_raises_count_as_user_errors():
  def raised(fn):
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      return e
    raise AssertionError('did not raise')

  from prime_jax import build
  from tests.test_train import tiny_config
  ours = raised(lambda: build.experiment(tiny_config(**{'model.dtype': 'float16'})))
  assert main._is_user_error(ours)  # pylint: disable=protected-access
  # A ValueError deep inside jax (an unequal split): a bug, it keeps its traceback.
  theirs = raised(lambda: jnp.split(jnp.zeros(5), 2))
  assert isinstance(theirs, ValueError) and not main._is_user_error(theirs)  # pylint: disable=protected-access
  assert not main._is_user_error(KeyError('x'))  # pylint: disable=protected-access
