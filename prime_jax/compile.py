"""--mode compile: the real train step, eval step and sampler network call of a config, compiled
ahead of time for a Cloud TPU topology on any machine (a CPU one included), with XLA's figures.

  python -m prime_jax.main --config configs/owt.py:ell=4 --mode compile --topology v5p-128

Needs libtpu (`make tpu-tools`: requirements-tpu.txt): it supplies the TPU compiler and the
topology's devices (`jax.experimental.topologies`); nothing runs, nothing is allocated. Per chip it
reports memory (arguments, outputs, temporaries, generated code) against the chip's HBM, FLOPs per
step from XLA's cost analysis beside our analytic count, XLA's estimated step time with the MFU and
tokens/s it implies, and the collectives of the optimised HLO. Every time and MFU here is XLA's
estimate, not a measurement. A step that does not fit exits with status 3 and names the knobs.

Topology names: the Cloud TPU accelerator types (v4-N and v5p-N count TensorCores, two per chip;
v5e-N and v6e-N count chips), or the chip and its grid, e.g. v5p:4x4x4.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
from typing import Any, Optional

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx

from prime_jax import build
from prime_jax import sharding as sharding_lib
from prime_jax import train as train_lib

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_gib: float  # per chip
  peak_flops: float  # dense bf16 per chip
  grid_dims: int  # 2: a 2-D torus of chips, 3: a 3-D one
  cores_per_chip: int  # how the accelerator type's number counts (TensorCores or chips)
  chip_config: Optional[str] = None


CHIPS = {
    'v4': Chip('v4', 32, 275e12, 3, 2, 'megacore'),
    'v5e': Chip('v5e', 16, 197e12, 2, 1),
    'v5p': Chip('v5p', 95, 459e12, 3, 2),
    'v6e': Chip('v6e', 32, 918e12, 2, 1),
}
_LIBTPU_NAME = {'v4': 'v4', 'v5e': 'v5e', 'v5p': 'v5p', 'v6e': 'v6e'}


class Unfit(Exception):
  """The compiled step needs more memory per chip than the chip has."""


def _grid(chips: int, dims: int) -> tuple[int, ...]:
  """The usual slice shape of `chips` chips: powers of two, as even as possible, larger last."""
  if chips < 1 or chips & (chips - 1):
    raise ValueError(f'{chips} chips: Cloud TPU slices have a power of two of chips.')
  shape = [1] * dims
  i = 0
  while math.prod(shape) < chips:
    shape[i % dims] *= 2
    i += 1
  return tuple(sorted(shape, reverse=dims == 3 and chips < 8))


def parse_topology(name: str) -> tuple[Chip, str]:
  """'v5p-128' or 'v5p:4x4x4' -> (chip, libtpu topology name 'v5p:4x4x4')."""
  m = re.fullmatch(r'(v4|v5e|v5p|v6e)([-:])([0-9x]+)', name.strip().lower())
  if not m:
    raise ValueError(f'Unknown TPU topology {name!r}: use an accelerator type such as v5p-128, '
                     'v5e-256, v6e-64, v4-128, or a chip grid such as v5p:4x4x4 '
                     f'(chips: {", ".join(CHIPS)}).')
  chip, sep, rest = CHIPS[m.group(1)], m.group(2), m.group(3)
  if sep == ':':
    grid = tuple(int(x) for x in rest.split('x'))
    if len(grid) != chip.grid_dims:
      raise ValueError(f'{name}: a {chip.name} grid has {chip.grid_dims} dimensions.')
  else:
    count = int(rest)
    if count % chip.cores_per_chip:
      raise ValueError(f'{name}: {chip.name}-N counts TensorCores, {chip.cores_per_chip} per chip.')
    grid = _grid(count // chip.cores_per_chip, chip.grid_dims)
  return chip, f'{_LIBTPU_NAME[chip.name]}:{"x".join(map(str, grid))}'


@contextlib.contextmanager
def _quiet_stderr():
  """libtpu prints warnings about the absent TPU VM metadata on file descriptor 2: hidden."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def libtpu_path() -> Optional[str]:
  """The TPU compiler: $TPU_LIBRARY_PATH, else .tpu/ of this checkout (`make tpu-tools`), else an
  installed libtpu package (a TPU VM with jax[tpu]); None when there is none."""
  for path in (os.environ.get('TPU_LIBRARY_PATH'), os.path.join(_ROOT, '.tpu', 'libtpu',
                                                                 'libtpu.so')):
    if path and os.path.isfile(path):
      return path
  try:
    import libtpu  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return libtpu.get_library_path()


