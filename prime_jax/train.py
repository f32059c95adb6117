"""Training: TrainState, initialisation on a mesh, the pure train step, and train_and_evaluate.

Dimension key: B global batch, L tokens per sequence, K sub-tokens per token, C token classes.

Randomness is a function of (seed, step): the step is folded into the key inside the jitted step, so
resuming needs no saved RNG and results do not depend on how the batch is sharded.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from prime_jax import checkpoint as checkpoint_lib
from prime_jax import sharding as sharding_lib
from prime_jax.diffusion import (forward, fused_head, objectives, parameterization, schedules,
                                 subtokens)
from prime_jax.metrics import writer as writer_lib
from prime_jax.models import dit, unet


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema: Any


@dataclasses.dataclass(frozen=True)
class Task:
  """Everything the pure step functions need besides arrays (hashable, static under jit)."""
  codec: subtokens.Codec
  schedule: schedules.Schedule
  carry_over: bool
  objective: str
  sampling_eps: float
  antithetic: bool
  image: bool = False  # UNet on a (H, W, channels) token grid: logits are materialised (C = 256)
  # Train on objectives.self_normalized_mean (text): the same objective, lower variance.
  self_normalize: bool = False
  # > 0: the text head runs only on tokens with a masked sub-token (fused_head.head_losses).
  head_active_fraction: float = 0.0
  # > 0 too: tokens with exactly one masked sub-token take fused_head.single_digit_losses.
  head_single_fraction: float = 0.0


# -- building blocks from the config ----------------------------------------------------------------


def build_codec(cfg: ml_collections.ConfigDict) -> subtokens.Codec:
  d = cfg.diffusion
  return subtokens.Codec(d.vocab_size, d.ell,
                         shuffle_seed=None if d.shuffle_seed < 0 else d.shuffle_seed)


def build_task(cfg: ml_collections.ConfigDict, mesh=None) -> Task:
  """The static description of the diffusion problem. With a `mesh` whose batch is not sharded
  (data * fsdp == 1) and `train.compact_head`, the text head skips fully visible tokens (exact)."""
  d = cfg.diffusion
  if d.objective not in ('nelbo', 'paper'):
    raise ValueError(f"diffusion.objective must be 'nelbo' or 'paper', got {d.objective!r}.")
  kw = {'eps': d.schedule_eps} if d.schedule == 'loglinear' else {}
  if d.schedule == 'poly':
    kw = {'n': d.get('schedule_n', 3.0)}
  schedule, image = schedules.get(d.schedule, **kw), is_image(cfg)
  codec = build_codec(cfg)
  self_normalize = bool(d.get('self_normalize', False))
  if self_normalize and image:
    raise ValueError('diffusion.self_normalize is for text: the image training loss is '
                     'unweighted already. Set it to False for image sources.')
  fraction = single = 0.0
  if (mesh is not None and cfg.train.get('compact_head', True) and d.carry_over and not image
      and mesh.shape.get('data', 1) * mesh.shape.get('fsdp', 1) == 1):
    fraction = fused_head.active_fraction(schedule, codec.ell, float(d.sampling_eps))
    if codec.ell > 1 and cfg.train.get('single_digit_head', False):
      single = fused_head.active_fraction(schedule, codec.ell, float(d.sampling_eps),
                                          exactly_one=True)
      fraction = fused_head.active_fraction(schedule, codec.ell, float(d.sampling_eps),
                                            at_least_two=True)
  return Task(codec=codec, schedule=schedule, carry_over=bool(d.carry_over),
              objective=d.objective, sampling_eps=float(d.sampling_eps),
              antithetic=bool(d.antithetic), image=image, head_active_fraction=fraction,
              head_single_fraction=single, self_normalize=self_normalize)


def is_image(cfg: ml_collections.ConfigDict) -> bool:
  """Images (UNet, token grid (H, W, channels)) or text (DiT, (L,)); the two must agree."""
  from prime_jax.data import images  # pylint: disable=import-outside-toplevel
  name, image_data = cfg.model.get('name', 'dit'), images.is_image_source(cfg.data.source)
  if name not in ('dit', 'unet'):
    raise ValueError(f"model.name must be 'dit' (text) or 'unet' (images), got {name!r}.")
  if (name == 'unet') != image_data:
    raise ValueError(f'model.name={name!r} does not fit data.source={cfg.data.source!r}: use '
                     f"'unet' for the image sources {sorted(images.SOURCES)} and 'dit' for text.")
  return name == 'unet'


def token_shape(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The token grid S of one example: (L,) for text, (H, W, channels) for images."""
  if is_image(cfg):
    from prime_jax.data import images  # pylint: disable=import-outside-toplevel
    return images.image_shape(cfg.data.source)
  return (cfg.data.seq_len,)


