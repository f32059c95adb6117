"""End-to-end training: sharded step == single device, real SOTU steps, kill + resume, re-meshing."""

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
from prime_jax import checkpoint as checkpoint_lib
from prime_jax import train as train_lib
from prime_jax.diffusion import objectives
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
  for k, v in overrides.items():
    node = cfg
    *path, leaf = k.split('.')
    for p in path:
      node = node[p]
    node[leaf] = v
  return cfg


def _step_once(cfg, devices, batch_np):
  tr = train_lib.Trainer(cfg, '', devices=devices)
  state = train_lib.init_state(cfg, tr.codec, tr.tx, tr.mesh, tr.shardings)
  state, m = tr.train_step(state, tr.global_batch({'tokens': batch_np}))
  state, m = tr.train_step(state, tr.global_batch({'tokens': batch_np[::-1].copy()}))
  return jax.device_get(state.params), jax.device_get(m)


@pytest.mark.parametrize('schedule', ['constant', 'cosine'])
@pytest.mark.parametrize('warmup,num_steps', [(0, 1), (0, 10), (5, 3), (5, 5)])
def test_lr_schedule_builds_for_runs_shorter_than_the_warmup(schedule, warmup, num_steps):
  cfg = tiny_config(**{'optim.schedule': schedule, 'optim.warmup_steps': warmup})
  _, lr = train_lib.make_optimizer(cfg.optim, num_steps)
  values = np.array([float(lr(i)) for i in range(num_steps + 2)])
  assert values[0] == 0.0 and np.all(np.isfinite(values))
  assert values.max() <= cfg.optim.lr * (1 + 1e-6)
  assert float(lr(max(warmup, 1))) == pytest.approx(cfg.optim.lr, rel=1e-6)  # the peak, once warm


def test_sharded_step_matches_single_device():
  assert jax.device_count() == 8
  batch = np.random.default_rng(0).integers(0, 50257, size=(8, 32)).astype(np.int32)
  one_p, one_m = _step_once(tiny_config(), jax.devices()[:1], batch)
  cfg8 = tiny_config(**{'mesh.data': 4, 'mesh.fsdp': 2})
  tr8 = train_lib.Trainer(cfg8, '')
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
    train_lib.Trainer(tiny_config(**{'data.batch_size': 6}), '')


def test_token_ids_out_of_range_are_an_error():
  tr = train_lib.Trainer(tiny_config(), '', devices=jax.devices()[:1])
  with pytest.raises(ValueError, match='outside'):
    tr.global_batch({'tokens': np.full((8, 32), 50257)})


def test_model_dim_not_divisible_by_ell():
  with pytest.raises(ValueError, match='divisible'):
    train_lib.Trainer(tiny_config(**{'diffusion.ell': 3}), '')


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
  tr1 = train_lib.Trainer(cfg, '', devices=jax.devices()[:1])
  tr8 = train_lib.Trainer(cfg8, '')
  s1, _ = ckpt.restore(tr1.abs_state)
  s8, _ = ckpt.restore(tr8.abs_state)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert {str(x.sharding.spec) for x in jax.tree.leaves(s8.params)} != {'PartitionSpec()'}
  # A checkpoint that does not match the config is a clear error.
  tr_big = train_lib.Trainer(tiny_config(**{'model.dim': 64}), '', devices=jax.devices()[:1])
  with pytest.raises(ValueError, match='does not match this config'):
    ckpt.restore(tr_big.abs_state)
  ckpt.close()


