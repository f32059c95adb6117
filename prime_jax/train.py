"""Training: TrainState, the pure train step, initialisation on a mesh, and train_and_evaluate.

Dimension key: B global batch, S token grid ((L,) text, (H, W, channels) images).

Randomness is a function of (seed, step): the step is folded into the key inside the jitted step, so
resuming needs no saved RNG and results do not depend on how the batch is sharded.
"""

from __future__ import annotations

import functools
import json
import math
import time
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx

from prime_jax import build, losses, optim, preemption, report, rundir
from prime_jax import checkpoint as checkpoint_lib
from prime_jax import evaluate as evaluate_lib
from prime_jax import sharding as sharding_lib
from prime_jax.metrics import throughput
from prime_jax.metrics import writer as writer_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema: Any


# -- the pure step ---------------------------------------------------------------------------------


def train_step(state: TrainState, batch, *, graphdef, task: losses.Task, tx, ema_decay: float,
               seed: int):
  key = jax.random.fold_in(jax.random.key(seed), state.step)
  grad_fn = jax.value_and_grad(losses.training_loss, has_aux=True)
  (loss, aux), grads = grad_fn(state.params, graphdef, batch['tokens'], key, task)
  updates, new_opt = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  new_ema = optim.ema_update(state.ema, new_params, state.step, ema_decay)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  # A non-finite step leaves the state untouched; the host stops the run on the flag, so every
  # checkpoint holds finite parameters.
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                         opt_state=keep(new_opt, state.opt_state), ema=keep(new_ema, state.ema))
  metrics = dict(aux, loss=loss, grad_norm=grad_norm, finite=finite)
  return new_state, metrics


# -- initialisation on a mesh ----------------------------------------------------------------------


abstract_params = build.abstract_params


def state_shardings(make_model, tx, mesh):
  """(graphdef, abstract TrainState with shardings, TrainState of NamedShardings)."""
  graphdef, abs_params, logical = abstract_params(make_model)
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


def init_state(make_model, seed: int, tx, shardings, head_bias_C: Optional[np.ndarray] = None):
  """A fresh TrainState, created directly with its shardings."""
  def init(bias_C):
    model = make_model(rngs=nnx.Rngs(params=seed))
    if bias_C is not None:
      model.final.set_bias(bias_C)
    params = nnx.state(model, nnx.Param)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema=params)
  return jax.jit(init, out_shardings=shardings)(head_bias_C)


class Trainer:
  """The mesh, the sharded state's layout and the compiled train step of an Experiment."""

  def __init__(self, exp: build.Experiment, devices=None):
    self.exp = exp
    self.mesh = exp.mesh(devices)
    self.task = exp.task_on(self.mesh)
    self.codec = self.task.codec
    self.token_shape = exp.token_shape
    self.tx, self.lr = exp.make_optimizer()
    self.graphdef, self.abs_state, self.shardings = state_shardings(exp.make_model, self.tx,
                                                                    self.mesh)
    batch_sh = {'tokens': sharding_lib.batch_sharding(self.mesh, 1 + len(self.token_shape))}
    self.train_step = sharding_lib.OnMesh(jax.jit(
        functools.partial(train_step, graphdef=self.graphdef, task=self.task, tx=self.tx,
                          ema_decay=exp.optim.ema_decay, seed=exp.loop.seed),
        in_shardings=(self.shardings, batch_sh), out_shardings=(self.shardings, None),
        donate_argnums=0), self.mesh)
    self.n_params = build.count_params(self.abs_state.params)
    self.flops_per_token = throughput.train_flops_per_token(
        nnx.merge(self.graphdef, self.abs_state.params), self.token_shape)  # shapes only

  def init_state(self) -> TrainState:
    return init_state(self.exp.make_model, self.exp.loop.seed, self.tx, self.shardings,
                      self.exp.head_bias_prior())

  def global_batch(self, local) -> dict[str, jax.Array]:
    self.codec.check(local['tokens'])
    return sharding_lib.global_batch({'tokens': np.asarray(local['tokens'], np.int32)}, self.mesh)

  def evaluator(self) -> evaluate_lib.Evaluator:
    return evaluate_lib.Evaluator(self.exp, self.mesh, self.graphdef, self.shardings.params,
                                  self.task)


# -- the loop --------------------------------------------------------------------------------------


