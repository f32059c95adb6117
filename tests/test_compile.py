"""--mode compile: ahead-of-time compiles for TPU topologies on this CPU machine, through libtpu
(`make test` installs it into .tpu/, as `make tpu-tools` does)."""

import json
import os
import subprocess
import sys

import pytest

from configs import sotu
from prime_jax import compile as compile_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('name,want', [
    ('v5p-128', 'v5p:4x4x4'), ('v5p-8', 'v5p:2x2x1'), ('v4-128', 'v4:4x4x4'),
    ('v5e-256', 'v5e:16x16'), ('v5e-8', 'v5e:2x4'), ('v6e-64', 'v6e:8x8'),
    ('v5p:4x4x8', 'v5p:4x4x8'), ('V6E-4', 'v6e:2x2')])
def test_topology_names(name, want):
  assert compile_lib.parse_topology(name)[1] == want


@pytest.mark.parametrize('name,message', [
    ('v5x-8', 'Unknown TPU topology'), ('v5p-12', 'power of two'), ('v5p-7', 'TensorCores'),
    ('v5e:2x2x2', '2 dimensions')])
def test_bad_topology_names(name, message):
  with pytest.raises(ValueError, match=message):
    compile_lib.parse_topology(name)


def test_collectives_are_counted_by_kind_with_their_result_bytes():
  hlo = '\n'.join([
      '  %all-reduce.1 = (f32[128,768]{1,0:T(8,128)}, bf16[64]{0:T(256)}) all-reduce(%a, %b), '
      'channel_id=1, replica_groups={{0,1}}',
      '  %ag = f32[2,1,384]{2,1,0:T(1,128)} all-gather(%r), dimensions={0}',
      '  %ags = (f32[4]{0}, f32[4]{0}) all-gather-start(%x), dimensions={0}',
      '  %agd = f32[4]{0} all-gather-done(%ags)',
      '  %f = f32[8]{0} fusion(%p), kind=kLoop, calls=%all-reduce.3',
  ])
  got = compile_lib.collectives(hlo)
  assert got == {'all-reduce': {'count': 1, 'bytes': 128 * 768 * 4 + 64 * 2},
                 'all-gather': {'count': 2, 'bytes': 2 * 384 * 4 + 16}}


def _tiny(batch: int):
  cfg = sotu.get_config()
  cfg.unlock()
  cfg.data.batch_size = batch
  cfg.eval.batch_size = 8
  cfg.model.dtype = 'bfloat16'
  return cfg


def test_a_tiny_config_compiles_for_v5e_and_its_figures_add_up(tmp_path):
  out = tmp_path / 'compile.json'
  env_before = dict(os.environ)
  r = compile_lib.report(_tiny(8), 'v5e:2x2', out_path=str(out), echo=False)
  # Processes started afterwards must not find libtpu (they would try it as a backend).
  assert dict(os.environ) == env_before
  assert json.loads(out.read_text()) == json.loads(json.dumps(r))
  assert r['chips'] == 4 and r['chip'] == 'v5e' and r['mesh'] == {'data': 4, 'fsdp': 1,
                                                                   'tensor': 1}
  assert set(r['programs']) == {'train', 'eval', 'sample'}
  for name, p in r['programs'].items():
    m = p['memory_bytes']
    assert m['arguments'] > 0 and m['temporaries'] >= 0 and m['generated_code'] > 0, name
    assert m['total'] == (m['arguments'] + m['outputs'] - m['aliased'] + m['temporaries']
                          + m['generated_code'])
    assert p['fits'] and p['xla_flops'] > 0 and p['xla_estimated_s'] > 0, name
    assert 0 < p['estimated_mfu'] < 1, name
  train = r['programs']['train']
  assert train['memory_bytes']['temporaries'] > 0  # activations kept for the backward pass
  # The donated state is aliased to the new one: the parameters, Adam moments and EMA once.
  assert train['memory_bytes']['aliased'] >= 4 * r['params'] * 4
  # The batch is split over 4 chips: the gradients are all-reduced.
  assert train['collectives']['all-reduce']['bytes'] > 0
  # One network call of the sampler has no loop: XLA's count is the analytic one to 10 %.
  assert 0.9 < r['programs']['sample']['xla_to_analytic_flops'] < 1.1
  # The train step's loops (the head kernel's vocabulary tiles) are counted once by XLA.
  assert 0.5 < train['xla_to_analytic_flops'] < 1.5


def test_splash_attention_compiles_as_the_tpu_kernel_per_shard():
  """The steps are traced under `jax.set_mesh` (as the trainer and evaluator call them), so splash
  runs per shard through shard_map, as the Mosaic TPU kernel (not interpreted); its FLOPs, hidden
  from XLA's cost analysis, are added analytically."""
  cfg = _tiny(8)
  cfg.model.attention, cfg.model.attention_block = 'splash', (128, 128)
  cfg.model.distance_bias_slope, cfg.data.seq_len = 0.0, 128
  cfg.model.num_layers = 1
  r = compile_lib.report(cfg, 'v5e:2x2', programs=('train',), echo=False)
  train = r['programs']['train']
  assert 'tpu_custom_call' in train['custom_calls'], train['custom_calls']
  assert train['opaque_flops'] > 0 and train['fits']
  # XLA costs the kernel as nothing: its FLOPs at the chip's peak are added to XLA's estimate.
  assert train['estimated_s'] == pytest.approx(train['xla_estimated_s'] + train['opaque_flops']
                                               / compile_lib.CHIPS['v5e'].peak_flops)
  assert train['xla_uncosted_ops'] >= 2  # the forward and backward kernels at least


def test_a_step_that_does_not_fit_exits_3_and_names_the_knobs(tmp_path):
  # 65536 sequences of 64 tokens per chip: ~2 GiB per saved activation, far over a v5e's 16 GiB.
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run(
      [sys.executable, '-m', 'prime_jax.main', '--config', 'configs/sotu.py', '--mode', 'compile',
       '--topology', 'v5e-4', '--config.data.batch_size=262144', '--config.eval.batch_size=8',
       '--workdir', str(tmp_path)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 3, proc.stderr[-2000:]
  err = proc.stderr.strip().splitlines()[-1]
  assert err.startswith('error: the train step does not fit a v5e chip (16 GiB) on v5e-4'), err
  assert 'exceeds available HBM' in err  # the TPU compiler's own figures
  assert 'model.remat=full' in err and 'mesh.fsdp' in err and 'data.batch_size' in err
