"""End-to-end training: sharded step == single device, real SOTU steps, kill + resume,
re-meshing."""

import functools
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import sotu
from prime_jax import build, optim
from prime_jax import checkpoint as checkpoint_lib
from prime_jax import train as train_lib
from prime_jax.metrics import writer as writer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  cfg = sotu.get_config('ell=2')
  cfg.model.dim, cfg.model.num_heads, cfg.model.num_layers = 32, 2, 2
  cfg.model.dropout = 0.1
  cfg.data.seq_len, cfg.data.batch_size = 32, 8
  cfg.diffusion.objective = 'nelbo'  # the default embedded config trains on 'paper'
  cfg.eval.batch_size, cfg.eval.num_batches = 8, 2
  cfg.train.num_steps, cfg.train.log_every, cfg.train.eval_every = 6, 1, 6
  cfg.train.ckpt_every = 3
  cfg.optim.warmup_steps = 2
  cfg.mesh.data = -1
  cfg.update_from_flattened_dict(overrides)
  return cfg


def trainer(cfg, devices=None):
  return train_lib.Trainer(build.experiment(cfg), devices=devices)


def _step_once(cfg, devices, batch_np):
  tr = trainer(cfg, devices)
  exp = tr.exp  # no head-bias prior: the same zero-bias start on every mesh
  state = train_lib.init_state(exp.make_model, exp.loop.seed, tr.tx, tr.shardings)
  state, m = tr.train_step(state, tr.global_batch({'tokens': batch_np}))
  state, m = tr.train_step(state, tr.global_batch({'tokens': batch_np[::-1].copy()}))
  return jax.device_get(state.params), jax.device_get(m)


@pytest.mark.parametrize('schedule', ['constant', 'cosine'])
@pytest.mark.parametrize('warmup,num_steps', [(0, 1), (0, 10), (5, 3), (5, 5)])
def test_lr_schedule_builds_for_runs_shorter_than_the_warmup(schedule, warmup, num_steps):
  cfg = tiny_config(**{'optim.schedule': schedule, 'optim.warmup_steps': warmup})
  _, lr = optim.make_optimizer(build.experiment(cfg).optim, num_steps)
  values = np.array([float(lr(i)) for i in range(num_steps + 2)])
  assert values[0] == 0.0 and np.all(np.isfinite(values))
  assert values.max() <= cfg.optim.lr * (1 + 1e-6)
  assert float(lr(max(warmup, 1))) == pytest.approx(cfg.optim.lr, rel=1e-6)  # the peak, once warm


def test_sharded_step_matches_single_device():
  assert jax.device_count() == 8
  batch = np.random.default_rng(0).integers(0, 50257, size=(8, 32)).astype(np.int32)
  one_p, one_m = _step_once(tiny_config(), jax.devices()[:1], batch)
  cfg8 = tiny_config(**{'mesh.data': 4, 'mesh.fsdp': 2})
  tr8 = trainer(cfg8)
  assert dict(tr8.mesh.shape) == {'data': 4, 'fsdp': 2, 'tensor': 1}
  # fsdp really shards parameters: some are split over the 'fsdp' axis.
  specs = [s.spec for s in jax.tree.leaves(tr8.shardings.params)]
  assert any('fsdp' in str(sp) for sp in specs)
  eight_p, eight_m = _step_once(cfg8, None, batch)
  np.testing.assert_allclose(eight_m['loss'], one_m['loss'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one_p), jax.tree.leaves(eight_p)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_batch_not_divisible_by_data_parallel_size():
  with pytest.raises(ValueError, match='data-parallel'):
    trainer(tiny_config(**{'data.batch_size': 6}))


def test_token_ids_out_of_range_are_an_error():
  tr = trainer(tiny_config(), jax.devices()[:1])
  with pytest.raises(ValueError, match='outside'):
    tr.global_batch({'tokens': np.full((8, 32), 50257)})


def test_model_dim_not_divisible_by_ell():
  with pytest.raises(ValueError, match='divisible'):
    trainer(tiny_config(**{'diffusion.ell': 3}))


@pytest.mark.slow  # real runs through main.py
def test_real_sotu_training_steps_checkpoint_and_remesh(tmp_path):
  cfg = tiny_config()
  summary = train_lib.train_and_evaluate(cfg, str(tmp_path), devices=jax.devices()[:1])
  rows = writer_lib.read_jsonl(tmp_path / 'metrics.jsonl')
  train_rows = [r for r in rows if 'train/loss' in r]
  assert [r['step'] for r in train_rows] == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(r['train/loss']) for r in train_rows)
  assert np.isfinite(summary['nll']) and summary['ppl_bound'] > 1
  assert summary['paper_objective'] > 0
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path))
  assert ckpt.latest_step() == 6
  # Restore onto a different mesh (8 devices, data x fsdp = 2 x 4) and compare parameters.
  cfg8 = tiny_config(**{'mesh.data': 2, 'mesh.fsdp': 4})
  tr1 = trainer(cfg, jax.devices()[:1])
  tr8 = trainer(cfg8)
  s1, _ = ckpt.restore(tr1.abs_state)
  s8, _ = ckpt.restore(tr8.abs_state)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert {str(x.sharding.spec) for x in jax.tree.leaves(s8.params)} != {'PartitionSpec()'}
  # A checkpoint that does not match the config is a clear error.
  tr_big = trainer(tiny_config(**{'model.dim': 64}), jax.devices()[:1])
  with pytest.raises(ValueError, match='does not match this config'):
    ckpt.restore(tr_big.abs_state)
  ckpt.close()


