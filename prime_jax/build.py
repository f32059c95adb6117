"""The composition root: the one module that reads the config.

`experiment(config)` turns it, once, into objects and plain settings: the codec, the schedule, the
task, the model (a factory), the optimizer, the token shape, the data and the loop, evaluation and
sampling settings. Everything below (train, evaluate, sample, fid, bench) takes these objects and
never reads the config. Impossible configs fail here with an error that names the field.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from prime_jax import losses
from prime_jax import optim as optim_lib
from prime_jax import sharding as sharding_lib
from prime_jax.diffusion import schedules, subtokens
from prime_jax.diffusion.image_sampler import ImageSamplerSettings
from prime_jax.kernels import head as head_kernel
from prime_jax.models import ar, dit, layers, unet
from prime_jax.models import attention as attention_lib


@dataclasses.dataclass(frozen=True)
class Data:
  """Where the examples come from; `iterator` gives this host's share of each global batch."""
  source: str
  data_dir: Optional[str]
  seq_len: int
  batch_size: int  # global, in examples
  worker_count: int
  random_flip: bool
  seed: int
  image: bool

  def iterator(self, split: str, *, train: bool, batch_size: Optional[int] = None,
               source: Optional[str] = None, data_dir: Optional[str] = None):
    """Training (shuffled, repeated) or evaluation (one pass, padded, every example with its
    global 'index' and a 'mask' that is False on padding) batches of this host."""
    per_host = (batch_size or self.batch_size) // jax.process_count()
    source, data_dir = source or self.source, data_dir or self.data_dir
    if self.image:
      from prime_jax.data import images  # pylint: disable=import-outside-toplevel
      return images.make_image_pipeline(source, split, batch_size=per_host, seed=self.seed,
                                        train=train, worker_count=self.worker_count,
                                        data_dir=data_dir, pad_final_batch=not train,
                                        random_flip=self.random_flip)
    from prime_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    return pipeline.make_text_pipeline(source, split, seq_len=self.seq_len, batch_size=per_host,
                                       seed=self.seed, train=train,
                                       worker_count=self.worker_count, data_dir=data_dir,
                                       pad_final_batch=not train)

  def num_examples(self, split: str, *, source: Optional[str] = None,
                   data_dir: Optional[str] = None) -> int:
    source, data_dir = source or self.source, data_dir or self.data_dir
    if self.image:
      from prime_jax.data import images  # pylint: disable=import-outside-toplevel
      return images.num_images(source, split, data_dir)
    from prime_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    return pipeline.num_sequences(source, split, self.seq_len, data_dir)

  def unigram_log_probs(self) -> np.ndarray:
    """log p(token) of the add-one-smoothed training unigram (text)."""
    from prime_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    return pipeline.unigram_log_probs(self.source, self.seq_len, data_dir=self.data_dir)

  def unigram_baseline_nll(self) -> float:
    """Validation cross-entropy (nats/token) of the training unigram: the context-free baseline."""
    from prime_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    from prime_jax.metrics import unigram  # pylint: disable=import-outside-toplevel
    counts = pipeline.unigram_counts(self.source, 'validation', self.seq_len,
                                     data_dir=self.data_dir)
    return unigram.cross_entropy(self.unigram_log_probs(), counts)