def build_model(cfg: ml_collections.ConfigDict, codec: subtokens.Codec,
                rngs: nnx.Rngs) -> dit.DiT | unet.UNet:
  m = cfg.model
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[m.dtype]
  if is_image(cfg):
    u = m.unet
    return unet.UNet(vocab_size=codec.vocab_size, base=codec.base, ell=codec.ell,
                     image_channels=token_shape(cfg)[-1], model_channels=u.model_channels,
                     channel_mult=tuple(u.channel_mult), num_res_blocks=u.num_res_blocks,
                     attention_resolutions=tuple(u.attention_resolutions),
                     head_channels=u.head_channels, dropout=m.dropout, norm_groups=u.norm_groups,
                     time_conditioning=m.time_conditioning, remat=m.remat, dtype=dtype, rngs=rngs)
  return dit.DiT(vocab_size=codec.vocab_size, base=codec.base, ell=codec.ell, dim=m.dim,
                 num_heads=m.num_heads, num_layers=m.num_layers, cond_dim=m.cond_dim,
                 mlp_ratio=m.mlp_ratio, dropout=m.dropout, time_conditioning=m.time_conditioning,
                 scan_layers=m.scan_layers, remat=m.remat, dtype=dtype,
                 head_init_scale=m.get('head_init_scale', 0.0),
                 adaln_init_scale=m.get('adaln_init_scale', 0.0),
                 head_tail_start=m.get('head_tail_start', 0),
                 head_tail_rank=m.get('head_tail_rank', 0),
                 rope_base=m.get('rope_base', 10000.0),
                 distance_bias_slope=m.get('distance_bias_slope', 0.0), rngs=rngs)


def make_optimizer(o: ml_collections.ConfigDict, num_steps: int):
  """AdamW with warm-up then constant or cosine, gradient clipping. Returns (tx, lr schedule)."""
  warmup = max(int(o.warmup_steps), 1)
  if o.schedule == 'constant':
    lr = optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup),
                               optax.constant_schedule(o.lr)], [warmup])
  elif o.schedule == 'cosine':
    # decay_steps counts the warm-up and must exceed it, also for runs shorter than the warm-up.
    lr = optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(num_steps, warmup + 1),
                                            end_value=o.lr * o.final_lr_frac)
  else:
    raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {o.schedule!r}.")
  chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  adam = lambda b2, rate=lr: optax.adamw(rate, b1=o.b1, b2=b2, eps=o.eps,
                                          weight_decay=o.weight_decay)
  head_b2 = float(o.get('head_b2', 0.0) or 0.0) or o.b2
  adaln_scale = float(o.get('adaln_lr_scale', 1.0))
  if not 0.0 < head_b2 < 1.0:
    raise ValueError(f'optim.head_b2={head_b2} must lie in (0, 1) (0 = the same as optim.b2).')
  if adaln_scale <= 0:
    raise ValueError(f'optim.adaln_lr_scale={adaln_scale} must be > 0 (1 = the same lr).')
  if head_b2 == o.b2 and adaln_scale == 1.0:
    chain.append(adam(o.b2))
  else:
    groups = {'trunk': adam(o.b2)}
    if head_b2 != o.b2:
      groups['head'] = adam(head_b2)
    if adaln_scale != 1.0:
      groups['adaln'] = adam(o.b2, lambda step: adaln_scale * lr(step))
    named = tuple(k for k in groups if k != 'trunk')
    chain.append(optax.multi_transform(groups,
                                       functools.partial(optimizer_groups, groups=named)))
  return optax.chain(*chain), lr