def _launch(workdir, steps, extra=()):
  cmd = [sys.executable, '-m', 'prime_jax.main', '--config', 'configs/sotu.py', '--workdir',
         str(workdir), '--config.model.dim=32', '--config.model.num_heads=2',
         '--config.model.num_layers=2', '--config.data.seq_len=32', '--config.data.batch_size=8',
         '--config.eval.batch_size=8', '--config.eval.num_batches=1',
         f'--config.train.num_steps={steps}',
         '--config.train.log_every=1', '--config.train.eval_every=1000',
         '--config.train.ckpt_every=4', '--config.model.dropout=0.1',
         '--config.optim.schedule=constant', *extra]  # constant lr: num_steps does not matter
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _losses(workdir):
  out = {}
  for r in writer_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl')):
    if 'train/loss' in r:
      out[r['step']] = r['train/loss']  # a resumed run overwrites the killed run's rows
  return out


@pytest.mark.slow  # real runs through main.py
def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
  steps = 14
  ref = _launch(tmp_path / 'ref', steps)
  killed = _launch(tmp_path / 'killed', 400)  # would run far longer; killed once step 8 is saved
  ckpt_dir = tmp_path / 'killed' / 'checkpoints'
  deadline = time.time() + 300
  while time.time() < deadline:
    done = ([int(p.name) for p in ckpt_dir.glob('*') if p.name.isdigit()]
            if ckpt_dir.exists() else [])
    jsonl = tmp_path / 'killed' / 'metrics.jsonl'
    losses = _losses(tmp_path / 'killed') if jsonl.exists() else {}
    if 8 in done and max(losses, default=0) >= 10:
      break
    assert killed.poll() is None, killed.stdout.read()
    time.sleep(0.2)
  else:
    pytest.fail('the run never reached a checkpoint at step 8')
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  ref_out, _ = ref.communicate(timeout=600)
  assert ref.returncode == 0, ref_out
  resumed = _launch(tmp_path / 'killed', steps)
  out, _ = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, out
  assert 'Resumed from step' in out
  a, b = _losses(tmp_path / 'ref'), _losses(tmp_path / 'killed')
  assert sorted(a) == list(range(1, steps + 1)) and sorted(b) == list(range(1, steps + 1))
  for s in range(1, steps + 1):
    assert a[s] == pytest.approx(b[s], rel=1e-6, abs=1e-7), (s, a[s], b[s])
  summary = json.load(open(tmp_path / 'killed' / 'summary.json'))
  assert summary['steps'] == steps


def test_non_finite_loss_stops_loudly_and_keeps_the_last_good_checkpoint(tmp_path):
  # An absurd learning rate blows the parameters up within a few steps.
  cfg = tiny_config(**{'optim.lr': 1e30, 'optim.grad_clip': 0.0, 'optim.warmup_steps': 0,
                       'train.num_steps': 12, 'train.ckpt_every': 1})
  with pytest.raises(FloatingPointError, match='Non-finite'):
    train_lib.train_and_evaluate(cfg, str(tmp_path), devices=jax.devices()[:1])
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path))
  step = ckpt.latest_step()
  assert step is not None and step < 12
  tr = trainer(cfg, jax.devices()[:1])
  state, _ = ckpt.restore(tr.abs_state)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  assert (tmp_path / 'parameters.txt').read_text().count('kernel') > 3
  ckpt.close()


def test_training_loss_is_what_the_step_differentiates():
  """The step minimises the token mean of the configured objective's per-token losses on one draw
  (t, y_t) of losses.noisy_batch, and logs the token means of every per-token loss beside it
  (the plain part of the deleted self-normalisation test)."""
  from prime_jax import losses  # pylint: disable=import-outside-toplevel
  from prime_jax.diffusion import objectives  # pylint: disable=import-outside-toplevel
  batch = np.random.default_rng(3).integers(0, 50257, size=(8, 32)).astype(np.int32)
  _, m = _step_once(tiny_config(), jax.devices()[:1], batch)
  assert float(m['loss']) == pytest.approx(float(m['nelbo']), rel=1e-6)
  assert 'self_normalized' not in m
  tr = trainer(tiny_config(), jax.devices()[:1])
  state = tr.init_state()
  key = jax.random.key(5)
  loss, aux = jax.jit(losses.training_loss, static_argnums=(1, 4))(
      state.params, tr.graphdef, batch, key, tr.task)
  t_B, y_t, k_drop = losses.noisy_batch(batch, key, tr.task)
  per_token = jax.jit(functools.partial(losses.per_token_losses, graphdef=tr.graphdef,
                                        task=tr.task, train=True))(
      state.params, x0_BxS=batch, t_B=t_B, y_t=y_t, dropout_key=k_drop)
  np.testing.assert_allclose(loss, objectives.token_mean(per_token['nelbo']), rtol=1e-6)
  for k in ('nelbo', 'paper'):
    np.testing.assert_allclose(aux[k], objectives.token_mean(per_token[k]), rtol=1e-6)
  assert abs(float(aux['nelbo']) - float(aux['paper'])) > 1e-3  # the objectives differ (ell = 2)