def topology_devices(name: str, num_slices: int = 1):
  """(chip, libtpu topology name, compile-only TPU devices of the topology, slice-major)."""
  chip, topo = parse_topology(name)
  if num_slices < 1:
    raise ValueError(f'--num_slices must be >= 1, got {num_slices}.')
  path = libtpu_path()
  if path is None:
    raise ValueError('--mode compile needs libtpu, the TPU compiler: run `make tpu-tools` (it '
                     'installs requirements-tpu.txt into .tpu/), or set TPU_LIBRARY_PATH.')
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  kwargs = {} if chip.chip_config is None else {'chip_config_name': chip.chip_config}
  if num_slices > 1:
    kwargs['num_slices'] = num_slices
  # Only while libtpu loads (processes started later must not find it and try it as a backend):
  # where it is, and, with no TPU VM here, no metadata server to ask and no lock against other
  # compiling processes.
  env = {'TPU_LIBRARY_PATH': path, 'TPU_WORKER_HOSTNAMES': 'localhost', 'TPU_SKIP_MDS_QUERY': '1',
         'ALLOW_MULTIPLE_LIBTPU_LOAD': '1'}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update({k: v if k == 'TPU_LIBRARY_PATH' or saved[k] is None else saved[k]
                     for k, v in env.items()})
  try:
    with _quiet_stderr():
      desc = topologies.get_topology_desc(platform='tpu', topology_name=topo, **kwargs)
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  devices = sorted(desc.devices, key=lambda d: (getattr(d, 'slice_index', 0) or 0, d.id))
  return chip, topo, devices


# -- the figures of one compiled program ----------------------------------------------------------

_COLLECTIVE = re.compile(r'\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|'
                         r'ragged-all-to-all)(-start)?\(')
_SHAPE = re.compile(r'([a-z]+[0-9]*)\[([0-9,]*)\]')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
                'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16,
                'f8e4m3fn': 1, 'f8e5m2': 1}


def _shape_bytes(text: str) -> int:
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    size = _DTYPE_BYTES.get(dtype)
    if size is not None:
      total += size * math.prod(int(x) for x in dims.split(',') if x)
  return total


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {'count', 'bytes'}} of the collectives in optimised HLO text: each op's result size
  (an async -start op's tuple holds its operand too: its bytes are halved). Static: an op inside
  a loop body (scanned layers) counts once."""
  out: dict[str, dict[str, int]] = {}
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.search(line)
    if not m or '=' not in line[:m.start()]:
      continue
    shape = line[line.index('=') + 1:m.start()]  # the result: one array or a tuple of them
    nbytes = _shape_bytes(shape)
    if m.group(2) and shape.strip().startswith('('):
      nbytes //= 2
    entry = out.setdefault(m.group(1), {'count': 0, 'bytes': 0})
    entry['count'] += 1
    entry['bytes'] += nbytes
  return out


def program_figures(compiled) -> dict[str, Any]:
  """Per-chip memory, XLA's FLOPs and estimated seconds, and the collectives of one program.

  XLA's time estimate counts each op it cannot cost as -1 s (e.g. the TPU's ConcatBitcast custom
  call, a relayout of the (D, 50257) head kernel that memory-space assignment inserts): such ops
  are taken out again (`xla_uncosted_ops`), so the estimate leaves their time out."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hlo = compiled.as_text()
  memory = dict(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
                aliased=mem.alias_size_in_bytes, temporaries=mem.temp_size_in_bytes,
                generated_code=mem.generated_code_size_in_bytes)
  memory['total'] = (memory['arguments'] + memory['outputs'] - memory['aliased']
                     + memory['temporaries'] + memory['generated_code'])
  seconds = float(cost.get('optimal_seconds', 0.0))
  uncosted = 0
  if seconds < 0:
    uncosted = math.ceil(-seconds)
    seconds += uncosted
  return dict(memory_bytes=memory, xla_flops=float(cost.get('flops', 0.0)),
              xla_bytes_accessed=float(cost.get('bytes accessed', 0.0)),
              xla_estimated_s=seconds, xla_uncosted_ops=uncosted,
              custom_calls=sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo))),
              collectives=collectives(hlo))