_HEAD_MODULES = ('head', 'tail', 'tail_proj')


def optimizer_groups(params, groups=('head', 'adaln')):
  """The DiT's parameters by optimiser group (those in `groups`, the rest 'trunk'): 'head'
  (final.head, and the tail head's final.tail_proj and final.tail; Adam b2 = `optim.head_b2`),
  'adaln' (every adaLN modulation, blocks.*.adaln and final.adaln; lr x `optim.adaln_lr_scale`).

  The head's columns are a sparse-gradient problem: a token's column gets a large gradient on the
  few steps it is a target and a tiny one of one sign (its softmax probability) on all others. With
  a short second-moment memory (small b2) Adam forgets the large ones within ~1 / (1 - b2) steps
  and then moves the column by ~lr per step on the tiny ones, pushing every rare token down.
  An adaLN layer maps the time embedding to per-feature scales and gates: Adam moves all of a
  scale's inputs by ~lr at once, so the scale moves by up to ~lr x fan-in per step. (On sotu a
  scale of 0.1 did not help; README.)
  """
  def label(path, _):
    names = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
    if 'head' in groups and len(names) > 1 and names[0] == 'final' and names[1] in _HEAD_MODULES:
      return 'head'
    return 'adaln' if 'adaln' in groups and 'adaln' in names else 'trunk'
  labels = jax.tree_util.tree_map_with_path(label, params)
  missing = set(groups) - set(jax.tree.leaves(labels))
  if missing:
    raise ValueError(f'The optimiser groups {sorted(missing)} have no parameters in this model '
                     '(optim.head_b2 and optim.adaln_lr_scale apply to the DiT text models); '
                     'set optim.head_b2=0 and optim.adaln_lr_scale=1.')
  return labels


def ema_decay(step, decay: float):
  """The reference EMA warm-up: min(decay, (1 + n) / (10 + n))."""
  n = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


# -- the pure step functions -------------------------------------------------------------------------


def noisy_batch(x0_BxL, key, task: Task):
  """Draws t (B,) and y_t (B, *S, K) for clean tokens (B, *S); returns (t_B, y_t, dropout key)."""
  k_t, k_mask, k_drop = jax.random.split(key, 3)
  codec = task.codec
  t_B = forward.sample_times(k_t, x0_BxL.shape[0], eps=task.sampling_eps,
                             antithetic=task.antithetic)
  y_t = forward.mask(k_mask, codec.encode(x0_BxL), t_B, schedule=task.schedule,
                     mask_id=codec.mask_id)
  return t_B, y_t, k_drop


def diffusion_losses(params, graphdef, x0_BxL, key, task: Task, *, train: bool,
                     with_nelbo: bool = True):
  """Draws t and y_t, runs the model; returns per-token losses {'nelbo', 'paper'}: (B, L)."""
  t_B, y_t, k_drop = noisy_batch(x0_BxL, key, task)
  return losses_at(params, graphdef, x0_BxL, t_B, y_t, task, train=train, dropout_key=k_drop,
                   with_nelbo=with_nelbo)


