"""Text sampling runs and generative perplexity (--mode sample).

  python -m prime_jax.main --config configs/sotu.py --workdir workdir/sotu --mode sample \
      --config.sample.num_samples=16 --config.sample.scorer=smollm2

The sampler itself is the pure `diffusion.samplers.sample`; this module drives it over batches of
a checkpoint's samples, decodes them, counts NFE and idle steps, and scores them. The
autoregressive baseline samples ancestrally instead (`autoregressive_sampler`).
Dimension key: B batch, L tokens per sequence, K sub-tokens per token.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from prime_jax import build, evaluate, losses, report, rundir
from prime_jax import checkpoint as checkpoint_lib
from prime_jax.diffusion import samplers
from prime_jax.metrics import writer as writer_lib


def _network(graphdef, params):
  """The model as the sampler takes it: a `samplers.SplitNetwork` when the model exposes its trunk
  and head separately (the DiT's `features` and `head_weights`), so the sampler applies the C-way
  head only at the positions that draw a token; else its logits function."""
  model = nnx.merge(graphdef, params)
  if hasattr(model, 'features') and hasattr(model, 'head_weights'):
    return samplers.SplitNetwork(
        features=lambda p, y_BxLxK: nnx.merge(graphdef, p).features(y_BxLxK),
        head=lambda p: nnx.merge(graphdef, p).head_weights())
  return lambda p, y_BxLxK: nnx.merge(graphdef, p)(y_BxLxK)


def autoregressive_sampler(graphdef, start: int, nucleus_p: float = 1.0):
  """A jitted (key, params, tokens (B, L)) -> tokens (B, L) of a causal model (models.ar): positions
  start, ..., L - 1 in order, each x_i ~ p(. | x_{<i}) drawn in float32 from one full forward pass
  (causal attention makes the positions not yet drawn irrelevant); nucleus_p < 1 applies
  samplers.nucleus_filter. Positions < start are kept."""
  if not 0.0 < nucleus_p <= 1.0:
    raise ValueError(f'nucleus_p must lie in (0, 1], got {nucleus_p}.')

  @jax.jit
  def run(key, params, tokens_BxL):
    model = nnx.merge(graphdef, params)

    def step(i, tokens):
      logits_BxC = jax.lax.dynamic_index_in_dim(model(tokens), i - 1, axis=1, keepdims=False)
      if nucleus_p < 1.0:
        logits_BxC = jnp.log(samplers.nucleus_filter(jax.nn.softmax(logits_BxC), nucleus_p))
      draw_B = jax.random.categorical(jax.random.fold_in(key, i), logits_BxC)
      return tokens.at[:, i].set(draw_B.astype(tokens.dtype))

    return jax.lax.fori_loop(start, tokens_BxL.shape[1], step, tokens_BxL)

  return run


def sample_text(data: build.Data, task: losses.Task, graphdef, params, *, num_samples: int,
                batch_size: int, steps: int, nucleus_p: float = 1.0, precision: str = 'fp64',
                cache: bool = True, prefix_len: int = 0, seed: int = 0,
                carry_over: Optional[bool] = None, split: str = 'validation',
                progress: bool = False) -> tuple[list[dict], dict]:
  """Unconditional (prefix_len=0) or prefix-conditional samples of length data.seq_len.

  Prefixes are the first `prefix_len` positions (BOS included) of successive validation
  sequences. Returns (records, summary): a record per sample with text and token ids, and the
  NFE, idle steps, wall time and samples/s of the batches (NFE and idle steps are per batch: a
  step is idle when no sub-token of the whole batch changes).

  Autoregressive task: L - max(prefix_len, 1) ancestral steps after the prefix (unconditional
  samples start from BOS), fp32 draws; `steps`, `precision` and `cache` do not apply.
  """
  from prime_jax.data import tokenizer  # pylint: disable=import-outside-toplevel
  codec = task.codec
  L = data.seq_len
  if not 0 <= prefix_len < L:
    raise ValueError(f'prefix_len={prefix_len} must be in [0, seq_len={L}).')
  if num_samples < 1 or batch_size < 1:
    raise ValueError(f'num_samples={num_samples} and batch_size={batch_size} must be >= 1.')
  carry_over = task.carry_over if carry_over is None else carry_over
  if task.autoregressive:
    steps, precision, cache = L - max(prefix_len, 1), 'fp32', False
    draw_ar = autoregressive_sampler(graphdef, max(prefix_len, 1), nucleus_p)
  prefixes = None
  if prefix_len:
    it = data.iterator(split, train=False, batch_size=batch_size * jax.process_count())
    rows = []
    for b in it:
      rows.extend(np.asarray(b['tokens'])[np.asarray(b['mask'])])
      if len(rows) >= num_samples:
        break
    if len(rows) < num_samples:
      raise ValueError(f'The {split} split has only {len(rows)} sequences for '
                       f'{num_samples} prefixes; ask for fewer samples.')
    prefixes = np.stack(rows[:num_samples]).astype(np.int32)
  tok = tokenizer.get_tokenizer()
  fn = None if task.autoregressive else _network(graphdef, params)
  records, nfe, idle, batches = [], [], [], 0
  bar = report.progress(num_samples, 'sampling', 'sample') if progress else None
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
    if task.autoregressive:
      start_BxL = (jnp.full((batch_size, L), tokenizer.BOS_ID, jnp.int32) if condition is None
                   else condition[0])
      out = samplers.SampleOutput(draw_ar(key, params, start_BxL), steps, 0)
    else:
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
                 expected_idle_fraction=0.0 if task.autoregressive else
                 samplers.expected_idle_fraction(batch_size * L * codec.ell, steps),
                 wall_s=wall, first_batch_s_with_compile=compile_s,
                 samples_per_s=num_samples / wall if wall > 0 else float('nan'))
  if prefixes is not None:
    kept = all(r['tokens'][:prefix_len] == prefixes[i, :prefix_len].tolist()
               for i, r in enumerate(records))
    summary['prefix_kept'] = bool(kept)
  return records, summary


def score_samples(texts: Sequence[str], scorer: str, scorer_path: Optional[str] = None) -> dict:
  """Generative perplexity of texts under a scorer LM (metrics.genppl)."""
  from prime_jax.metrics import genppl  # pylint: disable=import-outside-toplevel
  return genppl.generative_perplexity(list(texts), genppl.load_scorer(scorer, scorer_path))


def run_sample(exp: build.Experiment, workdir: str, *,
               step: Optional[int] = None) -> dict[str, Any]:
  """--mode sample: writes samples JSONL and a summary JSON; optionally generative perplexity.
  The scorer is loaded before any sampling, so a missing scorer fails at once."""
  s = exp.sample
  if exp.task.image:
    raise ValueError('--mode sample is for text configs; images sample with --mode fid.')
  scorer = None
  if s.scorer:
    from prime_jax.metrics import genppl  # pylint: disable=import-outside-toplevel
    scorer = genppl.load_scorer(s.scorer, s.scorer_path)
  r = evaluate.Restored(exp, workdir, step=step)
  records, summary = sample_text(exp.data, r.task, r.graphdef, r.params,
                                 num_samples=s.num_samples, batch_size=s.batch_size,
                                 steps=s.steps, nucleus_p=s.nucleus_p, precision=s.precision,
                                 cache=s.cache, prefix_len=s.prefix_len, seed=s.seed,
                                 split=exp.eval.split, progress=True)
  summary.update(step=r.step, weights='ema' if r.use_ema else 'raw')
  if scorer is not None:
    from prime_jax.metrics import genppl  # pylint: disable=import-outside-toplevel
    summary['generative'] = genppl.generative_perplexity([rec['text'] for rec in records], scorer)
  stem = rundir.output_stem(workdir, sample_name(s, r.step, summary['steps'], r.use_ema),
                            ('.jsonl', '.json'))
  if jax.process_index() == 0:
    with epath.Path(f'{stem}.jsonl').open('w') as f:
      for rec in records:
        f.write(json.dumps(rec) + '\n')
  checkpoint_lib.write_json(f'{stem}.json', summary)
  report.emit(report.format_sampling(summary))
  report.emit(f'wrote {stem}.jsonl/.json')
  for rec in records[:2]:
    report.emit(f"sample {rec['index']}: {preview(rec['text'])}")
  log_samples(workdir, r.step, sample_name(s, r.step, summary['steps'], r.use_ema), records,
              summary)
  return dict(summary, files=[f'{stem}.jsonl', f'{stem}.json'])


def sample_name(s: build.SampleSettings, step: int, steps: int, ema: bool) -> str:
  """The settings the samples depend on, as a file name (the scorer only adds a number)."""
  name = f'samples_step{step}_n{s.num_samples}_T{steps}_{s.precision}'
  name += f'_p{s.prefix_len}' if s.prefix_len else ''
  name += f'_top{s.nucleus_p:g}' if s.nucleus_p < 1 else ''
  name += '' if s.cache else '_nocache'
  name += f'_seed{s.seed}' if s.seed else ''
  return name + ('' if ema else '_raw')


def preview(text: str, limit: int = 200) -> str:
  """`text` on one line (newlines shown as \\n), cut to `limit` characters."""
  line = text.replace('\n', '\\n')
  return line if len(line) <= limit else line[:limit - 3] + '...'


def log_samples(workdir: str, step: int, name: str, records: Sequence[dict], summary: dict, *,
                count: int = 8) -> None:
  """The first `count` samples as TensorBoard text at the checkpoint's step, and the sampler's
  figures (NFE, idle fraction, samples/s, generative PPL) as scalars, under mode_sample/."""
  tag = 'mode_sample/' + name.replace(f'samples_step{step}_', '')
  scalars = {k: summary[k] for k in ('nfe_per_batch', 'idle_fraction', 'samples_per_s')}
  if summary.get('generative'):
    scalars['gen_ppl'] = summary['generative']['gen_ppl']
  writer = writer_lib.MetricWriter(workdir, mode='sample')
  writer.write(step, scalars, prefix=tag + '/')
  writer.text(step, tag, '\n\n'.join(
      f"sample {rec['index']}:\n\n" + writer_lib.code_block(rec['text'])
      for rec in records[:count]), verbatim=False)
  writer.close()
