"""The ℓ sweep: train the same config for each ℓ, evaluate, sample, and tabulate.

  python launch/sweep_ell.py --config configs/sotu.py --ells 1,2,4,8 --workdir workdir/sweep

For each ℓ (same steps, batch and seed): train in WORKDIR/ell{ℓ} (resumes; a finished run is not
retrained), evaluate the valid bound on the whole validation split, draw samples one sequence at a
time at T = L steps (so the idle-step fraction is per sequence, as in method.md §6), score them with
the offline proxy scorer, and time the train step on synthetic batches. Writes WORKDIR/sweep.json,
WORKDIR/sweep.md (the table) and WORKDIR/sweep.png. `--set key=value` overrides config fields for
every ℓ (the tests use it for a micro run).

`ar` in --ells (e.g. `--ells ar,1,2,4,8`) adds the autoregressive baseline as a row: the same config
at ℓ = 1 with model.name='ar', in WORKDIR/ar; its PPL is exact, its samples ancestral (L - 1 steps).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def load_config(path: str, ell: int | str, overrides: list[str]):
  """The config at this ℓ; ell='ar': at ℓ = 1 with model.name='ar' (the autoregressive row)."""
  spec = importlib.util.spec_from_file_location('sweep_config', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config(f"ell={1 if ell == 'ar' else ell}")
  cfg.unlock()
  if ell == 'ar':
    cfg.model.name = 'ar'
  for item in overrides:
    key, _, raw = item.partition('=')
    node = cfg
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    old = node[leaf]
    node[leaf] = type(old)(raw) if not isinstance(old, bool) else raw.lower() in ('1', 'true')
  cfg.lock()
  return cfg


def run_one(cfg, workdir: str, *, num_samples: int, scorer: str, bench_steps: int,
            eval_batches: int = 0) -> dict:
  import dataclasses  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel

  from prime_jax import bench, build, evaluate, report, sample, train  # pylint: disable=import-outside-toplevel
  from prime_jax.diffusion import samplers  # pylint: disable=import-outside-toplevel

  ell = cfg.diffusion.ell
  is_ar = cfg.model.name == 'ar'
  done_path = os.path.join(workdir, 'sweep_row.json')
  if os.path.exists(done_path):
    with open(done_path) as f:
      row = json.load(f)
    print(f"[sweep] {'ar' if is_ar else f'ell={ell}'}: reusing {done_path}", flush=True)
    return row
  t0 = time.time()
  summary = train.train_and_evaluate(cfg, workdir)
  train_wall = time.time() - t0
  exp = build.experiment(cfg)
  r = evaluate.Restored(exp, workdir)
  ev = evaluate.Evaluator(exp, r.mesh, r.graphdef, r.param_shardings, r.task)
  t0 = time.time()
  res = ev.run(r.params, num_batches=eval_batches, progress=True)
  eval_wall = time.time() - t0
  print('[sweep] ' + report.format_result(res), flush=True)
  L = exp.data.seq_len
  records, samp = sample.sample_text(exp.data, r.task, r.graphdef, r.params,
                                     num_samples=num_samples, batch_size=1, steps=L,
                                     precision='fp64', cache=True, seed=0,
                                     split=exp.eval.split, progress=True)
  with open(os.path.join(workdir, f'sweep_samples_T{L}.jsonl'), 'w') as f:
    for rec in records:
      f.write(json.dumps(rec) + '\n')
  gen = sample.score_samples([rec['text'] for rec in records], scorer) if scorer else {}
  b = bench.run(dataclasses.replace(exp, loop=dataclasses.replace(exp.loop,
                                                                  bench_steps=bench_steps)))
  row = dict(ell=ell, model=cfg.model.name, base=r.codec.base,
             params=int(summary.get('params', 0)) or None,
             steps=exp.loop.num_steps, batch=exp.data.batch_size, seq_len=L,
             nll=res['nll'], ppl_bound=res['ppl_bound'], paper_objective=res['paper_objective'],
             eval_tokens=res['tokens'], gen_ppl=gen.get('gen_ppl'), scorer=gen.get('scorer'),
             entropy_bits=gen.get('entropy_bits'), num_samples=num_samples,
             idle_fraction=samp['idle_fraction'],
             expected_idle_fraction=0.0 if is_ar else samplers.expected_idle_fraction(L * ell, L),
             nfe=samp['nfe_per_batch'], sampling_steps=samp['steps'],
             samples_per_s=samp['samples_per_s'],
             step_s=b['step_s'], train_wall_s=train_wall, eval_wall_s=eval_wall,
             device=jax.devices()[0].device_kind)
  if row['params'] is None:
    row['params'] = int(b['params'])
  with open(done_path, 'w') as f:
    json.dump(row, f, indent=2)
  return row


def table(rows: list[dict]) -> str:
  scorer = next((r['scorer'] for r in rows if r.get('scorer')), 'none')
  lines = [
      '| ℓ | b | parameters | valid PPL bound | authors\' objective (nats) | gen. PPL | entropy '
      '(bits) | idle fraction (expected) | NFE at T = L | train step (s) |',
      '|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    gen = f"{r['gen_ppl']:.1f}" if r.get('gen_ppl') is not None else '–'
    ent = f"{r['entropy_bits']:.2f}" if r.get('entropy_bits') is not None else '–'
    ar = r.get('model') == 'ar'  # exact PPL; ancestral sampling, L - 1 steps, never idle
    lines.append(
        f"| {'AR' if ar else r['ell']} | {'–' if ar else r['base']} | {r['params']:,} | "
        f"{'=' if ar else '≤'} {r['ppl_bound']:.1f} | {r['paper_objective']:.4f} | {gen} | {ent} | "
        f"{r['idle_fraction']:.3f} ({r['expected_idle_fraction']:.3f}) | {r['nfe']:.1f} | "
        f"{r['step_s']:.2f} |")
  r0 = next((r for r in rows if r.get('model') != 'ar'), rows[0])
  lines.append('')
  lines.append(
      f"Same config for every row: {r0['steps']} steps, batch {r0['batch']} × {r0['seq_len']} "
      f"tokens. Valid PPL bound: validation split ({r0['eval_tokens']:,} tokens), EMA weights. "
      f"Gen. PPL: {r0['num_samples']} unconditional samples (T = L = {r0['seq_len']} steps, fp64, "
      f"one sequence at a time) scored by {scorer} — a relative metric, not comparable with "
      f"GPT-2-large numbers. Idle fraction: share of reverse steps in which a sequence did not "
      f"change (expected (1 − 1/T)^(Lℓ)). Train step: synthetic batches on {r0['device']}.")
  if any(r.get('model') == 'ar' for r in rows):
    lines.append(
        "AR: the autoregressive baseline (model.name='ar': the same trunk with causal attention "
        "and no adaLN, ℓ = 1): its PPL is the exact exp(NLL) over the L − 1 predicted tokens of "
        "each sequence and its objective column is that NLL; samples are drawn ancestrally in "
        "L − 1 steps.")
  return '\n'.join(lines)


def plot(rows: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  ars = [r for r in rows if r.get('model') == 'ar']  # drawn as horizontal lines
  rows = [r for r in rows if r.get('model') != 'ar']
  ells = [r['ell'] for r in rows]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  ax = axes[0]
  ax.plot(ells, [r['ppl_bound'] for r in rows], 'o-', label='valid bound (PPL ≤)')
  ax.plot(ells, [math.exp(r['paper_objective']) for r in rows], 's--',
          label="exp(authors' objective), not a bound")
  for r in ars:
    ax.axhline(r['ppl_bound'], color='C4', ls='-.', label='AR (exact PPL)')
  ax.set_xscale('log', base=2)
  ax.set_xlabel('ℓ (sub-tokens per token)')
  ax.set_ylabel('perplexity')
  ax.set_title('Likelihood on validation')
  ax.legend(fontsize=8)
  ax = axes[1]
  if rows and all(r.get('gen_ppl') is not None for r in rows):
    ax.plot(ells, [r['gen_ppl'] for r in rows], 'o-', color='C2')
    ax.set_ylabel(f"gen. PPL ({rows[0]['scorer'].split(' ')[0]})")
  for r in ars:
    if r.get('gen_ppl') is not None:
      ax.axhline(r['gen_ppl'], color='C4', ls='-.', label='AR')
      ax.legend(fontsize=8)
  ax.set_xscale('log', base=2)
  ax.set_xlabel('ℓ')
  ax.set_title('Sample quality (lower is better)')
  ax = axes[2]
  ax.plot(ells, [r['idle_fraction'] for r in rows], 'o-', color='C3', label='measured')
  ax.plot(ells, [r['expected_idle_fraction'] for r in rows], 'x:', color='k', label='(1−1/T)^(Lℓ)')
  ax.set_xscale('log', base=2)
  ax.set_xlabel('ℓ')
  ax.set_ylabel('idle fraction at T = L')
  ax.set_title('Idle reverse steps')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--config', default=os.path.join(ROOT, 'configs', 'sotu.py'))
  p.add_argument('--ells', default='1,2,4,8',
                 help="comma-separated ℓ values; 'ar' adds the autoregressive baseline's row")
  p.add_argument('--workdir', default=os.path.join(ROOT, 'workdir', 'sweep'))
  p.add_argument('--num_samples', type=int, default=32)
  p.add_argument('--scorer', default='smollm2', help="'smollm2', or '' to skip gen. PPL")
  p.add_argument('--bench_steps', type=int, default=5)
  p.add_argument('--eval_batches', type=int, default=0, help='0 = the whole validation split')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='config override applied to every ℓ, e.g. --set train.num_steps=100')
  args = p.parse_args(argv)
  try:
    ells = [e.strip() if e.strip() == 'ar' else int(e) for e in args.ells.split(',') if e.strip()]
  except ValueError:
    ells = []
  if not ells or any(e != 'ar' and e < 1 for e in ells):
    p.error(f"--ells must list positive integers or 'ar', got {args.ells!r}")
  os.makedirs(args.workdir, exist_ok=True)
  rows = []
  for ell in ells:
    cfg = load_config(args.config, ell, args.set)
    name = 'ar' if ell == 'ar' else f'ell{ell}'
    print(f'[sweep] {name}: training {cfg.train.num_steps} steps', flush=True)
    rows.append(run_one(cfg, os.path.join(args.workdir, name),
                        num_samples=args.num_samples, scorer=args.scorer,
                        bench_steps=args.bench_steps, eval_batches=args.eval_batches))
  with open(os.path.join(args.workdir, 'sweep.json'), 'w') as f:
    json.dump(rows, f, indent=2)
  md = table(rows)
  with open(os.path.join(args.workdir, 'sweep.md'), 'w') as f:
    f.write(md + '\n')
  plot(rows, os.path.join(args.workdir, 'sweep.png'))
  print(md)
  print(f"wrote {os.path.join(args.workdir, 'sweep.md')} and sweep.png")
  return 0


if __name__ == '__main__':
  sys.exit(main())