def losses_at(params, graphdef, x0_BxL, t_B, y_t, task: Task, *, train: bool = False,
              dropout_key=None, with_nelbo: bool = True):
  """Per-token {'nelbo', 'paper'} (B, L) at given times t_B and noisy sub-tokens y_t."""
  model = nnx.merge(graphdef, params)
  rngs = nnx.Rngs(dropout=dropout_key) if dropout_key is not None else None
  h_BxLxD = model.features(y_t, deterministic=not train, rngs=rngs)
  head = model.head_params()
  # The head, carry-over filter and both objectives, tiled over the vocabulary: no (B, L, C)
  # logits are materialised (equal to objectives.fused_losses on model(y_t); tested).
  return fused_head.head_losses(h_BxLxD, head.kernel, head.bias, x0_BxL, y_t, t_B, task.codec,
                                tail=head.tail,
                                schedule=task.schedule, carry_over=task.carry_over,
                                with_nelbo=with_nelbo,
                                active_fraction=task.head_active_fraction,
                                single_fraction=task.head_single_fraction)


def image_losses(params, graphdef, x0_BxHxWxC, key, task: Task, *, train: bool):
  """Draws t and y_t, runs the UNet; per-token losses (B, H, W, C):
    'nelbo'      the valid bound (SPEC 4.3), what NLL / BPD report;
    'paper'      the reference image training loss: unweighted -log p(x0 | y_t) at every token;
    'paper_nll'  the reference's NLL estimator (SPEC 7.4): the weighted joint; no bound for ell > 1.
  C = 256 classes are few, so the logits are materialised and the core objectives used as they are.
  """
  codec = task.codec
  t_B, y_t, k_drop = noisy_batch(x0_BxHxWxC, key, task)
  model = nnx.merge(graphdef, params)
  logits = model(y_t, t_B, deterministic=not train, rngs=k_drop)
  log_p = parameterization.log_probs(logits, y_t, codec, carry_over=task.carry_over)
  return {'nelbo': objectives.nelbo(log_p, x0_BxHxWxC, y_t, t_B, codec, schedule=task.schedule),
          'paper': objectives.image_paper_loss(log_p, x0_BxHxWxC),
          'paper_nll': objectives.paper_loss(log_p, x0_BxHxWxC, t_B, schedule=task.schedule)}


def training_loss(params, graphdef, x0_BxL, key, task: Task):
  """(the loss to differentiate, token means of every per-token loss)."""
  if task.image:
    per_token = image_losses(params, graphdef, x0_BxL, key, task, train=True)
    means = {k: objectives.token_mean(v) for k, v in per_token.items()}
    return means[task.objective], means
  t_B, y_t, k_drop = noisy_batch(x0_BxL, key, task)
  per_token = losses_at(params, graphdef, x0_BxL, t_B, y_t, task, train=True, dropout_key=k_drop,
                        with_nelbo=task.objective == 'nelbo')
  means = {k: objectives.token_mean(v) for k, v in per_token.items()}
  if not task.self_normalize:
    return means[task.objective], means
  loss = objectives.self_normalized_mean(per_token[task.objective], y_t, t_B,
                                         schedule=task.schedule, mask_id=task.codec.mask_id)
  return loss, dict(means, self_normalized=loss)


def train_step(state: TrainState, batch, *, graphdef, task: Task, tx, ema_decay_max: float,
               seed: int):
  key = jax.random.fold_in(jax.random.key(seed), state.step)
  grad_fn = jax.value_and_grad(training_loss, has_aux=True)
  (loss, aux), grads = grad_fn(state.params, graphdef, batch['tokens'], key, task)
  updates, new_opt = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  d = ema_decay(state.step, ema_decay_max)
  new_ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema, new_params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  # A non-finite step leaves the state untouched; the host stops the run on the flag, so every
  # checkpoint holds finite parameters.
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                         opt_state=keep(new_opt, state.opt_state), ema=keep(new_ema, state.ema))
  metrics = dict(aux, loss=loss, grad_norm=grad_norm, finite=finite)
  return new_state, metrics


