"""The one place where meshes, logical axis rules and shardings are decided.

Models name the axes of their parameters logically ('embed', 'mlp', 'vocab', ...). A config's mesh
axes ('data', 'fsdp', 'tensor'; -1 fills the rest) and logical axis rules map those names to mesh
axes. A dimension whose size is not divisible by its mesh axes is replicated instead (e.g. a
50257-way head over tensor=2), so every config runs on every mesh.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# logical name -> mesh axis (or tuple of axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', BATCH_AXES),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('qkv', None),  # the (D, 3, D) qkv kernel shards by 'heads'
    ('kv', None),
    ('cond', None),
    ('cond_in', None),
    ('tail_rank', None),  # the low-rank tail head's rank
    ('layers', None),
    ('length', None),
)


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves -1 (at most one) so that the product equals num_devices."""
  sizes = [int(axes.get(name, 1)) for name in MESH_AXES]
  unknown = [i for i, s in enumerate(sizes) if s == -1]
  if len(unknown) > 1:
    raise ValueError(f'At most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}.')
  known = math.prod(s for s in sizes if s != -1)
  if unknown:
    if num_devices % known:
      raise ValueError(f'{num_devices} devices cannot fill mesh {dict(zip(MESH_AXES, sizes))}: '
                       f'{num_devices} is not divisible by {known}.')
    sizes[unknown[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'Mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, '
                     f'{num_devices} are available; set one axis to -1 to fill the rest.')
  return tuple(sizes)


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(axes, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def _mesh_axes_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_mesh_spec(logical: Iterable[str | None], shape: Sequence[int], mesh: Mesh,
                         rules: Iterable[tuple[str, Any]] = DEFAULT_RULES) -> P:
  """PartitionSpec over mesh axes for one array with logical axis names."""
  rules = dict(rules)
  out, used = [], set()
  for name, size in zip(tuple(logical) + (None,) * (len(shape) - len(tuple(logical))), shape):
    axes = rules.get(name) if name is not None else None
    if axes is not None:
      flat = (axes,) if isinstance(axes, str) else tuple(axes)
      # An axis may shard one dimension only, and only if it divides it.
      if any(a in used for a in flat) or size % _mesh_axes_size(mesh, flat):
        axes = None
      else:
        used.update(flat)
    out.append(axes)
  return P(*out)


def shardings_for(logical_specs, abstract, mesh: Mesh, rules=DEFAULT_RULES):
  """Pytree of NamedShardings from a pytree of logical PartitionSpecs (None leaves = replicated)
  and the matching pytree of arrays / ShapeDtypeStructs."""
  def one(spec, leaf):
    names = tuple(spec) if spec is not None else ()
    return NamedSharding(mesh, logical_to_mesh_spec(names, leaf.shape, mesh, rules))
  return jax.tree.map(one, logical_specs, abstract,
                      is_leaf=lambda x: isinstance(x, P) or x is None)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
  return _mesh_axes_size(mesh, BATCH_AXES)


def check_batch(global_batch: int, mesh: Mesh) -> None:
  dp = data_parallel_size(mesh)
  if global_batch % dp:
    raise ValueError(f'The global batch {global_batch} is not divisible by the data-parallel size '
                     f'{dp} (mesh data x fsdp = {mesh.shape["data"]} x {mesh.shape["fsdp"]}): '
                     'change data.batch_size or the mesh axes.')
  if global_batch % jax.process_count():
    raise ValueError(f'The global batch {global_batch} is not divisible by the number of hosts '
                     f'{jax.process_count()}.')


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Each host's shard of the batch -> global jax.Arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
          for k, v in local.items()}


class OnMesh:
  """A jitted function that is traced, lowered and called with `jax.set_mesh(mesh)` active, so
  that code inside it which needs the mesh (splash attention's per-shard kernel) sees it."""

  def __init__(self, jitted, mesh: Mesh):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args, **kwargs)


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() when launched as several processes: PRIME_JAX_DISTRIBUTED=1 (set
  by launch/tpu.py; Cloud TPU VMs expose their workers through metadata, not the environment), SLURM
  with several tasks, or an explicit coordinator: JAX_COORDINATOR_ADDRESS=host:port with
  JAX_NUM_PROCESSES and JAX_PROCESS_ID (any machines, CPU ones included: their collectives then
  go through gloo)."""
  env = os.environ
  multi = (env.get('PRIME_JAX_DISTRIBUTED') == '1' or 'JAX_COORDINATOR_ADDRESS' in env
           or int(env.get('SLURM_NTASKS', '1')) > 1
           or ',' in env.get('TPU_WORKER_HOSTNAMES', ''))
  if not multi or jax.distributed.is_initialized():
    return
  if 'JAX_NUM_PROCESSES' in env or 'JAX_PROCESS_ID' in env:
    missing = [k for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')
               if k not in env]
    if missing:
      raise ValueError(f'An explicit multi-process launch needs JAX_COORDINATOR_ADDRESS, '
                       f'JAX_NUM_PROCESSES and JAX_PROCESS_ID; {", ".join(missing)} not set.')
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
                               num_processes=int(env['JAX_NUM_PROCESSES']),
                               process_id=int(env['JAX_PROCESS_ID']))
  else:
    jax.distributed.initialize()