def _launch(workdir, steps, extra=()):
  cmd = [sys.executable, '-m', 'prime_jax.main', '--config', 'configs/sotu.py', '--workdir',
         str(workdir), '--config.model.dim=32', '--config.model.num_heads=2',
         '--config.model.num_layers=2', '--config.data.seq_len=32', '--config.data.batch_size=8',
         '--config.eval.batch_size=8', '--config.eval.num_batches=1', f'--config.train.num_steps={steps}',
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


def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
  steps = 14
  ref = _launch(tmp_path / 'ref', steps)
  killed = _launch(tmp_path / 'killed', 400)  # would run far longer; killed once step 8 is saved
  ckpt_dir = tmp_path / 'killed' / 'checkpoints'
  deadline = time.time() + 300
  while time.time() < deadline:
    done = [int(p.name) for p in ckpt_dir.glob('*') if p.name.isdigit()] if ckpt_dir.exists() else []
    losses = _losses(tmp_path / 'killed') if (tmp_path / 'killed' / 'metrics.jsonl').exists() else {}
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
  tr = train_lib.Trainer(cfg, '', devices=jax.devices()[:1])
  state, _ = ckpt.restore(tr.abs_state)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  assert (tmp_path / 'parameters.txt').read_text().count('kernel') > 3
  ckpt.close()


def test_self_normalized_loss_is_what_the_step_differentiates():
  """diffusion.self_normalize: the step minimises objectives.self_normalized_mean of the same
  draw (t, y_t) whose plain token means it logs beside it; images refuse the option."""
  batch = np.random.default_rng(3).integers(0, 50257, size=(8, 32)).astype(np.int32)
  _, m_sn = _step_once(tiny_config(**{'diffusion.self_normalize': True}), jax.devices()[:1], batch)
  _, m_plain = _step_once(tiny_config(**{'diffusion.self_normalize': False}), jax.devices()[:1],
                          batch)
  assert float(m_sn['loss']) == pytest.approx(float(m_sn['self_normalized']), rel=1e-6)
  assert float(m_plain['loss']) == pytest.approx(float(m_plain['nelbo']), rel=1e-6)
  assert 'self_normalized' not in m_plain
  assert abs(float(m_sn['loss']) - float(m_sn['nelbo'])) > 1e-3  # the estimators differ
  cfg = tiny_config(**{'diffusion.self_normalize': True})
  tr = train_lib.Trainer(cfg, '', devices=jax.devices()[:1])
  state = train_lib.init_state(cfg, tr.codec, tr.tx, tr.mesh, tr.shardings)
  key = jax.random.key(5)
  loss, aux = train_lib.training_loss(state.params, tr.graphdef, batch, key, tr.task)
  t_B, y_t, k_drop = train_lib.noisy_batch(batch, key, tr.task)
  per_token = train_lib.losses_at(state.params, tr.graphdef, batch, t_B, y_t, tr.task, train=True,
                                  dropout_key=k_drop)
  expected = objectives.self_normalized_mean(per_token['nelbo'], y_t, t_B,
                                             schedule=tr.task.schedule, mask_id=tr.codec.mask_id)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(aux['nelbo'], objectives.token_mean(per_token['nelbo']), rtol=1e-6)
  image = tiny_config(**{'diffusion.self_normalize': True, 'data.source': 'cifar10',
                         'model.name': 'unet'})
  with pytest.raises(ValueError, match='self_normalize'):
    train_lib.build_task(image)


def test_optimizer_groups_head_b2_and_adaln_lr_scale():
  """optim.head_b2: final.head's parameters follow Adam with b2 = head_b2, all others optim.b2;
  optim.adaln_lr_scale: the adaLN layers' steps are scaled. Each group equals a plain AdamW of its
  own over the same gradients (clipping on the whole tree)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  # b1 = 0: the updates are g / sqrt(v), so they show the second moments alone.
  cfg = tiny_config(**{'optim.head_b2': 0.999, 'optim.b2': 0.9, 'optim.warmup_steps': 0,
                       'optim.b1': 0.0, 'optim.adaln_lr_scale': 0.5})
  params = nnx.state(train_lib.build_model(cfg, train_lib.build_codec(cfg), nnx.Rngs(0)),
                     nnx.Param)
  labels = {jax.tree_util.keystr(p): v
            for p, v in jax.tree_util.tree_leaves_with_path(train_lib.optimizer_groups(params))}
  assert sorted(k for k, v in labels.items() if v == 'head') == [
      "['final']['head']['bias'].value", "['final']['head']['kernel'].value"]
  adaln = sorted(k for k, v in labels.items() if v == 'adaln')
  assert len(adaln) == 2 * (cfg.model.num_layers + 1) and all("['adaln']" in k for k in adaln)
  # Only the groups in use are labelled, so head_b2 alone keeps the same optimiser state as before.
  assert set(jax.tree.leaves(train_lib.optimizer_groups(params, groups=('head',)))) == {
      'head', 'trunk'}
  tx, _ = train_lib.make_optimizer(cfg.optim, 10)
  update = {'mixed': jax.jit(tx.update)}
  cfg_plain = {b2: tiny_config(**{'optim.head_b2': 0.0, 'optim.b2': b2, 'optim.warmup_steps': 0,
                                  'optim.b1': 0.0, 'optim.adaln_lr_scale': 1.0})
               for b2 in (0.9, 0.999)}
  plain = {b2: train_lib.make_optimizer(c.optim, 10)[0] for b2, c in cfg_plain.items()}
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
      group = labels[jax.tree_util.keystr(path)]
      want = r999 if group == 'head' else 0.5 * r9 if group == 'adaln' else r9
      np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-9)
  head_kernel = lambda tree: tree['final']['head']['kernel'][...]
  # The test can tell the groups apart: b2 = 0.9 has forgotten the large step, 0.999 has not.
  assert np.abs(head_kernel(ref[0.9])).mean() > 3 * np.abs(head_kernel(ref[0.999])).mean()
  with pytest.raises(ValueError, match='head_b2'):
    train_lib.make_optimizer(tiny_config(**{'optim.head_b2': 1.5}).optim, 10)
  with pytest.raises(ValueError, match='adaln_lr_scale'):
    train_lib.make_optimizer(tiny_config(**{'optim.adaln_lr_scale': 0.0}).optim, 10)
