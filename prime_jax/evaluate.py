"""Evaluation of checkpoints: the valid likelihood bound, text sampling, generative perplexity.

  python -m prime_jax.main --config configs/sotu.py --workdir workdir/sotu --mode eval
  python -m prime_jax.main --config configs/sotu.py --workdir workdir/sotu --mode sample

Dimension key: B batch, L tokens per sequence, K sub-tokens per token, J time samples per sequence.

Likelihood. Every sequence gets J stratified times t_j = eps + (1 - eps)(j + u)/J with one offset u
per sequence, and independent masks; all of it is drawn from keys folded from (seed, the sequence's
global index, j). The estimate is therefore deterministic and the same on any mesh, batch size or
host count. We report per original token (never per sub-token): the valid bound `nelbo` as NLL
nats, bits and "PPL <= exp(NLL)", and the authors' objective beside it under its own name (it is
not a bound for ell > 1, SPEC 4.3).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from prime_jax import checkpoint as checkpoint_lib
from prime_jax import sharding as sharding_lib
from prime_jax import train as train_lib
from prime_jax.diffusion import forward, objectives, samplers

# -- likelihood -------------------------------------------------------------------------------------


def eval_times(key_B: jax.Array, num_t: int, eps: float) -> jax.Array:
  """(B, J) stratified times, one random offset per sequence: J equal strata of [eps, 1)."""
  u_B = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0xA11CE)))(key_B)
  j_J = jnp.arange(num_t, dtype=jnp.float32)
  t_BxJ = eps + (1.0 - eps) * (u_B[:, None] + j_J[None, :]) / num_t
  return jnp.clip(t_BxJ, eps, jnp.nextafter(jnp.float32(1.0), 0.0))


def eval_sums(params, batch: dict, ref_log_p_C=None, *, graphdef, task: train_lib.Task,
              num_t: int, seed: int, t_fixed: Optional[float] = None) -> dict:
  """Sums of the per-token losses over the real rows of a batch, averaged over J time samples,
  and per sequence: 'nelbo_B', 'tokens_B' and, given ref_log_p_C, 'ref_B', the same estimator for
  the context-free model with log-probabilities ref_log_p_C (C,) on the same draws (t, y_t).

  t_fixed: every time sample at this t (the NELBO integrand at t, not the bound); masks still
  differ per sequence and sample.

  batch: tokens (B, L) int32, mask (B,) bool (False for padding), index (B,) int32 global sequence
  index (the randomness is keyed on it).
  """
  x0_BxL = batch['tokens']
  key_B = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(batch['index'])
  t_BxJ = eval_times(key_B, num_t, task.sampling_eps)
  if t_fixed is not None:
    t_BxJ = jnp.full_like(t_BxJ, t_fixed)
  y0 = task.codec.encode(x0_BxL)
  w_BxL = jnp.broadcast_to(batch['mask'][:, None], x0_BxL.shape).astype(jnp.float32)

  def one(j, acc):
    t_B = t_BxJ[:, j]
    y_t = jax.vmap(lambda k, y, t: forward.mask(jax.random.fold_in(k, j), y[None], t[None],
                                                schedule=task.schedule,
                                                mask_id=task.codec.mask_id)[0])(key_B, y0, t_B)
    per_token = train_lib.losses_at(params, graphdef, x0_BxL, t_B, y_t, task)
    acc = dict(acc, nelbo_B=acc['nelbo_B'] + jnp.sum(per_token['nelbo'] * w_BxL, axis=1),
               paper_B=acc['paper_B'] + jnp.sum(per_token['paper'] * w_BxL, axis=1))
    if ref_log_p_C is not None:
      ref = reference_losses(ref_log_p_C, x0_BxL, t_B, y_t, task)
      acc['ref_B'] = acc['ref_B'] + jnp.sum(ref * w_BxL, axis=1)
    return acc

  zero = jnp.zeros(x0_BxL.shape[:1], jnp.float32)
  acc = {'nelbo_B': zero, 'paper_B': zero}
  if ref_log_p_C is not None:
    acc['ref_B'] = zero
  acc = jax.lax.fori_loop(0, num_t, one, acc)
  out = {k: v / num_t for k, v in acc.items()}
  out['tokens_B'] = jnp.sum(w_BxL, axis=1)
  out.update(nelbo=jnp.sum(out['nelbo_B']), paper=jnp.sum(out.pop('paper_B')),
             tokens=jnp.sum(out['tokens_B']))
  return out


def reference_losses(log_p_C, x0_BxL, t_B, y_t, task: train_lib.Task):
  """(B, L) per-token NELBO of the context-free model log p (C,): the head with zero features."""
  from prime_jax.diffusion import fused_head  # pylint: disable=import-outside-toplevel
  h_BxLx1 = jnp.zeros(x0_BxL.shape + (1,), jnp.float32)
  kernel_1xC = jnp.zeros((1, log_p_C.shape[0]), jnp.float32)
  return fused_head.head_losses(h_BxLx1, kernel_1xC, log_p_C.astype(jnp.float32), x0_BxL, y_t,
                                t_B, task.codec, schedule=task.schedule,
                                carry_over=task.carry_over, with_nelbo=True,
                                active_fraction=task.head_active_fraction,
                                single_fraction=task.head_single_fraction)['nelbo']


def ratio_se(num_N: np.ndarray, den_N: np.ndarray) -> float:
  """Standard error of sum(num) / sum(den) over N independent sequences (the delta method)."""
  num, den = np.asarray(num_N, np.float64), np.asarray(den_N, np.float64)
  n = num.size
  if n < 2:
    return float('nan')
  r = num.sum() / den.sum()
  return float(math.sqrt(n / (n - 1) * np.sum((num - r * den)**2)) / den.sum())


class Evaluator:
  """Compiled likelihood evaluation on a mesh; `run` evaluates one source/split."""

  def __init__(self, cfg: ml_collections.ConfigDict, mesh, graphdef, param_shardings,
               task: train_lib.Task, *, num_t: Optional[int] = None, seed: Optional[int] = None,
               t_fixed: Optional[float] = None, control_variate: bool = True):
    """control_variate: also estimate the bound as the training unigram's exact expected estimate
    plus the mean of (model - unigram) on the same draws ('nll_cv', see `run`)."""
    self.cfg, self.mesh, self.task = cfg, mesh, task
    if t_fixed is not None and not 0.0 < t_fixed < 1.0:
      raise ValueError(f'A fixed evaluation time must lie in (0, 1), got {t_fixed}.')
    self.t_fixed = t_fixed
    self.last_counts: Optional[np.ndarray] = None  # (C,) token histogram of the last `run`
    self.num_t = int(num_t or cfg.eval.get('num_t', 1))
    self.seed = int(cfg.eval.seed if seed is None else seed)
    if self.num_t < 1:
      raise ValueError(f'eval.num_t={self.num_t} must be >= 1 (time samples per sequence).')
    self.batch = cfg.eval.batch_size or cfg.data.batch_size
    sharding_lib.check_batch(self.batch, mesh)
    row = sharding_lib.batch_sharding(mesh, 1)
    batch_sh = {'tokens': sharding_lib.batch_sharding(mesh), 'mask': row, 'index': row}
    self.ref_log_p: Optional[np.ndarray] = None
    if control_variate and t_fixed is None:
      self.ref_log_p = _training_unigram(cfg)
    ref_sh = () if self.ref_log_p is None else (sharding_lib.replicated(mesh),)
    self.step = jax.jit(functools.partial(eval_sums, graphdef=graphdef, task=task,
                                          num_t=self.num_t, seed=self.seed, t_fixed=t_fixed),
                        in_shardings=(param_shardings, batch_sh) + ref_sh,
                        # Replicated: every host reads the whole batch's per-sequence sums.
                        out_shardings=sharding_lib.replicated(mesh))

  def run(self, params, source: Optional[str] = None, split: Optional[str] = None, *,
          num_batches: Optional[int] = None, data_dir: Optional[str] = None,
          progress: bool = False) -> dict[str, Any]:
    from prime_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    cfg = self.cfg
    source = source or cfg.data.source
    split = split or cfg.eval.split
    num_batches = cfg.eval.num_batches if num_batches is None else num_batches
    data_dir = data_dir if data_dir is not None else (cfg.data.data_dir or None)
    it = pipeline.make_text_pipeline(source, split, seq_len=cfg.data.seq_len,
                                     batch_size=self.batch // jax.process_count(), seed=0,
                                     train=False, data_dir=data_dir, pad_final_batch=True)
    total = math.ceil(pipeline.num_sequences(source, split, cfg.data.seq_len, data_dir)
                      / self.batch)
    if num_batches:
      total = min(total, num_batches)
    bar = _progress(total, f'eval {source}/{split}') if progress else None
    sums = {'nelbo': 0.0, 'paper': 0.0, 'tokens': 0.0}
    per_sequence = {'nelbo_B': [], 'tokens_B': [], 'ref_B': []}
    ref = () if self.ref_log_p is None else (jnp.asarray(self.ref_log_p, jnp.float32),)
    counts = np.zeros(self.task.codec.vocab_size, np.int64)  # the real tokens evaluated
    n, t0 = 0, time.time()
    for local in it:
      if n >= total:
        break
      self.task.codec.check(local['tokens'])
      arrays = {'tokens': np.asarray(local['tokens'], np.int32),
                'mask': np.asarray(local['mask'], bool),
                'index': np.asarray(local['index'], np.int32)}
      counts += np.bincount(arrays['tokens'][arrays['mask']].ravel(),
                            minlength=counts.size)[:counts.size]
      m = jax.device_get(self.step(params, sharding_lib.global_batch(arrays, self.mesh), *ref))
      for k in sums:
        sums[k] += float(m[k])
      real = np.asarray(m['tokens_B']) > 0  # the global batch's real rows (padding has none)
      for k in per_sequence:
        if k in m:
          per_sequence[k].append(np.asarray(m[k], np.float64)[real])
      n += 1
      if bar is not None:
        bar.update(1)
    if bar is not None:
      bar.close()
    if sums['tokens'] == 0:
      raise ValueError(f'The {split} split of {source} is empty at sequence length '
                       f'{cfg.data.seq_len}.')
    self.last_counts = counts
    extra = {} if self.t_fixed is None else {'t': self.t_fixed}
    res = summarize(sums, source=source, split=split, batches=n, num_t=self.num_t,
                    seed=self.seed, wall_s=time.time() - t0, **extra)
    seq = {k: np.concatenate(v) for k, v in per_sequence.items() if v}
    res['nll_se'] = ratio_se(seq['nelbo_B'], seq['tokens_B'])
    if 'ref_B' in seq:
      res.update(control_variate(seq, counts, self.ref_log_p, self.task))
    return res


def _training_unigram(cfg) -> Optional[np.ndarray]:
  from prime_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  try:
    return pipeline.unigram_log_probs(cfg.data.source, cfg.data.seq_len,
                                      data_dir=cfg.data.data_dir or None)
  except (FileNotFoundError, OSError, KeyError, ValueError) as e:  # informative, never fatal
    logging.warning('No training unigram for the control variate (%s); plain estimate only.', e)
    return None


def control_variate(seq: dict, counts_C: np.ndarray, ref_log_p_C: np.ndarray,
                    task: train_lib.Task) -> dict[str, float]:
  """The bound's control-variate estimate from per-sequence sums (nelbo_B, ref_B, tokens_B).

  nll_cv = E[unigram estimate] (exact, by quadrature on the evaluated tokens) + mean over the
  draws of (model - unigram). Unbiased for the same bound as the plain mean 'nll'; the draws that
  move both (a lone masked token at small t weighs w(t) ~ 1/t, up to 1000) cancel, so its standard
  error is several times smaller. The unigram's plain estimate on these draws ('reference_mc')
  next to its exact expectation ('reference_nll') shows how lucky the draws were.
  """
  from prime_jax import report  # pylint: disable=import-outside-toplevel
  exact = report.unigram_expected_estimate(ref_log_p_C, counts_C, task.codec, task.schedule,
                                           task.sampling_eps)
  diff_N = seq['nelbo_B'] - seq['ref_B']
  tokens = seq['tokens_B'].sum()
  nll_cv = exact + diff_N.sum() / tokens
  return {'nll_cv': nll_cv, 'nll_cv_se': ratio_se(diff_N, seq['tokens_B']),
          'ppl_bound_cv': math.exp(nll_cv), 'reference_nll': exact,
          'reference_mc': seq['ref_B'].sum() / tokens}


def summarize(sums: dict, **extra) -> dict[str, Any]:
  nll = sums['nelbo'] / sums['tokens']
  return dict(nll=nll, bpt=float(objectives.nats_to_bits(nll)), ppl_bound=math.exp(nll),
              paper_objective=sums['paper'] / sums['tokens'], tokens=int(sums['tokens']), **extra)


def format_result(r: dict) -> str:
  se = r.get('nll_se', float('nan'))
  line = (f"{r['source']}/{r['split']}: NLL <= {r['nll']:.4f} ± {se:.4f} nats/token "
          f"({r['bpt']:.4f} bits), PPL <= {r['ppl_bound']:.2f} (valid bound); authors' objective "
          f"{r['paper_objective']:.4f} (not a bound for ell > 1); {r['tokens']:,} tokens, "
          f"{r['num_t']} t/sequence")
  if 'nll_cv' in r:
    line += '\n  ' + format_control_variate(r)
  return line


def format_control_variate(r: dict) -> str:
  return (f"control variate (training unigram on the same draws): NLL <= {r['nll_cv']:.4f} ± "
          f"{r['nll_cv_se']:.4f} nats/token, PPL <= {r['ppl_bound_cv']:.2f}; the unigram's "
          f"estimate on these draws {r['reference_mc']:.4f}, its expectation "
          f"{r['reference_nll']:.4f}")


def _progress(total: int, desc: str):
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, desc=desc, unit='batch', disable=jax.process_index() != 0,
              mininterval=2.0)


# -- checkpoints ------------------------------------------------------------------------------------


class Restored:
  """A checkpoint restored for evaluation: the mesh, the model definition and its weights."""

  def __init__(self, cfg, workdir: str, *, step: Optional[int] = None, use_ema: bool = True,
               devices=None):
    self.cfg, self.workdir = cfg, workdir
    sharding_lib.maybe_initialize_distributed()
    self.mesh = sharding_lib.make_mesh(dict(cfg.mesh), devices)
    self.task = train_lib.build_task(cfg, self.mesh)
    self.codec = self.task.codec
    tx, _ = train_lib.make_optimizer(cfg.optim, cfg.train.num_steps)
    self.graphdef, abs_state, self.shardings = train_lib.state_shardings(cfg, self.codec, tx,
                                                                         self.mesh)
    ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False)
    available = ckpt.manager.all_steps()
    if not available:
      raise FileNotFoundError(
          f'No checkpoint in {ckpt.directory}: train first (python -m prime_jax.main --config ... '
          f'--workdir {workdir}) or pass the --workdir that holds one.')
    if step is not None and step not in available:
      raise ValueError(f'No checkpoint for step {step} in {ckpt.directory}; available steps: '
                       f'{sorted(available)}.')
    state, _ = ckpt.restore(abs_state, step=step)
    ckpt.close()
    self.step = int(state.step)
    self.use_ema = use_ema
    self.params = state.ema if use_ema else state.params
    self.param_shardings = self.shardings.params

  def model(self):
    return nnx.merge(self.graphdef, self.params)


# -- sampling ---------------------------------------------------------------------------------------


def _logits_fn(graphdef):
  def fn(params, y_BxLxK):
    return nnx.merge(graphdef, params)(y_BxLxK)
  return fn


def sample_text(cfg, graphdef, params, *, num_samples: int, batch_size: int, steps: int,
                nucleus_p: float = 1.0, precision: str = 'fp64', cache: bool = True,
                prefix_len: int = 0, seed: int = 0, carry_over: Optional[bool] = None,
                progress: bool = False) -> tuple[list[dict], dict]:
  """Unconditional (prefix_len=0) or prefix-conditional samples of length data.seq_len.

  Prefixes are the first `prefix_len` positions (BOS included) of successive validation
  sequences. Returns (records, summary): a record per sample with text and token ids, and the
  NFE, idle steps, wall time and samples/s of the batches (NFE and idle steps are per batch: a
  step is idle when no sub-token of the whole batch changes).
  """
  from prime_jax.data import pipeline, tokenizer  # pylint: disable=import-outside-toplevel
  task = train_lib.build_task(cfg)
  codec = task.codec
  L = cfg.data.seq_len
  if not 0 <= prefix_len < L:
    raise ValueError(f'prefix_len={prefix_len} must be in [0, seq_len={L}).')
  if num_samples < 1 or batch_size < 1:
    raise ValueError(f'num_samples={num_samples} and batch_size={batch_size} must be >= 1.')
  carry_over = task.carry_over if carry_over is None else carry_over
  prefixes = None
  if prefix_len:
    it = pipeline.make_text_pipeline(cfg.data.source, cfg.eval.split, seq_len=L,
                                     batch_size=batch_size, seed=0, train=False,
                                     data_dir=cfg.data.data_dir or None, pad_final_batch=True)
    rows = []
    for b in it:
      rows.extend(np.asarray(b['tokens'])[np.asarray(b['mask'])])
      if len(rows) >= num_samples:
        break
    if len(rows) < num_samples:
      raise ValueError(f'The {cfg.eval.split} split has only {len(rows)} sequences for '
                       f'{num_samples} prefixes; ask for fewer samples.')
    prefixes = np.stack(rows[:num_samples]).astype(np.int32)
  tok = tokenizer.get_tokenizer()
  fn = _logits_fn(graphdef)
  records, nfe, idle, batches = [], [], [], 0
  bar = _progress(num_samples, 'sampling') if progress else None
  t0 = time.time()
  compile_s = None
  for start in range(0, num_samples, batch_size):
    key = jax.random.fold_in(jax.random.key(seed), start)
    condition = None
    if prefixes is not None:
      cond = np.zeros((batch_size, L), np.int32)
      n = min(batch_size, num_samples - start)
      cond[:n] = prefixes[start:start + n]
      keep = np.zeros((batch_size, L), bool)
      keep[:, :prefix_len] = True
      condition = (jnp.asarray(cond), jnp.asarray(keep))
    tb = time.time()
    out = samplers.sample(key, fn, codec, shape=(batch_size, L), num_steps=steps,
                          carry_over=carry_over, nucleus_p=nucleus_p, precision=precision,
                          cache=cache, condition=condition, params=params)
    tokens = np.asarray(jax.device_get(out.tokens))
    if compile_s is None:
      compile_s = time.time() - tb
    nfe.append(int(out.nfe))
    idle.append(int(out.idle_steps))
    batches += 1
    for r in range(min(batch_size, num_samples - start)):
      ids = tokens[r].tolist()
      records.append({'index': start + r, 'prefix_len': prefix_len, 'text': tok.decode(ids),
                      'tokens': ids})
      if bar is not None:
        bar.update(1)
  if bar is not None:
    bar.close()
  wall = time.time() - t0
  summary = dict(num_samples=num_samples, batch_size=batch_size, seq_len=L, steps=steps,
                 nucleus_p=nucleus_p, precision=precision, cache=cache, prefix_len=prefix_len,
                 carry_over=carry_over, ell=codec.ell, nfe_per_batch=float(np.mean(nfe)),
                 idle_steps_per_batch=float(np.mean(idle)),
                 idle_fraction=float(np.mean(idle)) / steps,
                 expected_idle_fraction=samplers.expected_idle_fraction(
                     batch_size * L * codec.ell, steps),
                 wall_s=wall, first_batch_s_with_compile=compile_s,
                 samples_per_s=num_samples / wall if wall > 0 else float('nan'))
  if prefixes is not None:
    kept = all(r['tokens'][:prefix_len] == prefixes[i, :prefix_len].tolist()
               for i, r in enumerate(records))
    summary['prefix_kept'] = bool(kept)
  return records, summary


# -- the --mode entry points ------------------------------------------------------------------------


def _write_json(path: str, obj: Any) -> None:
  checkpoint_lib.write_json(path, obj)


def run_eval(cfg, workdir: str, *, step: Optional[int] = None, sets: Sequence[str] = (),
             num_t: Optional[int] = None, num_batches: Optional[int] = None,
             data_dir: Optional[str] = None, use_ema: bool = True,
             t_grid: Sequence[float] = ()) -> dict[str, Any]:
  """--mode eval: restores a checkpoint and evaluates the validation split and zero-shot sets.

  t_grid (text): also the NELBO integrand at each of these times on the validation split, beside
  the exact integrand of the training unigram on the same tokens (`report.unigram_integrand`).
  """
  r = Restored(cfg, workdir, step=step, use_ema=use_ema)
  if r.task.image:  # images: BPD from the valid bound, on the validation split
    res = train_lib.Trainer(cfg, workdir).evaluate(r.params)
    res.update(source=cfg.data.source, split=cfg.eval.split, step=r.step,
               weights='ema' if use_ema else 'raw')
    out = {'step': r.step, 'workdir': workdir, 'ell': r.codec.ell, 'results': [res]}
    if jax.process_index() == 0:
      print(f"{cfg.data.source}/{cfg.eval.split}: NLL <= {res['nll']:.4f} nats/dim, BPD <= "
            f"{res['bpd']:.4f} (valid bound); authors' objective {res['paper_objective']:.4f}",
            flush=True)
    _write_json(os.path.join(workdir, f'eval_step{r.step}.json'), out)
    return out
  ev = Evaluator(cfg, r.mesh, r.graphdef, r.param_shardings, r.task, num_t=num_t)
  targets = [(cfg.data.source, cfg.eval.split)] + [_parse_set(s) for s in sets]
  results = []
  for source, split in targets:
    res = ev.run(r.params, source, split, num_batches=num_batches if source == cfg.data.source
                 else (num_batches or 0), data_dir=data_dir, progress=True)
    res.update(step=r.step, weights='ema' if use_ema else 'raw')
    results.append(res)
    if jax.process_index() == 0:
      print(format_result(res), flush=True)
  out = {'step': r.step, 'workdir': workdir, 'ell': r.codec.ell, 'results': results}
  if t_grid:
    out['t_grid'] = integrand_grid(cfg, r, t_grid, num_t=num_t, num_batches=num_batches,
                                   data_dir=data_dir)
  path = os.path.join(workdir, f'eval_step{r.step}.json')
  _write_json(path, out)
  if jax.process_index() == 0:
    print(f'wrote {path}', flush=True)
  return out


def integrand_grid(cfg, r: Restored, t_grid: Sequence[float], *, num_t: Optional[int] = None,
                   num_batches: Optional[int] = None,
                   data_dir: Optional[str] = None) -> list[dict[str, float]]:
  """The model's NELBO integrand (nats/token) at fixed times vs the unigram's on the same tokens.

  A model that learned context sits well below the unigram at small t (most neighbours visible);
  one that learned only token frequencies sits on it at every t.
  """
  from prime_jax import report  # pylint: disable=import-outside-toplevel
  from prime_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  log_p = pipeline.unigram_log_probs(cfg.data.source, cfg.data.seq_len,
                                     data_dir=data_dir or cfg.data.data_dir or None)
  rows = []
  for t in sorted(float(x) for x in t_grid):
    ev = Evaluator(cfg, r.mesh, r.graphdef, r.param_shardings, r.task, num_t=num_t, t_fixed=t)
    res = ev.run(r.params, cfg.data.source, cfg.eval.split, num_batches=num_batches,
                 data_dir=data_dir)
    uni = report.unigram_integrand(log_p, ev.last_counts, r.codec, r.task.schedule, t)
    rows.append({'t': t, 'model': res['nll'], 'paper': res['paper_objective'], 'unigram': uni,
                 'tokens': res['tokens']})
    if jax.process_index() == 0:
      print(f"t = {t:.3f}: NELBO integrand {res['nll']:.4f} nats/token; training unigram "
            f"(no context) {uni:.4f}; difference {res['nll'] - uni:+.4f}", flush=True)
  return rows


def _parse_set(spec: str) -> tuple[str, str]:
  if ':' in spec:
    source, split = spec.split(':', 1)
    return source, split
  from prime_jax.data import zeroshot  # pylint: disable=import-outside-toplevel
  known = zeroshot.ZERO_SHOT.get(spec)
  return spec, known.split if known else 'validation'


def run_sample(cfg, workdir: str, *, step: Optional[int] = None, num_samples: int = 16,
               batch_size: int = 8, steps: Optional[int] = None, nucleus_p: float = 1.0,
               precision: str = 'fp64', cache: bool = True, prefix_len: int = 0, seed: int = 0,
               scorer: str = '', scorer_path: Optional[str] = None,
               use_ema: bool = True) -> dict[str, Any]:
  """--mode sample: writes samples JSONL and a summary JSON; optionally generative perplexity."""
  r = Restored(cfg, workdir, step=step, use_ema=use_ema)
  steps = steps or cfg.data.seq_len
  records, summary = sample_text(cfg, r.graphdef, r.params, num_samples=num_samples,
                                 batch_size=batch_size, steps=steps, nucleus_p=nucleus_p,
                                 precision=precision, cache=cache, prefix_len=prefix_len,
                                 seed=seed, progress=True)
  summary.update(step=r.step, weights='ema' if use_ema else 'raw')
  if scorer:
    summary['generative'] = score_samples([rec['text'] for rec in records], scorer, scorer_path)
  tag = f'samples_step{r.step}_T{steps}_{precision}' + (f'_p{prefix_len}' if prefix_len else '')
  if jax.process_index() == 0:
    with open(os.path.join(workdir, tag + '.jsonl'), 'w') as f:
      for rec in records:
        f.write(json.dumps(rec) + '\n')
  _write_json(os.path.join(workdir, tag + '.json'), summary)
  if jax.process_index() == 0:
    print(format_sampling(summary), flush=True)
    print(f'wrote {os.path.join(workdir, tag)}.jsonl/.json', flush=True)
  return summary


def format_sampling(s: dict) -> str:
  line = (f"{s['num_samples']} samples x {s['seq_len']} tokens, T={s['steps']} {s['precision']}"
          f" (cache {'on' if s['cache'] else 'off'}): NFE {s['nfe_per_batch']:.1f}/batch, idle "
          f"{s['idle_steps_per_batch']:.1f}/batch ({100 * s['idle_fraction']:.1f}%), "
          f"{s['samples_per_s']:.3f} samples/s, wall {s['wall_s']:.1f} s")
  g = s.get('generative')
  if g:
    line += (f"\ngenerative PPL {g['gen_ppl']:.2f} under {g['scorer']} (relative metric); "
             f"unigram entropy {g['entropy_bits']:.3f} bits")
  return line


def score_samples(texts: Sequence[str], scorer: str, scorer_path: Optional[str] = None) -> dict:
  from prime_jax.metrics import genppl  # pylint: disable=import-outside-toplevel
  s = genppl.load_scorer(scorer, scorer_path)
  return genppl.generative_perplexity(list(texts), s)