def eval_step(params, batch, key, *, graphdef, task: Task):
  """Sums over the real (unpadded) examples of the batch, per original token (any token grid)."""
  losses = image_losses if task.image else diffusion_losses
  per_token = losses(params, graphdef, batch['tokens'], key, task, train=False)
  tokens = batch['tokens']
  w_BxL = jnp.broadcast_to(batch['mask'].reshape((-1,) + (1,) * (tokens.ndim - 1)),
                           tokens.shape).astype(jnp.float32)
  sums = {k: jnp.sum(v * w_BxL) for k, v in per_token.items()}
  return dict(sums, tokens=jnp.sum(w_BxL))


# -- initialisation on a mesh ------------------------------------------------------------------------


def abstract_model(cfg, codec):
  """(graphdef, abstract params, logical PartitionSpecs) without allocating anything."""
  abstract = nnx.eval_shape(lambda: build_model(cfg, codec, nnx.Rngs(0)))
  graphdef, params = nnx.split(abstract, nnx.Param)
  logical = nnx.get_partition_spec(params)
  return graphdef, params, logical


def state_shardings(cfg, codec, tx, mesh):
  """(graphdef, abstract TrainState with shardings, TrainState of NamedShardings)."""
  graphdef, abs_params, logical = abstract_model(cfg, codec)
  param_sh = sharding_lib.shardings_for(logical, abs_params, mesh)
  abs_opt = jax.eval_shape(tx.init, abs_params)
  # Optimizer moments follow the parameters they belong to; scalars (counts) are replicated.
  shapes = {tuple(x.shape): s for x, s in zip(jax.tree.leaves(abs_params),
                                               jax.tree.leaves(param_sh))}

  def opt_sharding(x):
    return shapes.get(tuple(x.shape), sharding_lib.replicated(mesh)) if x.ndim else \
        sharding_lib.replicated(mesh)
  opt_sh = jax.tree.map(opt_sharding, abs_opt)
  sh = TrainState(step=sharding_lib.replicated(mesh), params=param_sh, opt_state=opt_sh,
                  ema=param_sh)
  abs_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abs_params,
                         opt_state=abs_opt, ema=abs_params)
  abs_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           abs_state, sh)
  return graphdef, abs_state, sh


def head_bias_prior(cfg) -> np.ndarray | None:
  """log p(token) of the add-one-smoothed training unigram, when `model.head_bias_init='unigram'`.

  With the zero-initialised head kernel the model then starts at the unigram distribution instead
  of the uniform one, so the first few hundred steps go to context rather than token frequencies
  (a data-dependent initialisation; it changes no equation of the method).
  """
  mode = cfg.model.get('head_bias_init', '')
  if not mode:
    return None
  if mode != 'unigram':
    raise ValueError(f"model.head_bias_init must be '' or 'unigram', got {mode!r}.")
  from prime_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  return pipeline.unigram_log_probs(cfg.data.source, cfg.data.seq_len,
                                    data_dir=cfg.data.data_dir or None).astype(np.float32)


def init_state(cfg, codec, tx, mesh, shardings, head_bias_C: np.ndarray | None = None):
  def init(bias_C):
    model = build_model(cfg, codec, nnx.Rngs(params=cfg.seed))
    if bias_C is not None:
      model.final.set_bias(bias_C)
    params = nnx.state(model, nnx.Param)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema=params)
  del mesh  # the NamedShardings carry it
  return jax.jit(init, out_shardings=shardings)(head_bias_C)


def count_params(abs_params) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(abs_params)))


# -- the loop ----------------------------------------------------------------------------------------

PEAK_FLOPS = {  # dense bf16 per device (fp32 for CPU), for the MFU estimate
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
    'TPU v6 lite': 918e12, 'TPU v6e': 918e12, 'H100': 989e12, 'H200': 989e12, 'A100': 312e12,
}


