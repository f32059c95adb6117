"""One likelihood evaluator for text and images: the valid bound with standard errors.

  python -m prime_jax.main --config configs/sotu.py --workdir workdir/sotu --mode eval

Dimension key: B batch, S token grid ((L,) text, (H, W, channels) images), K sub-tokens per token,
J time samples per example, N examples.

Every example gets J stratified times t_j = eps + (1 - eps)(j + u)/J with one offset u per example,
and independent masks; all of it is drawn from keys folded from (seed, the example's global index,
j). The estimate is therefore deterministic and the same on any mesh, batch size or host count.
We report per original token (never per sub-token; for images per colour-channel token): the
valid bound `nelbo` as NLL nats, bits and "PPL <= exp(NLL)" (text) or BPD (images), with the
standard error over examples, and the authors' objective beside it under its own name (it is not
a bound for ell > 1). Text also gets a control-variate estimate of the same bound (`run`).

The autoregressive baseline (`Task.autoregressive`) is scored exactly instead: per example the sum
of -log p(x_{i+1} | x_{<=i}) over its L - 1 predicted positions, "PPL = exp(NLL)", no times.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from prime_jax import build, losses, report, rundir
from prime_jax import checkpoint as checkpoint_lib
from prime_jax import sharding as sharding_lib
from prime_jax.diffusion import forward, objectives
from prime_jax.metrics import unigram
from prime_jax.metrics import writer as writer_lib

# -- the jitted sums -------------------------------------------------------------------------------


def eval_times(key_B: jax.Array, num_t: int, eps: float) -> jax.Array:
  """(B, J) stratified times, one random offset per example: J equal strata of [eps, 1)."""
  u_B = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0xA11CE)))(key_B)
  j_J = jnp.arange(num_t, dtype=jnp.float32)
  t_BxJ = eps + (1.0 - eps) * (u_B[:, None] + j_J[None, :]) / num_t
  return jnp.clip(t_BxJ, eps, jnp.nextafter(jnp.float32(1.0), 0.0))


def eval_sums(params, batch: dict, ref_log_p_C=None, *, graphdef, task: losses.Task, num_t: int,
              seed: int, t_fixed: Optional[float] = None) -> dict:
  """Per example (B,), averaged over J time samples: the sums over its tokens of every per-token
  loss ('<name>_B'), its real tokens ('tokens_B', 0 for padding) and, given ref_log_p_C (text),
  'ref_B': the same estimator for the context-free model log p (C,) on the same draws (t, y_t).

  t_fixed: every time sample at this t (the NELBO integrand at t, not the bound); masks still
  differ per example and sample.

  batch: tokens (B, *S) int32, mask (B,) bool (False for padding), index (B,) int32 global example
  index (the randomness is keyed on it).

  Autoregressive task: the exact NLL over the L - 1 predicted positions (L - 1 tokens per real
  example); num_t, seed and t_fixed play no part.
  """
  x0 = batch['tokens']
  if task.autoregressive:
    real_B = batch['mask'].astype(jnp.float32)
    per_token = losses.autoregressive_losses(params, graphdef, x0, task)
    out = {k + '_B': jnp.sum(v, axis=1) * real_B for k, v in per_token.items()}
    out['tokens_B'] = real_B * (x0.shape[1] - 1)
    return out
  key_B = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(batch['index'])
  t_BxJ = eval_times(key_B, num_t, task.sampling_eps)
  if t_fixed is not None:
    t_BxJ = jnp.full_like(t_BxJ, t_fixed)
  y0 = task.codec.encode(x0)
  w = jnp.broadcast_to(batch['mask'].reshape((-1,) + (1,) * (x0.ndim - 1)),
                       x0.shape).astype(jnp.float32)
  per_example = lambda v: jnp.sum((v * w).reshape(v.shape[0], -1), axis=1)

  def one(j, acc):
    t_B = t_BxJ[:, j]
    y_t = jax.vmap(lambda k, y, t: forward.mask(jax.random.fold_in(k, j), y[None], t[None],
                                                schedule=task.schedule,
                                                mask_id=task.codec.mask_id)[0])(key_B, y0, t_B)
    per_token = losses.per_token_losses(params, graphdef, x0, t_B, y_t, task)
    if ref_log_p_C is not None:
      per_token['ref'] = losses.reference_losses(ref_log_p_C, x0, t_B, y_t, task)
    return {k + '_B': acc[k + '_B'] + per_example(v) for k, v in per_token.items()}

  names = ('nelbo', 'paper', 'paper_nll') if task.image else ('nelbo', 'paper')
  names += ('ref',) if ref_log_p_C is not None else ()
  zero = jnp.zeros(x0.shape[:1], jnp.float32)
  acc = jax.lax.fori_loop(0, num_t, one, {k + '_B': zero for k in names})
  out = {k: v / num_t for k, v in acc.items()}
  out['tokens_B'] = per_example(jnp.ones_like(w))
  return out


def ratio_se(num_N: np.ndarray, den_N: np.ndarray) -> float:
  """Standard error of sum(num) / sum(den) over N independent examples (the delta method)."""
  num, den = np.asarray(num_N, np.float64), np.asarray(den_N, np.float64)
  n = num.size
  if n < 2:
    return float('nan')
  r = num.sum() / den.sum()
  return float(math.sqrt(n / (n - 1) * np.sum((num - r * den)**2)) / den.sum())


@dataclasses.dataclass
class Sums:
  """What one pass over a split gathered: per-example sums (N,) by name, the token histogram of the
  evaluated tokens (text), batches and wall time."""
  per_example: dict[str, np.ndarray]
  counts_C: Optional[np.ndarray]
  batches: int
  wall_s: float

  def mean(self, name: str) -> float:
    return float(self.per_example[name + '_B'].sum() / self.per_example['tokens_B'].sum())

  def se(self, name: str) -> float:
    return ratio_se(self.per_example[name + '_B'], self.per_example['tokens_B'])


# -- the evaluator ---------------------------------------------------------------------------------


class Evaluator:
  """Compiled likelihood evaluation of an Experiment on a mesh; `run` evaluates one source/split."""

  def __init__(self, exp: build.Experiment, mesh, graphdef, param_shardings, task: losses.Task,
               *, t_fixed: Optional[float] = None, control_variate: bool = True):
    """control_variate (text): also estimate the bound as the training unigram's exact expected
    estimate plus the mean of (model - unigram) on the same draws ('nll_cv', see `run`)."""
    if t_fixed is not None and not 0.0 < t_fixed < 1.0:
      raise ValueError(f'A fixed evaluation time must lie in (0, 1), got {t_fixed}.')
    if t_fixed is not None and task.autoregressive:
      raise ValueError('A fixed evaluation time is a diffusion notion; the autoregressive model '
                       'has no time.')
    self.exp, self.mesh, self.task, self.t_fixed = exp, mesh, task, t_fixed
    self.graphdef, self.param_shardings = graphdef, param_shardings
    self.settings = exp.eval
    self.ref_log_p: Optional[np.ndarray] = None
    # The control variate estimates a diffusion bound; the autoregressive NLL is already exact.
    if control_variate and t_fixed is None and not task.image and not task.autoregressive:
      self.ref_log_p = _training_unigram(exp)
    row = sharding_lib.batch_sharding(mesh, 1)
    batch_sh = {'tokens': sharding_lib.batch_sharding(mesh, 1 + len(exp.token_shape)),
                'mask': row, 'index': row}
    ref_sh = () if self.ref_log_p is None else (sharding_lib.replicated(mesh),)
    self.step = sharding_lib.OnMesh(jax.jit(
        functools.partial(eval_sums, graphdef=graphdef, task=task, num_t=self.settings.num_t,
                          seed=self.settings.seed, t_fixed=t_fixed),
        in_shardings=(param_shardings, batch_sh) + ref_sh,
        # Replicated: every host reads the whole batch's per-example sums.
        out_shardings=sharding_lib.replicated(mesh)), mesh)

  def sums(self, params, source: Optional[str] = None, split: Optional[str] = None, *,
           num_batches: Optional[int] = None, data_dir: Optional[str] = None,
           progress: bool = False) -> Sums:
    """One pass over a split (default: the experiment's source and eval split)."""
    data, batch = self.exp.data, self.settings.batch_size
    source, split = source or data.source, split or self.settings.split
    num_batches = self.settings.num_batches if num_batches is None else num_batches
    it = data.iterator(split, train=False, batch_size=batch, source=source, data_dir=data_dir)
    total = math.ceil(data.num_examples(split, source=source, data_dir=data_dir) / batch)
    if num_batches:
      total = min(total, num_batches)
    bar = report.progress(total, f'eval {source}/{split}', 'batch') if progress else None
    per_example: dict[str, list[np.ndarray]] = {}
    ref = () if self.ref_log_p is None else (jnp.asarray(self.ref_log_p, jnp.float32),)
    counts = None if self.task.image else np.zeros(self.task.codec.vocab_size, np.int64)
    n, t0 = 0, time.time()
    for local in it:
      if n >= total:
        break
      self.task.codec.check(local['tokens'])
      arrays = {'tokens': np.asarray(local['tokens'], np.int32),
                'mask': np.asarray(local['mask'], bool),
                'index': np.asarray(local['index'], np.int32)}
      if counts is not None:
        counts += np.bincount(arrays['tokens'][arrays['mask']].ravel(),
                              minlength=counts.size)[:counts.size]
      m = jax.device_get(self.step(params, sharding_lib.global_batch(arrays, self.mesh), *ref))
      real = np.asarray(m['tokens_B']) > 0  # the global batch's real examples
      for k, v in m.items():
        per_example.setdefault(k, []).append(np.asarray(v, np.float64)[real])
      n += 1
      if bar is not None:
        bar.update(1)
    if bar is not None:
      bar.close()
    out = {k: np.concatenate(v) for k, v in per_example.items()}
    if counts is not None and jax.process_count() > 1:  # each host counted its own examples
      counts = np.asarray(multihost_utils.process_allgather(counts)).sum(axis=0)
    if not out or out['tokens_B'].sum() == 0:
      raise ValueError(f'The {split} split of {source} is empty'
                       + ('.' if self.task.image else f' at sequence length {data.seq_len}.'))
    return Sums(out, counts, n, time.time() - t0)

  def run(self, params, source: Optional[str] = None, split: Optional[str] = None, *,
          num_batches: Optional[int] = None, data_dir: Optional[str] = None,
          progress: bool = False) -> dict[str, Any]:
    """The bound and the authors' objective, token means with standard errors.

    Text: 'nll' (nats/token), 'nll_se', 'bpt', 'ppl_bound', 'paper_objective' and, with the
    training unigram, the control-variate estimate 'nll_cv' ± 'nll_cv_se', 'ppl_bound_cv'.
    Images: 'nll' (nats/dim), 'nll_se', 'bpd', 'bpd_se', and the reference's training loss
    ('paper_objective') and NLL estimator ('paper_nll', 'paper_bpd'; not a bound for ell > 1).
    Autoregressive: 'nll' is exact, 'ppl' = exp(nll) ('ppl_bound' holds the same number, for the
    readers that tabulate every model), 'autoregressive' True, 'num_t' 0.
    """
    source = source or self.exp.data.source
    split = split or self.settings.split
    s = self.sums(params, source, split, num_batches=num_batches, data_dir=data_dir,
                  progress=progress)
    nll, se = s.mean('nelbo'), s.se('nelbo')
    res = dict(nll=nll, nll_se=se, paper_objective=s.mean('paper'),
               tokens=int(s.per_example['tokens_B'].sum()), examples=len(s.per_example['tokens_B']),
               source=source, split=split, batches=s.batches, num_t=self.settings.num_t,
               seed=self.settings.seed, wall_s=s.wall_s)
    if self.t_fixed is not None:
      res['t'] = self.t_fixed
    if self.task.image:
      res.update(bpd=float(objectives.bits_per_dim(nll)),
                 bpd_se=float(objectives.bits_per_dim(se)), paper_nll=s.mean('paper_nll'),
                 paper_bpd=float(objectives.bits_per_dim(s.mean('paper_nll'))))
      return res
    res.update(bpt=float(objectives.nats_to_bits(nll)), ppl_bound=math.exp(nll))
    if self.task.autoregressive:
      res.update(autoregressive=True, ppl=math.exp(nll), num_t=0)
    if 'ref_B' in s.per_example:
      res.update(control_variate(s, self.ref_log_p, self.task))
    return res


def _training_unigram(exp: build.Experiment) -> Optional[np.ndarray]:
  try:
    return exp.data.unigram_log_probs()
  except (FileNotFoundError, OSError, KeyError, ValueError) as e:  # informative, never fatal
    logging.warning('No training unigram for the control variate (%s); plain estimate only.', e)
    return None


def control_variate(s: Sums, ref_log_p_C: np.ndarray, task: losses.Task) -> dict[str, float]:
  """The bound's control-variate estimate from per-sequence sums (nelbo_B, ref_B, tokens_B).

  nll_cv = E[unigram estimate] (exact, by quadrature on the evaluated tokens) + mean over the
  draws of (model - unigram). Unbiased for the same bound as the plain mean 'nll'; the draws that
  move both (a lone masked token at small t weighs w(t) ~ 1/t, up to 1000) cancel, so its standard
  error is several times smaller. The unigram's plain estimate on these draws ('reference_mc')
  next to its exact expectation ('reference_nll') shows how lucky the draws were.
  """
  exact = unigram.expected_estimate(ref_log_p_C, s.counts_C, task.codec, task.schedule,
                                    task.sampling_eps)
  seq = s.per_example
  diff_N = seq['nelbo_B'] - seq['ref_B']
  tokens = seq['tokens_B'].sum()
  nll_cv = exact + diff_N.sum() / tokens
  return {'nll_cv': nll_cv, 'nll_cv_se': ratio_se(diff_N, seq['tokens_B']),
          'ppl_bound_cv': math.exp(nll_cv), 'reference_nll': exact,
          'reference_mc': seq['ref_B'].sum() / tokens}


def integrand_grid(ev: Evaluator, params, t_grid, *, num_batches: Optional[int] = None,
                   data_dir: Optional[str] = None) -> list[dict[str, float]]:
  """The model's NELBO integrand (nats/token) at fixed times vs the unigram's on the same tokens.

  A model that learned context sits well below the unigram at small t (most neighbours visible);
  one that learned only token frequencies sits on it at every t.
  """
  log_p = ev.exp.data.unigram_log_probs()
  rows = []
  for t in sorted(float(x) for x in t_grid):
    at_t = Evaluator(ev.exp, ev.mesh, ev.graphdef, ev.param_shardings, ev.task, t_fixed=t)
    s = at_t.sums(params, num_batches=num_batches, data_dir=data_dir)
    uni = unigram.integrand(log_p, s.counts_C, ev.task.codec, ev.task.schedule, t)
    rows.append({'t': t, 'model': s.mean('nelbo'), 'paper': s.mean('paper'), 'unigram': uni,
                 'tokens': int(s.per_example['tokens_B'].sum())})
    report.emit(f"t = {t:.3f}: NELBO integrand {rows[-1]['model']:.4f} nats/token; training "
                f"unigram (no context) {uni:.4f}; difference {rows[-1]['model'] - uni:+.4f}")
  return rows


# -- --mode eval -----------------------------------------------------------------------------------


class Restored:
  """A checkpoint's weights, restored without an optimizer, on the Experiment's mesh."""

  def __init__(self, exp: build.Experiment, workdir: str, *, step: Optional[int] = None,
               devices=None):
    self.mesh = exp.mesh(devices)
    self.task = exp.task_on(self.mesh)
    self.codec = self.task.codec
    self.graphdef, abs_params, self.param_shardings = build.sharded_abstract_params(
        exp.make_model, self.mesh)
    self.use_ema = exp.eval.use_ema
    self.params, self.step = checkpoint_lib.restore_params(
        workdir, abs_params, step=step, which='ema' if self.use_ema else 'params')

  def model(self):
    return nnx.merge(self.graphdef, self.params)


def run_eval(exp: build.Experiment, workdir: str, *, step: Optional[int] = None) -> dict[str, Any]:
  """--mode eval: the valid bound of a checkpoint on the validation split, and (text) on the
  zero-shot sets of `eval.sets` and at the times of `eval.t_grid`. Writes
  eval_step{N}_{settings}.json (`eval_name`), versioned `-2`, `-3` ... rather than overwritten."""
  if exp.eval.t_grid and exp.task.autoregressive:
    raise ValueError("eval.t_grid is the diffusion NELBO integrand; model.name='ar' has no time: "
                     'clear eval.t_grid.')
  r = Restored(exp, workdir, step=step)
  ev = Evaluator(exp, r.mesh, r.graphdef, r.param_shardings, r.task)
  weights = 'ema' if r.use_ema else 'raw'
  targets = [(exp.data.source, exp.eval.split)]
  if exp.eval.sets and exp.task.image:
    raise ValueError('eval.sets (zero-shot sets) are text; clear it for image configs.')
  targets += list(exp.eval.sets)
  results = []
  for i, (source, split) in enumerate(targets):
    res = ev.run(r.params, source, split, num_batches=None if i == 0 else 0,
                 data_dir=None if i == 0 else exp.eval.sets_dir, progress=True)
    res.update(step=r.step, weights=weights)
    results.append(res)
    report.emit(report.format_result(res))
  out = {'step': r.step, 'workdir': workdir, 'ell': r.codec.ell, 'results': results,
         'settings': dataclasses.asdict(exp.eval)}
  if exp.eval.t_grid:
    if exp.task.image:
      raise ValueError('eval.t_grid is for text configs; clear it for images.')
    out['t_grid'] = integrand_grid(ev, r.params, exp.eval.t_grid)
  path = f"{rundir.output_stem(workdir, eval_name(exp, r.step))}.json"
  checkpoint_lib.write_json(path, out)
  report.emit(f'wrote {path}')
  log_results(workdir, r.step, results)
  return dict(out, file=path)


_LOGGED = ('nll', 'nll_se', 'bpt', 'ppl_bound', 'ppl', 'nll_cv', 'nll_cv_se', 'ppl_bound_cv', 'bpd',
           'bpd_se', 'paper_objective', 'paper_bpd')


def log_results(workdir: str, step: int, results: list[dict[str, Any]]) -> None:
  """--mode eval's results in the workdir's TensorBoard log at the checkpoint's step: the numbers
  as scalars under mode_eval/SOURCE_SPLIT/, the printed lines as text."""
  writer = writer_lib.MetricWriter(workdir, mode='eval')
  for res in results:
    tag = f"mode_eval/{res['source']}_{res['split']}"
    writer.write(step, {k: res[k] for k in _LOGGED if k in res}, prefix=tag + '/')
    writer.text(step, tag, report.format_result(res))
  writer.close()


def eval_name(exp: build.Experiment, step: int) -> str:
  """The settings an evaluation's numbers depend on, as a file name: split, batches (or 'all')
  and batch size, t per sequence, seed, the zero-shot sets, the t grid and the weights."""
  e = exp.eval
  batches = f'b{e.num_batches}x{e.batch_size}' if e.num_batches else 'all'
  name = f'eval_step{step}_{e.split}_{batches}_t{e.num_t}' + (f'_seed{e.seed}' if e.seed else '')
  if e.sets:
    name += '_' + '+'.join(src for src, _ in e.sets)
  if e.t_grid:
    name += '_tgrid' + '-'.join(f'{t:g}' for t in e.t_grid)
  return name + ('' if e.use_ema else '_raw')