def test_optimizer_head_group_is_the_models_head_params_with_its_own_b2():
  """optim.head_b2: the parameters the model declares as its head (models.layers.HeadParam: the
  DiT's final.head kernel and bias) follow Adam with b2 = head_b2, all others optim.b2. Each group
  equals a plain AdamW of its own over the same gradients (clipping on the whole tree). A model
  that declares no head (the UNet) is refused when head_b2 is set."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from prime_jax.models.layers import HeadParam  # pylint: disable=import-outside-toplevel
  # b1 = 0: the updates are g / sqrt(v), so they show the second moments alone.
  cfg = tiny_config(**{'optim.head_b2': 0.999, 'optim.b2': 0.9, 'optim.warmup_steps': 0,
                       'optim.b1': 0.0})
  exp = build.experiment(cfg)
  params = nnx.state(exp.make_model(rngs=nnx.Rngs(0)), nnx.Param)
  # One label per parameter (the labels replace the Variables), keyed by the parameter's path.
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  labels = dict(zip(paths, jax.tree.leaves(optim.head_labels(params))))
  assert set(labels.values()) == {'head', 'trunk'}
  assert sorted(k for k, v in labels.items() if v == 'head') == [
      "['final']['head']['bias'].value", "['final']['head']['kernel'].value"]
  # The group is declared by the parameter type, not by names.
  declared = jax.tree.leaves(jax.tree.map(lambda v: isinstance(v, HeadParam), params,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable)))
  assert [labels[k] == 'head' for k in paths] == declared
  tx, _ = exp.make_optimizer()
  update = {'mixed': jax.jit(tx.update)}
  plain_optim = {b2: build.experiment(tiny_config(**{
      'optim.head_b2': 0.0, 'optim.b2': b2, 'optim.warmup_steps': 0, 'optim.b1': 0.0})).optim
                 for b2 in (0.9, 0.999)}
  plain = {b2: optim.make_optimizer(o, 10)[0] for b2, o in plain_optim.items()}
  update.update({b2: jax.jit(t.update) for b2, t in plain.items()})
  states = {'mixed': tx.init(params), **{b2: t.init(params) for b2, t in plain.items()}}
  rng = np.random.default_rng(0)
  noise = [jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
           for _ in range(2)]
  for step in range(60):
    # Large on step 0, tiny after: where the two second-moment memories part most.
    scale = 1.0 if step == 0 else 1e-6  # (step 0 is clipped to global norm 1)
    grads = jax.tree.map(lambda x: scale * x, noise[step % 2])
    upd, states['mixed'] = update['mixed'](grads, states['mixed'], params)
    ref = {}
    for b2 in plain:
      ref[b2], states[b2] = update[b2](grads, states[b2], params)
    if step not in (0, 1, 59):
      continue
    for (path, u), r9, r999 in zip(jax.tree_util.tree_leaves_with_path(upd),
                                   jax.tree.leaves(ref[0.9]), jax.tree.leaves(ref[0.999])):
      want = r999 if labels[jax.tree_util.keystr(path)] == 'head' else r9
      np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-9)
  head_kernel = lambda tree: tree['final']['head']['kernel'][...]
  # The test can tell the groups apart: b2 = 0.9 has forgotten the large step, 0.999 has not.
  assert np.abs(head_kernel(ref[0.9])).mean() > 3 * np.abs(head_kernel(ref[0.999])).mean()
  with pytest.raises(ValueError, match='head_b2'):
    build.experiment(tiny_config(**{'optim.head_b2': 1.5}))
  # The UNet declares no head: head_b2 is refused (shapes only, nothing allocated).
  from configs import cifar10  # pylint: disable=import-outside-toplevel
  image = cifar10.get_config()
  image.optim.head_b2 = 0.999
  image_exp = build.experiment(image)
  _, abs_params, _ = train_lib.abstract_params(image_exp.make_model)
  with pytest.raises(ValueError, match='head_b2'):
    optim.head_labels(abs_params)
  with pytest.raises(ValueError, match='head_b2'):
    jax.eval_shape(image_exp.make_optimizer()[0].init, abs_params)