def _fmt_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str,
                       devices=None) -> dict[str, Any]:
  """Trains (resuming from WORKDIR when it holds a checkpoint), evaluates, returns the summary."""
  exp = build.experiment(cfg)
  tr = Trainer(exp, devices)
  loop = exp.loop
  rundir.record_config(workdir, cfg.to_dict())  # another run's workdir is refused: nothing written
  writer = writer_lib.MetricWriter(workdir)
  ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=loop.keep_ckpts)
  if jax.process_index() == 0:
    from clu import parameter_overview  # pylint: disable=import-outside-toplevel
    (epath.Path(workdir) / 'parameters.txt').write_text(  # shapes only: nothing allocated
        parameter_overview.get_parameter_overview(nnx.to_pure_dict(tr.abs_state.params),
                                                  include_stats=False))
  train_iter = exp.data.iterator('train', train=True)
  meta = {'config_summary': exp.summary}
  if ckpt.latest_step() is not None:
    state, _ = ckpt.restore(tr.abs_state, data_iterator=train_iter)
    writer.print(f'Resumed from step {int(state.step)} in {ckpt.directory}')
  else:
    state = tr.init_state()
  C = tr.codec.vocab_size
  what = (f'MDM-Prime: C={C} ell={tr.codec.ell} base={tr.codec.base} params={tr.n_params:,} '
          f'objective={tr.task.objective} carry_over={tr.task.carry_over}')
  if tr.task.autoregressive:
    what = f'AR (autoregressive baseline): C={C} params={tr.n_params:,} objective=next-token NLL'
  writer.print(f'{what} mesh={dict(tr.mesh.shape)} devices={jax.device_count()} '
               f'({jax.devices()[0].device_kind})')
  peak = throughput.peak_flops_per_device(loop.peak_flops) * jax.device_count()
  tokens_per_step = exp.data.batch_size * math.prod(tr.token_shape)
  evaluator = None
  start_step = int(state.step)
  if start_step >= loop.num_steps:
    writer.print(f'Step {start_step} reaches train.num_steps={loop.num_steps}: nothing to train '
                 '(raise train.num_steps to train further).')
  writer.resume(start_step)  # what an earlier run logged after this step is dropped
  writer.text(start_step, 'config', json.dumps(cfg.to_dict(), indent=2, sort_keys=True,
                                               default=str))
  mfu_note = ' (assumed peak)' if throughput.peak_is_assumed(loop.peak_flops) else ''
  t_start = time.time()
  clock = throughput.StepClock(start_step, t_start, loop.num_steps)
  last_eval = {}
  with preemption.StopRequest() as stop:  # SIGTERM / SIGINT: checkpoint, then exit
    for step in range(start_step, loop.num_steps):
      t_call = time.time()
      state, metrics = tr.train_step(state, tr.global_batch(next(train_iter)))
      if step == start_step:
        clock.exclude(time.time() - t_call)  # compilation is not training time
      done = step + 1
      if done % loop.log_every == 0 or done == loop.num_steps:
        m = jax.device_get(metrics)
        if not bool(m['finite']):
          ckpt.close()
          raise FloatingPointError(
              f'Non-finite loss or gradient at step {done} (loss={float(m["loss"])}, '
              f'grad_norm={float(m["grad_norm"])}). The update was not applied; the last good '
              f'checkpoint is step {ckpt.latest_step()} in {ckpt.directory}. Lower optim.lr or '
              'check the data.')
        sps, eta = clock.tick(done, time.time())
        row = {k: float(v) for k, v in m.items() if k != 'finite'}
        row.update(lr=float(tr.lr(done)), steps_per_sec=sps, tokens_per_sec=sps * tokens_per_step,
                   mfu=sps * tokens_per_step * tr.flops_per_token / peak)
        writer.write(done, row, prefix='train/')
        writer.print(f'step {done:>7d}/{loop.num_steps} loss {row["loss"]:.4f} '
                     f'lr {row["lr"]:.2e} {sps:.2f} steps/s {row["tokens_per_sec"]:,.0f} tok/s '
                     f'mfu {100 * row["mfu"]:.1f}%{mfu_note} eta {_fmt_eta(eta)}')
      stopping = done < loop.num_steps and stop.should_stop()
      # Saved before the evaluation (asynchronously), so a preemption during it loses nothing.
      if done % loop.ckpt_every == 0 or done == loop.num_steps or stopping:
        if not bool(jax.device_get(metrics['finite'])):
          raise FloatingPointError(f'Non-finite loss at step {done}; not checkpointing.')
        ckpt.save(done, state, train_iter, meta=meta)
      if stopping:
        ckpt.close()  # waits until the checkpoint is complete, on every process
        message = preemption.stopped_message(stop.signum, done, loop.num_steps, ckpt.directory)
        writer.print(message)
        writer.close()
        raise preemption.Preempted(stop.signum, done, message)
      if done % loop.eval_every == 0 or done == loop.num_steps:
        t_eval = time.time()
        evaluator = evaluator or tr.evaluator()
        last_eval = evaluator.run(state.ema if exp.eval.use_ema else state.params, progress=True)
        writer.write(done, last_eval, prefix='eval/')
        writer.print(f'eval step {done}: ' + report.format_eval(last_eval))
        clock.exclude(time.time() - t_eval)  # the evaluation's time is not training time
  ckpt.close()
  writer.close()
  if int(state.step) == start_step and not last_eval:  # nothing trained: the finished run's result
    previous = rundir.read_summary(workdir)
    if previous is not None and previous.get('steps') == start_step:
      return previous
    last_eval = tr.evaluator().run(state.ema if exp.eval.use_ema else state.params)
  return dict(last_eval, steps=int(state.step), params=tr.n_params, wall_s=time.time() - t_start)