# -- the programs ----------------------------------------------------------------------------------


def _abstract(shape, dtype, sharding):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _splash_flops(exp: build.Experiment, model, batch: int, backward: bool) -> float:
  """Attention FLOPs of a step that Pallas kernels hide from XLA's cost analysis: QK^T and AV,
  2 * 2 * L * D per token and layer forward (x 3 with the backward pass), all chips together."""
  if exp.attention != 'splash' or len(exp.token_shape) != 1:
    return 0.0
  L = exp.token_shape[0]
  per_token = 4.0 * L * model.dim * model.num_layers * (3 if backward else 1)
  return per_token * batch * L


class CompilerOutOfMemory(Exception):
  """The TPU compiler found no memory assignment that fits the chip's HBM."""

  def __init__(self, program: str, detail: str):
    super().__init__(detail)
    self.program, self.detail = program, detail


def _compile(lowered, program: str):
  try:
    return lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    detail = str(e).split('RESOURCE_EXHAUSTED:', 1)[-1].strip().splitlines()[0]
    raise CompilerOutOfMemory(program, detail) from None


def compile_programs(exp: build.Experiment, devices, *, programs=('train', 'eval', 'sample'),
                     hbm_bytes: Optional[float] = None):
  """(trainer, {program: figures}) for the experiment on these devices (compile-only ones
  included); with hbm_bytes, a train step that needs more stops there."""
  tr = train_lib.Trainer(exp, devices)
  mesh, S = tr.mesh, tr.token_shape
  model = nnx.merge(tr.graphdef, tr.abs_state.params)
  n = len(devices)
  out = {}
  with jax.set_mesh(mesh):
    if 'train' in programs:
      B = exp.data.batch_size
      batch = {'tokens': _abstract((B, *S), jnp.int32,
                                   sharding_lib.batch_sharding(mesh, 1 + len(S)))}
      figures = program_figures(_compile(tr.train_step.lower(tr.abs_state, batch), 'train'))
      figures.update(tokens=B * math.prod(S), analytic_flops=tr.flops_per_token * B *
                     math.prod(S) / n, opaque_flops=_splash_flops(exp, model, B, True) / n)
      out['train'] = figures
      if hbm_bytes is not None and figures['memory_bytes']['total'] > hbm_bytes:
        return tr, out
    if 'eval' in programs:
      from prime_jax import evaluate  # pylint: disable=import-outside-toplevel
      # One time sample per example (eval.num_t = 1): XLA counts a loop body once, so the J
      # samples' loop would hide J - 1 of them from its FLOPs and time.
      one_t = dataclasses.replace(exp, eval=dataclasses.replace(exp.eval, num_t=1))
      ev = evaluate.Evaluator(one_t, mesh, tr.graphdef, tr.shardings.params, tr.task,
                              control_variate=False)
      B = exp.eval.batch_size
      row = sharding_lib.batch_sharding(mesh, 1)
      batch = {'tokens': _abstract((B, *S), jnp.int32,
                                   sharding_lib.batch_sharding(mesh, 1 + len(S))),
               'mask': _abstract((B,), jnp.float32, row), 'index': _abstract((B,), jnp.int32, row)}
      figures = program_figures(_compile(ev.step.lower(tr.abs_state.params, batch), 'eval'))
      figures.update(tokens=B * math.prod(S),
                     analytic_flops=tr.flops_per_token / 3 * B * math.prod(S) / n,
                     opaque_flops=_splash_flops(exp, model, B, False) / n)
      out['eval'] = figures
    if 'sample' in programs and not exp.task.autoregressive:
      # One network call of the sampler: trunk and head on every position of the sample batch.
      B = max(exp.sample.batch_size, sharding_lib.data_parallel_size(mesh))
      B = -(-B // sharding_lib.data_parallel_size(mesh)) * sharding_lib.data_parallel_size(mesh)
      K = tr.codec.ell
      graphdef = tr.graphdef
      call = jax.jit(lambda params, y: nnx.merge(graphdef, params)(y),
                     in_shardings=(tr.shardings.params,
                                   sharding_lib.batch_sharding(mesh, 2 + len(S))))
      y = _abstract((B, *S, K), jnp.int32, sharding_lib.batch_sharding(mesh, 2 + len(S)))
      figures = program_figures(_compile(call.lower(tr.abs_state.params, y), 'sample'))
      figures.update(tokens=B * math.prod(S),
                     analytic_flops=tr.flops_per_token / 3 * B * math.prod(S) / n,
                     opaque_flops=_splash_flops(exp, model, B, False) / n)
      out['sample'] = figures
  return tr, out


def report(cfg, topology: str, num_slices: int = 1, *, programs=('train', 'eval', 'sample'),
           out_path: Optional[str] = None, echo: bool = True) -> dict[str, Any]:
  """Compiles, prints the table, writes JSON (out_path) and returns it; raises Unfit when the
  train step does not fit."""
  exp = build.experiment(cfg)
  chip, topo, devices = topology_devices(topology, num_slices)
  hbm = chip.hbm_gib * GIB
  try:
    tr, figs = compile_programs(exp, devices, programs=programs, hbm_bytes=hbm)
  except CompilerOutOfMemory as e:
    raise Unfit(f'the {e.program} step does not fit a {chip.name} chip ({chip.hbm_gib:g} GiB) on '
                f'{topology}; the TPU compiler says: {e.detail} Try '
                + '; '.join(_knobs(cfg.model.remat, dict(cfg.mesh))) + '.') from None
  n = len(devices)
  result = dict(topology=topology, libtpu_topology=topo, num_slices=num_slices, chips=n,
                chip=chip.name, hbm_gib_per_chip=chip.hbm_gib,
                peak_bf16_flops_per_chip=chip.peak_flops, mesh=dict(tr.mesh.shape),
                params=tr.n_params, ell=tr.codec.ell, dtype=str(cfg.model.dtype),
                remat=str(cfg.model.get('remat', 'none')), attention=str(cfg.model.get(
                    'attention', 'xla')), programs={}, estimate='XLA cost model, not measured')
  for name, f in figs.items():
    flops = f['analytic_flops']
    # XLA cannot cost a Pallas kernel (it is one of the uncosted ops): its FLOPs at the chip's peak
    # are added, a lower bound on its time.
    f['opaque_s_at_peak'] = f['opaque_flops'] / chip.peak_flops
    est = f['estimated_s'] = f['xla_estimated_s'] + f['opaque_s_at_peak']
    f['fits'] = f['memory_bytes']['total'] <= hbm
    f['estimated_mfu'] = flops / est / chip.peak_flops if est > 0 else None
    f['estimated_tokens_per_s_per_chip'] = f['tokens'] / n / est if est > 0 else None
    f['xla_to_analytic_flops'] = ((f['xla_flops'] + f['opaque_flops']) / flops if flops
                                  else None)
    result['programs'][name] = f
  if echo:
    print_report(result)
  if out_path:
    epath.Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(out_path).write_text(json.dumps(result, indent=2, sort_keys=True))
  train = result['programs'].get('train')
  if train is not None and not train['fits']:
    raise Unfit(unfit_message(result))
  return result


def _knobs(remat, mesh: dict) -> list[str]:
  knobs = []
  if remat in ('none', False):
    knobs.append('--config.model.remat=full (or dots_no_batch)')
  knobs.append(f'a larger --config.mesh.fsdp (now {mesh.get("fsdp", 1)}: parameters and optimizer '
               'state are split over it)')
  knobs.append('a smaller --config.data.batch_size, or a topology with more chips')
  return knobs


def unfit_message(result: dict[str, Any]) -> str:
  need = result['programs']['train']['memory_bytes']['total'] / GIB
  return (f'the train step needs {need:.1f} GiB per chip on {result["topology"]}, the chip has '
          f'{result["hbm_gib_per_chip"]:g} GiB: try ' + '; '.join(
              _knobs(result['remat'], result['mesh'])) + '.')


def _gib(x: float) -> str:
  return f'{x / GIB:.2f}'


def print_report(r: dict[str, Any]) -> None:
  print(f'compile: {r["topology"]} ({r["libtpu_topology"]}, {r["num_slices"]} slice(s)): '
        f'{r["chips"]} x TPU {r["chip"]} ({r["hbm_gib_per_chip"]:g} GiB HBM, '
        f'{r["peak_bf16_flops_per_chip"] / 1e12:.0f} TFLOP/s bf16 each); mesh {r["mesh"]}; '
        f'params {r["params"]:,}; ell {r["ell"]}; {r["dtype"]}; remat {r["remat"]}; '
        f'attention {r["attention"]}')
  print('  per chip; times, MFU and tokens/s are XLA\'s estimates, not measurements')
  for name, f in r['programs'].items():
    m = f['memory_bytes']
    mfu = f['estimated_mfu']
    tps = f['estimated_tokens_per_s_per_chip']
    opaque = (f' + {f["opaque_flops"] / 1e12:.3f} TFLOP in Pallas kernels (analytic)'
              if f['opaque_flops'] else '')
    print(f'  {name:6s} memory {_gib(m["total"])} GiB {"fits" if f["fits"] else "DOES NOT FIT"} '
          f'(arguments {_gib(m["arguments"])}, outputs {_gib(m["outputs"])}, aliased '
          f'{_gib(m["aliased"])}, temporaries {_gib(m["temporaries"])}, code '
          f'{_gib(m["generated_code"])})')
    pallas = (f' (+ {1e3 * f["opaque_s_at_peak"]:.1f} ms of Pallas kernels at peak)'
              if f['opaque_flops'] else '')
    print(f'         FLOPs XLA {f["xla_flops"] / 1e12:.3f} T{opaque}, analytic '
          f'{f["analytic_flops"] / 1e12:.3f} T; est. step {1e3 * f["estimated_s"]:.1f} ms{pallas}'
          + (f', est. MFU {100 * mfu:.1f}%, est. {tps:,.0f} tokens/s/chip' if mfu else ''))
    if f['collectives']:
      print('         collectives: ' + ', '.join(
          f'{k} {v["count"]} ({v["bytes"] / 2**20:.1f} MiB)'
          for k, v in sorted(f['collectives'].items())))


def run(cfg, topology: str, num_slices: int = 1, workdir: Optional[str] = None) -> dict[str, Any]:
  """--mode compile: the report, written to WORKDIR/compile_<topology>.json when given."""
  out = None
  if workdir:
    out = str(epath.Path(workdir) / f'compile_{topology.replace(":", "_")}'
              f'{"_x" + str(num_slices) if num_slices > 1 else ""}.json')
  result = report(cfg, topology, num_slices, out_path=out)
  if out:
    print(f'  written to {out}')
  return result
