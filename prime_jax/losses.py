"""The model joined to the core: noisy batches and per-token losses for text and images.

Dimension key: B batch, S token grid ((L,) text, (H, W, channels) images), K sub-tokens per token,
D model width, C token classes.

Every function takes the model as (graphdef, params) and the static `Task`, so it can be jitted and
differentiated. Text runs the DiT trunk and the fused head kernel (no (B, L, C) logits); images
materialise their C = 256 logits and use the core objectives as they are. The autoregressive
baseline (`Task.autoregressive`) has no diffusion: its loss is the exact next-token NLL.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from prime_jax.diffusion import forward, objectives, parameterization, schedules, subtokens
from prime_jax.kernels import head as head_kernel


@dataclasses.dataclass(frozen=True)
class Task:
  """Everything the pure step functions need besides arrays (hashable, static under jit)."""
  codec: subtokens.Codec
  schedule: schedules.Schedule
  carry_over: bool
  objective: str  # what training differentiates: 'nelbo' (the valid bound) or 'paper'
  sampling_eps: float
  antithetic: bool
  image: bool = False  # UNet on a (H, W, channels) token grid: logits are materialised (C = 256)
  # The text head's row compaction (exact; see kernels.head). None: every row gets the full head.
  compaction: Optional[head_kernel.Compaction] = None
  # A causal model (models.ar) scored on the next token: no times, no masks; codec.ell == 1.
  autoregressive: bool = False
  # The mesh the batch is split over (`Experiment.task_on`): the head kernel runs on each device's
  # share of the batch (its compaction per device). None: the mesh set with `jax.set_mesh`, if any.
  mesh: Optional[jax.sharding.Mesh] = None


def noisy_batch(x0_BxS, key, task: Task):
  """Draws t (B,) and y_t (B, *S, K) for clean tokens (B, *S); returns (t_B, y_t, dropout key)."""
  k_t, k_mask, k_drop = jax.random.split(key, 3)
  codec = task.codec
  t_B = forward.sample_times(k_t, x0_BxS.shape[0], eps=task.sampling_eps,
                             antithetic=task.antithetic)
  y_t = forward.mask(k_mask, codec.encode(x0_BxS), t_B, schedule=task.schedule,
                     mask_id=codec.mask_id)
  return t_B, y_t, k_drop


def per_token_losses(params, graphdef, x0_BxS, t_B, y_t, task: Task, *, train: bool = False,
                     dropout_key=None, with_nelbo: bool = True) -> dict[str, jax.Array]:
  """Per-token losses (B, *S) at times t_B and noisy sub-tokens y_t:
    'nelbo'      the valid bound (what every NLL / PPL / BPD reports);
    'paper'      the authors' training objective: text w(t) -log p(x0 | y_t) (not a bound for
                 ell > 1); images the unweighted -log p(x0 | y_t) at every token;
    'paper_nll'  images only: the authors' NLL estimator, the weighted joint (no bound for ell > 1).
  """
  model = nnx.merge(graphdef, params)
  if task.image:
    logits = model(y_t, t_B, deterministic=not train, rngs=dropout_key)
    log_p = parameterization.log_probs(logits, y_t, task.codec, carry_over=task.carry_over)
    return {'nelbo': objectives.nelbo(log_p, x0_BxS, y_t, t_B, task.codec,
                                      schedule=task.schedule),
            'paper': objectives.image_paper_loss(log_p, x0_BxS),
            'paper_nll': objectives.paper_loss(log_p, x0_BxS, t_B, schedule=task.schedule)}
  rngs = nnx.Rngs(dropout=dropout_key) if dropout_key is not None else None
  h_BxLxD = model.features(y_t, deterministic=not train, rngs=rngs)
  kernel_DxC, bias_C = model.head_weights()
  return head_kernel.head_losses(h_BxLxD, kernel_DxC, bias_C, x0_BxS, y_t,
                                 task.schedule.weight(t_B), task.codec,
                                 carry_over=task.carry_over, with_nelbo=with_nelbo,
                                 compaction=task.compaction, mesh=task.mesh)


def autoregressive_losses(params, graphdef, x0_BxL, task: Task, *, train: bool = False,
                          dropout_key=None) -> dict[str, jax.Array]:
  """(B, L - 1) exact next-token NLL -log p(x_{i+1} | x_{<=i}) of a causal model (models.ar):
  input x0[:, :-1], targets x0[:, 1:], as the authors' AR (the first token is never predicted).
  Under both names 'nelbo' and 'paper', so the loop and the evaluator need no special case. The
  head kernel with every (single) digit masked and no carry-over filter is a plain log-softmax over
  the C classes, computed a vocabulary tile at a time."""
  model = nnx.merge(graphdef, params)
  rngs = nnx.Rngs(dropout=dropout_key) if dropout_key is not None else None
  h_BxLxD = model.features(x0_BxL[:, :-1], deterministic=not train, rngs=rngs)
  kernel_DxC, bias_C = model.head_weights()
  targets_BxL = x0_BxL[:, 1:]
  y_BxLx1 = jnp.full(targets_BxL.shape + (1,), task.codec.mask_id, jnp.int32)
  nll = head_kernel.head_losses(h_BxLxD, kernel_DxC, bias_C, targets_BxL, y_BxLx1,
                                jnp.ones(x0_BxL.shape[:1], jnp.float32), task.codec,
                                carry_over=False, with_nelbo=False, mesh=task.mesh)['paper']
  return {'nelbo': nll, 'paper': nll}


def training_loss(params, graphdef, x0_BxS, key, task: Task):
  """(the loss to differentiate, token means of every per-token loss)."""
  if task.autoregressive:  # the exact NLL: both objectives train it
    per_token = autoregressive_losses(params, graphdef, x0_BxS, task, train=True,
                                      dropout_key=jax.random.fold_in(key, 0xD0))
    means = {k: objectives.token_mean(v) for k, v in per_token.items()}
    return means[task.objective], means
  t_B, y_t, k_drop = noisy_batch(x0_BxS, key, task)
  per_token = per_token_losses(params, graphdef, x0_BxS, t_B, y_t, task, train=True,
                               dropout_key=k_drop,
                               with_nelbo=task.image or task.objective == 'nelbo')
  means = {k: objectives.token_mean(v) for k, v in per_token.items()}
  return means[task.objective], means


def reference_losses(log_p_C, x0_BxL, t_B, y_t, task: Task) -> jax.Array:
  """(B, L) per-token NELBO of a context-free model log p (C,) (e.g. the training unigram): the
  head kernel with zero features, on the same draws as the model."""
  h_BxLx1 = jnp.zeros(x0_BxL.shape + (1,), jnp.float32)
  kernel_1xC = jnp.zeros((1, log_p_C.shape[0]), jnp.float32)
  return head_kernel.head_losses(h_BxLx1, kernel_1xC, log_p_C.astype(jnp.float32), x0_BxL, y_t,
                                 task.schedule.weight(t_B), task.codec,
                                 carry_over=task.carry_over, compaction=task.compaction,
                                 mesh=task.mesh)['nelbo']
