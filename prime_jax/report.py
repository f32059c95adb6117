"""The short summary printed at the end of `make run`."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np


def unigram_baseline_nll(source: str, seq_len: int) -> float:
  """Validation cross-entropy (nats/token) of the add-one-smoothed training unigram model."""
  from prime_jax.data import pipeline
  train = np.asarray(pipeline.unigram_counts(source, 'train', seq_len), np.float64)
  val = np.asarray(pipeline.unigram_counts(source, 'validation', seq_len), np.float64)
  p = (train + 1.0) / (train.sum() + train.size)
  return float(-(val * np.log(p)).sum() / val.sum())


def print_summary(cfg, workdir: str, summary: dict) -> None:
  if jax.process_index() != 0:
    return
  lines = [f'== prime_jax run summary ({workdir}) ==',
           f'data {cfg.data.source}, ell {cfg.diffusion.ell}, params {summary.get("params", 0):,}, '
           f'steps {summary.get("steps")}, wall {summary.get("wall_s", 0):.0f} s']
  if 'bpd' in summary:  # images: per colour-channel token, no unigram baseline
    lines.append(f'validation NLL <= {summary["nll"]:.4f} nats/dim, BPD <= {summary["bpd"]:.4f} '
                 '(valid bound, EMA weights)')
    lines.append(f"authors' objective (unweighted CE, their training loss): "
                 f"{summary['paper_objective']:.4f}; their BPD estimate (not a bound for ell > 1): "
                 f"{summary['paper_bpd']:.4f}")
    print('\n'.join(lines), flush=True)
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)
    return
  if 'nll' in summary:
    lines.append(f'validation NLL <= {summary["nll"]:.4f} nats/token, PPL <= '
                 f'{summary["ppl_bound"]:.2f} (valid bound, EMA weights)')
    lines.append(f"authors' objective (not a bound for ell > 1): {summary['paper_objective']:.4f}")
  try:
    base = unigram_baseline_nll(cfg.data.source, cfg.data.seq_len)
    summary['unigram_ppl'] = math.exp(base)
    lines.append(f'unigram baseline PPL: {math.exp(base):.2f} (nats {base:.4f})')
  except Exception as e:  # the baseline is informative, never fatal
    lines.append(f'unigram baseline unavailable: {e}')
  print('\n'.join(lines), flush=True)
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