def peak_flops_per_device(cfg) -> float:
  if cfg.train.peak_flops > 0:
    return float(cfg.train.peak_flops)
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  import os
  # CPU: ~70 GFLOP/s fp32 per core (measured: a 2048x256x50257 matmul runs at 93-138 GFLOP/s on 2 cores).
  return 70e9 * (os.cpu_count() or 1) / max(jax.local_device_count(), 1)


def train_flops_per_token(cfg, codec, n_params_non_embedding: int) -> float:
  """6 N (forward + backward matmuls, head included) + bidirectional attention counted fully:
  per layer 2 * 2 * L * D for QK^T and AV forward, times 3 for the backward pass."""
  m = cfg.model
  return 6.0 * n_params_non_embedding + 12.0 * m.num_layers * m.dim * cfg.data.seq_len


def _fmt_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class Trainer:
  """Owns the mesh, the compiled steps and the data; `train_and_evaluate` drives it."""

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, devices=None):
    self.cfg, self.workdir = cfg, workdir
    sharding_lib.maybe_initialize_distributed()
    self.mesh = sharding_lib.make_mesh(dict(cfg.mesh), devices)
    sharding_lib.check_batch(cfg.data.batch_size, self.mesh)
    self.eval_batch = cfg.eval.batch_size or cfg.data.batch_size
    sharding_lib.check_batch(self.eval_batch, self.mesh)
    self.task = build_task(cfg, self.mesh)
    self.codec = self.task.codec
    self.tx, self.lr = make_optimizer(cfg.optim, cfg.train.num_steps)
    self.graphdef, self.abs_state, self.shardings = state_shardings(cfg, self.codec, self.tx,
                                                                    self.mesh)
    self.token_shape = token_shape(cfg)  # (L,) text, (H, W, channels) images
    batch_sh = {'tokens': sharding_lib.batch_sharding(self.mesh, 1 + len(self.token_shape))}
    self.train_step = jax.jit(
        functools.partial(train_step, graphdef=self.graphdef, task=self.task, tx=self.tx,
                          ema_decay_max=cfg.optim.ema_decay, seed=cfg.seed),
        in_shardings=(self.shardings, batch_sh), out_shardings=(self.shardings, None),
        donate_argnums=0)
    eval_sh = dict(batch_sh, mask=sharding_lib.batch_sharding(self.mesh, 1))
    self.eval_step = jax.jit(
        functools.partial(eval_step, graphdef=self.graphdef, task=self.task),
        in_shardings=(self.shardings.params, eval_sh, None))
    self.n_params = count_params(self.abs_state.params)
    emb = sum(math.prod(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(
        self.abs_state.params) if 'embed' in jax.tree_util.keystr(p).lower()
        and 'table' in jax.tree_util.keystr(p).lower())
    self.flops_per_token = train_flops_per_token(cfg, self.codec, self.n_params - emb)
    if self.task.image:  # forward + backward = 3 x the forward FLOPs, per colour-channel token
      model = nnx.merge(self.graphdef, self.abs_state.params)  # shapes only
      self.flops_per_token = 3.0 * model.forward_flops(*self.token_shape[:2]) / math.prod(
          self.token_shape)
    self._evaluator = None

  def data_iterator(self, split: str, *, train: bool, batch: int):
    from prime_jax.data import pipeline  # not needed by --mode bench
    d = self.cfg.data
    if self.task.image:
      from prime_jax.data import images  # pylint: disable=import-outside-toplevel
      return images.make_image_pipeline(
          d.source, split, batch_size=batch // jax.process_count(), seed=self.cfg.seed,
          train=train, worker_count=d.worker_count, data_dir=d.data_dir or None,
          pad_final_batch=not train, random_flip=d.get('random_flip', False))
    return pipeline.make_text_pipeline(
        d.source, split, seq_len=d.seq_len, batch_size=batch // jax.process_count(),
        seed=self.cfg.seed, train=train, worker_count=d.worker_count, data_dir=d.data_dir or None,
        pad_final_batch=not train)

  def global_batch(self, local):
    self.codec.check(local['tokens'])
    arrays = {'tokens': np.asarray(local['tokens'], np.int32)}
    if 'mask' in local:
      arrays['mask'] = np.asarray(local['mask'], bool)
    return sharding_lib.global_batch(arrays, self.mesh)

  def evaluate(self, params) -> dict[str, float]:
    """Valid bound (nelbo) and the authors' objective, token means over the validation split.

    The same deterministic, mesh-independent estimator as `--mode eval` (prime_jax.evaluate).
    """
    if self.task.image:
      return self.evaluate_images(params)
    if self._evaluator is None:
      from prime_jax import evaluate as evaluate_lib  # pylint: disable=import-outside-toplevel
      self._evaluator = evaluate_lib.Evaluator(self.cfg, self.mesh, self.graphdef,
                                               self.shardings.params, self.task)
    return self._evaluator.run(params)

  def evaluate_images(self, params) -> dict[str, float]:
    """Images: one t per image (stratified over the batch), keys folded from (eval.seed, batch).

    'nll' is the valid bound in nats per colour-channel token and 'bpd' = nll / ln 2; the
    reference's training loss ('paper_objective') and NLL estimator ('paper_nll', 'paper_bpd', not a
    bound for ell > 1) stand beside it.
    """
    cfg = self.cfg
    it = self.data_iterator(cfg.eval.split, train=False, batch=self.eval_batch)
    sums, n = {}, 0
    for i, local in enumerate(it):
      if cfg.eval.num_batches and i >= cfg.eval.num_batches:
        break
      key = jax.random.fold_in(jax.random.key(cfg.eval.seed), i)
      for k, v in jax.device_get(self.eval_step(params, self.global_batch(local), key)).items():
        sums[k] = sums.get(k, 0.0) + float(v)
      n += 1
    tokens = sums.get('tokens', 0.0)
    if tokens == 0:
      raise ValueError(f'The {cfg.eval.split} split of {cfg.data.source} is empty.')
    nll, paper_nll = sums['nelbo'] / tokens, sums['paper_nll'] / tokens
    return {'nll': nll, 'bpd': float(objectives.bits_per_dim(nll)),
            'paper_objective': sums['paper'] / tokens, 'paper_nll': paper_nll,
            'paper_bpd': float(objectives.bits_per_dim(paper_nll)), 'batches': n,
            'tokens': tokens}


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str,
                       devices=None) -> dict[str, float]:
  """Trains (resuming from WORKDIR when it holds a checkpoint), evaluates, returns the summary."""
  tr = Trainer(cfg, workdir, devices)
  writer = writer_lib.MetricWriter(workdir)
  ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=cfg.train.keep_ckpts)
  checkpoint_lib.write_json(f'{workdir}/config.json', cfg.to_dict())
  if jax.process_index() == 0:
    from clu import parameter_overview  # shapes only: no TensorFlow, nothing allocated
    with open(f'{workdir}/parameters.txt', 'w') as f:
      f.write(parameter_overview.get_parameter_overview(nnx.to_pure_dict(tr.abs_state.params),
                                                        include_stats=False))
  train_iter = tr.data_iterator('train', train=True, batch=cfg.data.batch_size)
  meta = {'config_summary': dict(vocab_size=cfg.diffusion.vocab_size, ell=cfg.diffusion.ell,
                                 dim=cfg.model.dim, layers=cfg.model.num_layers)}
  if ckpt.latest_step() is not None:
    state, _ = ckpt.restore(tr.abs_state, data_iterator=train_iter)
    writer.print(f'Resumed from step {int(state.step)} in {ckpt.directory}')
  else:
    state = init_state(cfg, tr.codec, tr.tx, tr.mesh, tr.shardings, head_bias_prior(cfg))
  writer.print(f'MDM-Prime: C={tr.codec.vocab_size} ell={tr.codec.ell} base={tr.codec.base} '
               f'params={tr.n_params:,} objective={cfg.diffusion.objective} '
               f'carry_over={cfg.diffusion.carry_over} mesh={dict(tr.mesh.shape)} '
               f'devices={jax.device_count()} ({jax.devices()[0].device_kind})')
  peak = peak_flops_per_device(cfg) * jax.device_count()
  tokens_per_step = cfg.data.batch_size * math.prod(tr.token_shape)
  start_step = int(state.step)
  t_last, step_last = time.time(), start_step
  t_start = t_last
  last_eval = {}
  for step in range(start_step, cfg.train.num_steps):
    state, metrics = tr.train_step(state, tr.global_batch(next(train_iter)))
    done = step + 1
    if done % cfg.train.log_every == 0 or done == cfg.train.num_steps:
      m = jax.device_get(metrics)
      if not bool(m['finite']):
        ckpt.close()
        raise FloatingPointError(
            f'Non-finite loss or gradient at step {done} (loss={float(m["loss"])}, '
            f'grad_norm={float(m["grad_norm"])}). The update was not applied; the last good '
            f'checkpoint is step {ckpt.latest_step()} in {ckpt.directory}. Lower optim.lr or '
            'check the data.')
      now = time.time()
      sps = (done - step_last) / max(now - t_last, 1e-9)
      row = {k: float(v) for k, v in m.items() if k != 'finite'}
      row.update(lr=float(tr.lr(done)), steps_per_sec=sps, tokens_per_sec=sps * tokens_per_step,
                 mfu=sps * tokens_per_step * tr.flops_per_token / peak)
      writer.write(done, row, prefix='train/')
      eta = (cfg.train.num_steps - done) / max(sps, 1e-9)
      writer.print(f'step {done:>7d}/{cfg.train.num_steps} loss {row["loss"]:.4f} '
                   f'lr {row["lr"]:.2e} {sps:.2f} steps/s {row["tokens_per_sec"]:,.0f} tok/s '
                   f'mfu {100 * row["mfu"]:.1f}% eta {_fmt_eta(eta)}')
      t_last, step_last = now, done
    if done % cfg.train.eval_every == 0 or done == cfg.train.num_steps:
      params = state.ema if cfg.eval.use_ema else state.params
      last_eval = tr.evaluate(params)
      writer.write(done, last_eval, prefix='eval/')
      if tr.task.image:
        writer.print(f'eval step {done}: NLL {last_eval["nll"]:.4f} nats/dim, BPD <= '
                     f'{last_eval["bpd"]:.4f} (valid bound); authors\' objective '
                     f'{last_eval["paper_objective"]:.4f}, authors\' BPD estimate '
                     f'{last_eval["paper_bpd"]:.4f} (not a bound for ell > 1)')
      else:
        cv = (f'; control variate NLL {last_eval["nll_cv"]:.4f} ± {last_eval["nll_cv_se"]:.4f}, '
              f'PPL <= {last_eval["ppl_bound_cv"]:.2f}') if 'nll_cv' in last_eval else ''
        writer.print(f'eval step {done}: NLL {last_eval["nll"]:.4f} ± {last_eval["nll_se"]:.4f} '
                     f'nats/token, PPL <= {last_eval["ppl_bound"]:.2f} (valid bound){cv}; '
                     f'authors\' objective {last_eval["paper_objective"]:.4f}')
    if done % cfg.train.ckpt_every == 0 or done == cfg.train.num_steps:
      if not bool(jax.device_get(metrics['finite'])):
        raise FloatingPointError(f'Non-finite loss at step {done}; not checkpointing.')
      ckpt.save(done, state, train_iter, meta=meta)
  ckpt.close()
  writer.close()
  summary = dict(last_eval, steps=int(state.step), params=tr.n_params,
                 wall_s=time.time() - t_start)
  return summary
