"""The composition root: prime_jax.build reads the config once, turns it into objects, and
refuses what cannot run with an error that names the field; configs.base.parse_arg reads config
arguments."""

import os
import subprocess
import sys

import jax
import pytest
from flax import nnx

from configs import base, cifar10, fashion_mnist, sotu
from prime_jax import build
from prime_jax.kernels import head

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sotu(**overrides):
  cfg = sotu.get_config()
  cfg.update_from_flattened_dict(overrides)
  return cfg


def test_config_argument_refuses_unknown_keys_and_bad_values():
  """configs.base.parse_arg: 'key=value' pairs over declared defaults, each converted to its
  default's type; an unknown key or a badly typed value is a ValueError naming the key."""
  assert base.parse_arg('', ell=2, objective='paper') == {'ell': 2, 'objective': 'paper'}
  assert base.parse_arg('ell=4,objective=nelbo', ell=2, objective='paper') == {
      'ell': 4, 'objective': 'nelbo'}
  assert base.parse_arg('on=false,x=0.5', on=True, x=1.0) == {'on': False, 'x': 0.5}
  cfg = sotu.get_config('ell=1,objective=nelbo')
  assert (cfg.diffusion.ell, cfg.diffusion.objective) == (1, 'nelbo')
  with pytest.raises(ValueError, match='foo'):
    sotu.get_config('foo=1')
  with pytest.raises(ValueError, match='ell'):
    sotu.get_config('ell=two')
  with pytest.raises(ValueError, match='ell'):
    cifar10.get_config('ell=2.5')
  with pytest.raises(ValueError, match='ell'):
    base.parse_arg('ell', ell=2)  # no '=': not key=value
  with pytest.raises(ValueError, match='on'):
    base.parse_arg('on=maybe', on=True)
  # From the command line: the run stops at the config, naming the key.
  out = subprocess.run([sys.executable, '-m', 'prime_jax.main', '--config',
                        'configs/sotu.py:foo=1', '--mode', 'bench'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and 'foo' in out.stderr, out.stderr[-2000:]


def test_model_and_data_must_agree():
  cfg = fashion_mnist.get_config()
  cfg.unlock()
  cfg.data.source = 'sotu'
  with pytest.raises(ValueError, match='does not fit'):
    build.experiment(cfg)


@pytest.mark.parametrize('field,value,match', [
    ('diffusion.objective', 'elbo', 'diffusion.objective'),
    ('model.name', 'mlp', 'model.name'),
    ('model.dtype', 'float16', 'model.dtype'),
    ('model.init.head_bias', 'zeros', 'model.init.head_bias'),
    ('optim.schedule', 'linear', 'optim.schedule'),
    ('eval.num_t', 0, 'eval.num_t'),
    ('eval.t_grid', '0.1,half', 'eval.t_grid'),
    ('sample.num_samples', 0, 'sample.num_samples'),
])
def test_impossible_settings_name_the_field(field, value, match):
  with pytest.raises(ValueError, match=match):
    build.experiment(_sotu(**{field: value}))


def test_the_config_becomes_objects():
  exp = build.experiment(_sotu(**{'eval.sets': 'moby_dick, wikitext2:test',
                                  'eval.t_grid': '0.5,0.1', 'sample.steps': 0,
                                  'eval.batch_size': 0}))
  c = exp.codec
  assert (c.vocab_size, c.ell, c.base) == (50257, 2, 225) and exp.token_shape == (64,)
  assert exp.task.objective == 'paper' and exp.task.carry_over and not exp.task.image
  assert exp.task.schedule.name == 'loglinear' and exp.task.schedule.eps == pytest.approx(1e-3)
  # The head kernel's expected shares come from the schedule (2/3 of the rows need a logit).
  assert exp.task.compaction == head.Compaction.expected(exp.task.schedule, 2, 1e-3)
  assert exp.sample.steps == 64  # 0: the sequence length
  assert exp.eval.batch_size == exp.data.batch_size == 32  # 0: data.batch_size
  assert exp.eval.sets == (('moby_dick', 'all'), ('wikitext2', 'test'))
  assert exp.eval.t_grid == (0.5, 0.1)
  assert exp.head_bias == 'unigram' and exp.image_sampler is None
  model = exp.make_model(rngs=nnx.Rngs(0))
  assert model.dim == 128 and model.rope_base == 30.0 and model.distance_bias_slope == 2.0


def test_the_task_on_a_mesh_keeps_compaction():
  """The head kernel runs per batch shard on the task's mesh, so its row compaction stays on for
  every mesh (tests/kernels/test_head.py: sharded = unsharded)."""
  exp = build.experiment(_sotu(**{'data.batch_size': 8, 'eval.batch_size': 8}))
  for n in (1, 8):
    mesh = exp.mesh(jax.devices()[:n])
    task = exp.task_on(mesh)
    assert task.compaction == exp.task.compaction is not None and task.mesh is mesh
  with pytest.raises(ValueError, match='divisible'):
    build.experiment(_sotu(**{'data.batch_size': 6})).mesh(jax.devices()[:8])