@dataclasses.dataclass(frozen=True)
class Loop:
  seed: int
  num_steps: int
  log_every: int
  eval_every: int
  ckpt_every: int
  keep_ckpts: int
  peak_flops: float  # per device; 0 = guess from the device kind
  bench_steps: int


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  split: str
  num_batches: int  # 0 = the whole split
  batch_size: int  # global
  use_ema: bool
  seed: int
  num_t: int
  sets: tuple[tuple[str, str], ...]  # extra (source, split) pairs for --mode eval
  sets_dir: Optional[str]
  t_grid: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  num_samples: int
  batch_size: int
  seed: int
  steps: int  # text reverse steps
  nucleus_p: float
  precision: str
  cache: bool
  prefix_len: int
  scorer: str
  scorer_path: Optional[str]
  fid_ref_images: int
  inpaint: bool


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a run needs, built from the config once."""
  task: losses.Task
  token_shape: tuple[int, ...]  # S: (L,) text, (H, W, channels) images
  make_model: Callable[[nnx.Rngs], nnx.Module]
  optim: optim_lib.OptimSettings
  head_bias: str  # '' | 'unigram'
  data: Data
  loop: Loop
  eval: EvalSettings
  sample: SampleSettings
  image_sampler: Optional[ImageSamplerSettings]  # images only
  mesh_axes: dict[str, int]
  attention: str  # the text attention kernel (model.attention)
  dtype: str  # the compute dtype (model.dtype)
  summary: dict[str, Any]  # a few config values for checkpoint metadata and messages

  @property
  def codec(self) -> subtokens.Codec:
    return self.task.codec

  def make_optimizer(self):
    """(optax transformation, lr schedule)."""
    return optim_lib.make_optimizer(self.optim, self.loop.num_steps)

  def mesh(self, devices=None):
    sharding_lib.maybe_initialize_distributed()
    mesh = sharding_lib.make_mesh(self.mesh_axes, devices)
    sharding_lib.check_batch(self.data.batch_size, mesh)
    sharding_lib.check_batch(self.eval.batch_size, mesh)
    return mesh

  def task_on(self, mesh) -> losses.Task:
    """The task for a mesh: the head kernel runs on each device's share of the batch (shard_map
    over 'data' and 'fsdp'), with its row compaction per device, on every mesh."""
    return dataclasses.replace(self.task, mesh=mesh)

  def head_bias_prior(self) -> Optional[np.ndarray]:
    """The head's initial bias: log p(token) of the training unigram with `model.init.head_bias =
    'unigram'` (the model then starts at the unigram instead of the uniform distribution; a
    data-dependent initialisation that changes no equation of the method), else None."""
    if not self.head_bias:
      return None
    return self.data.unigram_log_probs().astype(np.float32)


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def _schedule(d: ml_collections.ConfigDict) -> schedules.Schedule:
  if d.schedule == 'loglinear':
    return schedules.get('loglinear', eps=d.schedule_eps)
  if d.schedule == 'poly':
    return schedules.get('poly', n=d.schedule_n)
  return schedules.get(d.schedule)


def _is_image(cfg: ml_collections.ConfigDict) -> bool:
  from prime_jax.data import images  # pylint: disable=import-outside-toplevel
  name, image_data = cfg.model.name, images.is_image_source(cfg.data.source)
  _check(name in ('dit', 'ar', 'unet'),
         f"model.name must be 'dit' (text), 'ar' (text, the autoregressive baseline) or 'unet' "
         f'(images), got {name!r}.')
  _check(not (name == 'ar' and image_data),
         f"model.name='ar' (the autoregressive baseline) is for text; data.source="
         f'{cfg.data.source!r} is an image source.')
  _check((name == 'unet') == image_data,
         f'model.name={name!r} does not fit data.source={cfg.data.source!r}: use '
         f"'unet' for the image sources {sorted(images.SOURCES)} and 'dit' or 'ar' for text.")
  return name == 'unet'


def _token_shape(cfg, image: bool) -> tuple[int, ...]:
  if image:
    from prime_jax.data import images  # pylint: disable=import-outside-toplevel
    return tuple(images.image_shape(cfg.data.source))
  return (int(cfg.data.seq_len),)


def _model_factory(cfg, codec: subtokens.Codec, image: bool, token_shape):
  m = cfg.model
  _check(m.dtype in ('float32', 'bfloat16'),
         f"model.dtype must be 'float32' or 'bfloat16', got {m.dtype!r}.")
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[m.dtype]
  _check(isinstance(m.remat, bool) or m.remat in layers.REMAT_POLICIES,
         f'model.remat={m.remat!r}: choose one of {list(layers.REMAT_POLICIES)}.')
  remat = layers.remat_name(m.remat)
  if image:
    u = m.unet
    return functools.partial(
        unet.UNet, vocab_size=codec.vocab_size, base=codec.base, ell=codec.ell,
        image_channels=token_shape[-1], model_channels=u.model_channels,
        channel_mult=tuple(u.channel_mult), num_res_blocks=u.num_res_blocks,
        attention_resolutions=tuple(u.attention_resolutions), head_channels=u.head_channels,
        dropout=m.dropout, norm_groups=u.norm_groups, time_conditioning=m.time_conditioning,
        remat=remat, dtype=dtype)
  _check(m.attention in attention_lib.IMPLEMENTATIONS,
         f'model.attention={m.attention!r}: choose one of {list(attention_lib.IMPLEMENTATIONS)}.')
  _check(not (m.attention == 'splash' and m.distance_bias_slope),
         "model.attention='splash' takes no additive bias: set model.distance_bias_slope=0 or use "
         "model.attention='xla'.")
  attention = attention_lib.Attention(m.attention, *map(int, m.attention_block))
  if m.name == 'ar':
    _check(not m.scan_layers, "model.scan_layers=True is not supported for model.name='ar'.")
    _check(remat == 'none', "model.remat is not supported for model.name='ar': set it to 'none'.")
    _check(not m.time_conditioning,
           "model.time_conditioning=True: model.name='ar' has no time input; set it to False.")
    return functools.partial(
        ar.AR, vocab_size=codec.vocab_size, dim=m.dim, num_heads=m.num_heads,
        num_layers=m.num_layers, mlp_ratio=m.mlp_ratio, dropout=m.dropout, dtype=dtype,
        rope_base=m.rope_base, head_init_scale=m.init.head_scale,
        distance_bias_slope=m.distance_bias_slope, attention=attention)
  return functools.partial(
      dit.DiT, vocab_size=codec.vocab_size, base=codec.base, ell=codec.ell, dim=m.dim,
      num_heads=m.num_heads, num_layers=m.num_layers, cond_dim=m.cond_dim, mlp_ratio=m.mlp_ratio,
      dropout=m.dropout, time_conditioning=m.time_conditioning, scan_layers=m.scan_layers,
      remat=remat, dtype=dtype, head_init_scale=m.init.head_scale,
      adaln_init_scale=m.init.adaln_scale, rope_base=m.rope_base,
      distance_bias_slope=m.distance_bias_slope, attention=attention)


def _sets(spec: str) -> tuple[tuple[str, str], ...]:
  out = []
  for item in filter(None, (s.strip() for s in spec.split(','))):
    if ':' in item:
      source, split = item.split(':', 1)
    else:
      from prime_jax.data import zeroshot  # pylint: disable=import-outside-toplevel
      known = zeroshot.ZERO_SHOT.get(item)
      source, split = item, known.split if known else 'validation'
    out.append((source, split))
  return tuple(out)


def _floats(spec: str, field: str) -> tuple[float, ...]:
  try:
    return tuple(float(x) for x in spec.split(',') if x.strip())
  except ValueError:
    raise ValueError(f'{field}={spec!r}: expected comma-separated numbers, e.g. 0.1,0.5.') from None


def _permutation(path: str) -> Optional[np.ndarray]:
  """The index permutation of an MDM-Prime-v2 `perm_*.pt` (one saved 1-D int64 tensor)."""
  if not path:
    return None
  from prime_jax import torchfile  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise FileNotFoundError(f'diffusion.permutation_file={path!r}: no such file.')
  perm = torchfile.read(path)
  _check(isinstance(perm, np.ndarray) and perm.ndim == 1 and perm.dtype.kind in 'iu',
         f'diffusion.permutation_file={path!r} holds {type(perm).__name__}, not one 1-D integer '
         "tensor (the authors' perm_*.pt files hold one).")
  return perm.astype(np.int64)


def image_sampler_settings(cfg, schedule: schedules.Schedule) -> ImageSamplerSettings:
  """The image sampler of the config's `sampler` block, on the configured schedule."""
  _check(schedule.name == 'poly',
         f"The image sampler samples the 'poly' schedule alpha = (1 - t)**n (the reference's); "
         f'diffusion.schedule={schedule.name!r} cannot be sampled by it. Train image models with '
         "diffusion.schedule='poly'.")
  s = cfg.sampler
  return ImageSamplerSettings(
      num_steps=int(s.num_steps), schedule_n=float(schedule.n), carry_over=bool(s.carry_over),
      temperature=tuple(s.temperature), use_corrector=bool(s.use_corrector),
      corrector=tuple(s.corrector), use_timestep_scheduler=bool(s.use_timestep_scheduler),
      timestep=tuple(s.timestep) if s.use_timestep_scheduler else (1.0, 1.0, 0.0),
      precision=cfg.sample.precision)


def experiment(cfg: ml_collections.ConfigDict) -> Experiment:
  """The config, read once, as objects."""
  d = cfg.diffusion
  _check(d.objective in ('nelbo', 'paper'),
         f"diffusion.objective must be 'nelbo' or 'paper', got {d.objective!r}.")
  image = _is_image(cfg)
  autoregressive = cfg.model.name == 'ar'
  _check(not autoregressive or d.ell == 1,
         f"model.name='ar' (the autoregressive baseline) scores whole tokens: diffusion.ell "
         f'must be 1, got {d.ell}.')
  codec = subtokens.Codec(d.vocab_size, d.ell,
                          shuffle_seed=None if d.shuffle_seed < 0 else d.shuffle_seed,
                          permutation=_permutation(d.permutation_file))
  schedule = _schedule(d)
  compaction = None
  if d.carry_over and not image and not autoregressive:
    compaction = head_kernel.Compaction.expected(schedule, codec.ell, float(d.sampling_eps))
  task = losses.Task(codec=codec, schedule=schedule, carry_over=bool(d.carry_over),
                     objective=d.objective, sampling_eps=float(d.sampling_eps),
                     antithetic=bool(d.antithetic), image=image, compaction=compaction,
                     autoregressive=autoregressive)
  token_shape = _token_shape(cfg, image)
  _check(cfg.model.init.head_bias in ('', 'unigram'),
         f"model.init.head_bias must be '' or 'unigram', got {cfg.model.init.head_bias!r}.")
  _check(not (image and cfg.model.init.head_bias),
         "model.init.head_bias='unigram' is for the DiT text models; set it to '' for images.")
  o = cfg.optim
  optim = optim_lib.OptimSettings(
      lr=o.lr, b1=o.b1, b2=o.b2, eps=o.eps, head_b2=o.head_b2, weight_decay=o.weight_decay,
      warmup_steps=o.warmup_steps, schedule=o.schedule, final_lr_frac=o.final_lr_frac,
      grad_clip=o.grad_clip, ema_decay=o.ema_decay)
  data = Data(source=cfg.data.source, data_dir=cfg.data.data_dir or None,
              seq_len=int(cfg.data.seq_len), batch_size=int(cfg.data.batch_size),
              worker_count=int(cfg.data.worker_count), random_flip=bool(cfg.data.random_flip),
              seed=int(cfg.seed), image=image)
  t = cfg.train
  loop = Loop(seed=int(cfg.seed), num_steps=int(t.num_steps), log_every=int(t.log_every),
              eval_every=int(t.eval_every), ckpt_every=int(t.ckpt_every),
              keep_ckpts=int(t.keep_ckpts), peak_flops=float(t.peak_flops),
              bench_steps=int(t.bench_steps))
  e = cfg.eval
  _check(e.num_t >= 1, f'eval.num_t={e.num_t} must be >= 1 (time samples per sequence).')
  ev = EvalSettings(split=e.split, num_batches=int(e.num_batches),
                    batch_size=int(e.batch_size or cfg.data.batch_size), use_ema=bool(e.use_ema),
                    seed=int(e.seed), num_t=int(e.num_t), sets=_sets(e.sets),
                    sets_dir=e.sets_dir or cfg.data.data_dir or None,
                    t_grid=_floats(e.t_grid, 'eval.t_grid'))
  s = cfg.sample
  sample = SampleSettings(num_samples=int(s.num_samples), batch_size=int(s.batch_size),
                          seed=int(s.seed), steps=int(s.steps or cfg.data.seq_len),
                          nucleus_p=float(s.nucleus_p), precision=s.precision, cache=bool(s.cache),
                          prefix_len=int(s.prefix_len), scorer=s.scorer,
                          scorer_path=s.scorer_path or None,
                          fid_ref_images=int(s.fid_ref_images), inpaint=bool(s.inpaint))
  _check(sample.num_samples >= 1 and sample.batch_size >= 1,
         f'sample.num_samples={sample.num_samples} and sample.batch_size={sample.batch_size} '
         'must be >= 1.')
  return Experiment(
      task=task, token_shape=token_shape,
      make_model=_model_factory(cfg, codec, image, token_shape), optim=optim,
      head_bias=cfg.model.init.head_bias, data=data, loop=loop, eval=ev, sample=sample,
      image_sampler=image_sampler_settings(cfg, schedule) if image else None,
      mesh_axes=dict(cfg.mesh), attention=str(cfg.model.attention),
      dtype=str(cfg.model.dtype),
      summary=dict(source=cfg.data.source, vocab_size=codec.vocab_size, ell=codec.ell,
                   model=cfg.model.name, dim=cfg.model.dim, layers=cfg.model.num_layers,
                   objective=d.objective, carry_over=bool(d.carry_over)))


def load_config(spec: str) -> ml_collections.ConfigDict:
  """A config from 'configs/x.py[:arg]' (as --config takes it) or from a workdir's config.json."""
  path, _, arg = spec.partition(':') if not spec.endswith('.json') else (spec, '', '')
  if not (epath.Path(path).exists() if path.endswith('.json') else os.path.isfile(path)):
    raise FileNotFoundError(f'No config file at {path} (expected configs/x.py[:arg] or a '
                            'workdir\'s config.json).')
  if path.endswith('.json'):  # a workdir's, local or gs://
    cfg = ml_collections.ConfigDict(json.loads(epath.Path(path).read_text()))
  else:
    module_spec = importlib.util.spec_from_file_location('_prime_jax_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(arg) if arg else module.get_config()
  cfg.lock()
  return cfg


def abstract_params(make_model):
  """(graphdef, abstract params, logical PartitionSpecs) without allocating anything."""
  abstract = nnx.eval_shape(lambda: make_model(rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(abstract, nnx.Param)
  return graphdef, params, nnx.get_partition_spec(params)


def sharded_abstract_params(make_model, mesh):
  """(graphdef, abstract params carrying their NamedShardings on `mesh`, those shardings)."""
  graphdef, params, logical = abstract_params(make_model)
  shardings = sharding_lib.shardings_for(logical, params, mesh)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params,
                        shardings)
  return graphdef, params, shardings


def count_params(abs_params) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(abs_params)))
