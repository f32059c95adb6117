"""The optimizer: AdamW with warm-up and a constant or cosine learning rate, clipping, parameter
groups declared by the model, and the EMA of the weights."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from prime_jax.models.layers import HeadParam


@dataclasses.dataclass(frozen=True)
class OptimSettings:
  lr: float = 3e-4
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  head_b2: float = 0.0  # Adam b2 of the model's output head (its HeadParams); 0: b2
  weight_decay: float = 0.0
  warmup_steps: int = 2500
  schedule: str = 'constant'  # constant | cosine (after warm-up)
  final_lr_frac: float = 0.1  # cosine only
  grad_clip: float = 1.0  # 0: none
  ema_decay: float = 0.9999

  def __post_init__(self):
    if self.schedule not in ('constant', 'cosine'):
      raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {self.schedule!r}.")
    if not 0.0 <= self.head_b2 < 1.0:
      raise ValueError(f'optim.head_b2={self.head_b2} must lie in [0, 1) (0 = the same as '
                       'optim.b2).')


def learning_rate(o: OptimSettings, num_steps: int) -> optax.Schedule:
  warmup = max(int(o.warmup_steps), 1)
  if o.schedule == 'constant':
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup),
                                 optax.constant_schedule(o.lr)], [warmup])
  # decay_steps counts the warm-up and must exceed it, also for runs shorter than the warm-up.
  return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(num_steps, warmup + 1),
                                            end_value=o.lr * o.final_lr_frac)


def head_labels(params) -> object:
  """'head' for the parameters the model declares as its output head (`HeadParam`), else
  'trunk'. The head's columns are a sparse-gradient problem: a token's column gets a large
  gradient on the few steps it is a target and a tiny one of one sign on all others, so a short
  second-moment memory (small b2) forgets the large ones and pushes every rare token down."""
  labels = jax.tree.map(lambda v: 'head' if isinstance(v, HeadParam) else 'trunk', params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
  if 'head' not in jax.tree.leaves(labels):
    raise ValueError('optim.head_b2 is set but this model declares no output-head parameters '
                     '(the DiT does; the UNet does not): set optim.head_b2=0.')
  return labels


def make_optimizer(o: OptimSettings, num_steps: int):
  """(optax transformation, lr schedule)."""
  lr = learning_rate(o, num_steps)
  chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  adam = lambda b2: optax.adamw(lr, b1=o.b1, b2=b2, eps=o.eps, weight_decay=o.weight_decay)
  if not o.head_b2 or o.head_b2 == o.b2:
    chain.append(adam(o.b2))
  else:
    chain.append(optax.multi_transform({'trunk': adam(o.b2), 'head': adam(o.head_b2)},
                                       head_labels))
  return optax.chain(*chain), lr


def ema_decay(step, decay: float):
  """The reference EMA warm-up: min(decay, (1 + n) / (10 + n))."""
  n = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def ema_update(ema, params, step, decay: float):
  d = ema_decay(step, decay)
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
