"""The attention kernels: splash (Pallas, interpret mode on CPU) equals XLA's attention in values
and gradients, bidirectional and causal, inside the DiT and the AR; the impossible combinations
are refused with the field to change."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prime_jax import build
from prime_jax.models import ar, dit
from prime_jax.models.attention import Attention
from tests.test_train import tiny_config


@pytest.mark.parametrize('causal', [False, True])
def test_splash_equals_xla_values_and_gradients(causal):
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(kk, (2, 256, 2, 32), jnp.float32) for kk in keys[:3])
  cot = jax.random.normal(keys[3], (2, 256, 2, 32), jnp.float32)
  splash = Attention('splash', 128, 128)
  xla = Attention('xla')

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v, causal=causal) * cot)

  np.testing.assert_allclose(splash(q, k, v, causal=causal), xla(q, k, v, causal=causal),
                             atol=2e-5)
  g_splash = jax.grad(functools.partial(loss, splash), argnums=(0, 1, 2))(q, k, v)
  g_xla = jax.grad(functools.partial(loss, xla), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_splash, g_xla):
    np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize('name', ['dit', 'ar'])
def test_models_give_the_same_logits_with_splash(name):
  kw = dict(vocab_size=1000, dim=64, num_heads=2, num_layers=2, dropout=0.0)
  if name == 'dit':
    make = functools.partial(dit.DiT, base=32, ell=2, cond_dim=64, **kw)
    x = jax.random.randint(jax.random.key(1), (2, 128, 2), 0, 33)
  else:
    make = functools.partial(ar.AR, **kw)
    x = jax.random.randint(jax.random.key(1), (2, 128), 0, 1000)
  a = make(rngs=nnx.Rngs(0))
  b = make(rngs=nnx.Rngs(0), attention=Attention('splash', 128, 128))
  for m in (a, b):  # a non-zero head, so the logits depend on the trunk
    m.final.head.kernel[...] = jax.random.normal(jax.random.key(2), m.final.head.kernel.shape)
  np.testing.assert_allclose(a(x), b(x), atol=1e-4)


def test_impossible_attention_settings_are_refused():
  with pytest.raises(ValueError, match="model.attention='nope'"):
    build.experiment(tiny_config(**{'model.attention': 'nope'}))
  with pytest.raises(ValueError, match='distance_bias_slope=0'):
    build.experiment(tiny_config(**{'model.attention': 'splash'}))  # sotu has a distance penalty
  q = jnp.zeros((1, 192, 2, 32))
  with pytest.raises(ValueError, match='multiples of 128'):
    Attention('splash', 128, 128)(q, q, q)
  with pytest.raises(ValueError, match='NVIDIA GPU'):
    Attention('cudnn')(q, q, q)  # this machine has no GPU


def test_splash_runs_per_shard_under_a_mesh():
  # Batch over 'data', heads over 'tensor': the kernel runs on each shard (shard_map).
  from prime_jax import sharding
  mesh = sharding.make_mesh({'data': 4, 'fsdp': 1, 'tensor': 2})
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(kk, (4, 128, 2, 32)) for kk in keys)
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data', None, 'tensor', None))
  with jax.set_mesh(mesh):
    out = jax.jit(lambda *a: Attention('splash', 128, 128)(*a))(
        *(jax.device_put(x, spec) for x in (q, k, v)))
  assert out.sharding.spec == spec.spec
  np.testing.assert_allclose(out, Attention('xla')(q, k, v), atol=2e-5)

