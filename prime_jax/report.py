"""Everything printed: result lines, progress bars and the summary at the end of a training run.
Process 0 prints; the numbers come from the evaluator and `metrics/`."""

from __future__ import annotations

import math
from typing import Any, Optional

import jax

from prime_jax import rundir


def emit(line: str) -> None:
  if jax.process_index() == 0:
    print(line, flush=True)


def progress(total: int, desc: str, unit: str):
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, desc=desc, unit=unit, disable=jax.process_index() != 0,
              mininterval=2.0)


def _format_exact(r: dict) -> str:
  """The autoregressive baseline's exact likelihood: never labelled a bound."""
  return (f"NLL {r['nll']:.4f} ± {r['nll_se']:.4f} nats/token, PPL = exp(NLL) = {r['ppl']:.2f} "
          "(exact, autoregressive)")


def format_eval(r: dict) -> str:
  """One line for an evaluation during training."""
  if r.get('autoregressive'):
    return _format_exact(r)
  if 'bpd' in r:
    return (f"NLL {r['nll']:.4f} ± {r['nll_se']:.4f} nats/dim, BPD <= {r['bpd']:.4f} (valid "
            f"bound); authors' objective {r['paper_objective']:.4f}, authors' BPD estimate "
            f"{r['paper_bpd']:.4f} (not a bound for ell > 1)")
  cv = (f"; control variate NLL {r['nll_cv']:.4f} ± {r['nll_cv_se']:.4f}, PPL <= "
        f"{r['ppl_bound_cv']:.2f}") if 'nll_cv' in r else ''
  return (f"NLL {r['nll']:.4f} ± {r['nll_se']:.4f} nats/token, PPL <= {r['ppl_bound']:.2f} "
          f"(valid bound){cv}; authors' objective {r['paper_objective']:.4f}")


def format_result(r: dict) -> str:
  """The --mode eval line(s) of one source/split."""
  if r.get('autoregressive'):
    return (f"{r['source']}/{r['split']}: {_format_exact(r)}, {r['bpt']:.4f} bits/token; "
            f"{r['tokens']:,} predicted tokens (L - 1 per sequence)")
  if 'bpd' in r:
    return (f"{r['source']}/{r['split']}: NLL <= {r['nll']:.4f} ± {r['nll_se']:.4f} nats/dim, "
            f"BPD <= {r['bpd']:.4f} ± {r['bpd_se']:.4f} (valid bound); authors' objective "
            f"{r['paper_objective']:.4f}, authors' BPD estimate {r['paper_bpd']:.4f} (not a "
            f"bound for ell > 1); {r['examples']:,} images, {r['num_t']} t/image")
  line = (f"{r['source']}/{r['split']}: NLL <= {r['nll']:.4f} ± {r['nll_se']:.4f} nats/token "
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


def print_summary(workdir: str, summary: dict[str, Any], *, source: str, ell: int,
                  unigram_nll: Optional[float] = None,
                  unigram_error: Optional[str] = None) -> None:
  """The end-of-run summary (and summary.json). unigram_nll: the training unigram's validation
  cross-entropy (text), printed as the baseline a model with context must beat."""
  if jax.process_index() != 0:
    return
  ar = bool(summary.get('autoregressive'))
  lines = [f'== prime_jax run summary ({workdir}) ==',
           f'data {source}, {"autoregressive" if ar else f"ell {ell}"}, '
           f'params {summary.get("params", 0):,}, '
           f'steps {summary.get("steps")}, wall {summary.get("wall_s", 0):.0f} s']
  if 'bpd' in summary:  # images: per colour-channel token, no unigram baseline
    lines.append(f'validation NLL <= {summary["nll"]:.4f} nats/dim, BPD <= {summary["bpd"]:.4f} '
                 '(valid bound, EMA weights)')
    lines.append(f"authors' objective (unweighted CE, their training loss): "
                 f"{summary['paper_objective']:.4f}; their BPD estimate (not a bound for ell > 1): "
                 f"{summary['paper_bpd']:.4f}")
  else:
    if ar:
      lines.append(f'validation NLL = {summary["nll"]:.4f} ± {summary["nll_se"]:.4f} nats/token, '
                   f'PPL = exp(NLL) = {summary["ppl"]:.2f} (exact, autoregressive, EMA weights)')
    elif 'nll_cv' in summary:
      lines.append(f'validation NLL <= {summary["nll_cv"]:.4f} ± {summary["nll_cv_se"]:.4f} '
                   f'nats/token, PPL <= {summary["ppl_bound_cv"]:.2f} (valid bound, EMA weights; '
                   'control-variate estimate ± standard error)')
      lines.append(f'  plain Monte Carlo estimate: NLL <= {summary["nll"]:.4f} ± '
                   f'{summary["nll_se"]:.4f}, PPL <= {summary["ppl_bound"]:.2f} (the unigram on '
                   f'the same draws: {summary["reference_mc"]:.4f}, expected '
                   f'{summary["reference_nll"]:.4f})')
    elif 'nll' in summary:
      lines.append(f'validation NLL <= {summary["nll"]:.4f} nats/token, PPL <= '
                   f'{summary["ppl_bound"]:.2f} (valid bound, EMA weights)')
      lines.append(f"authors' objective (not a bound for ell > 1): "
                   f"{summary['paper_objective']:.4f}")
    if unigram_nll is not None:
      summary['unigram_ppl'] = math.exp(unigram_nll)
      lines.append(f'unigram baseline PPL: {math.exp(unigram_nll):.2f} (nats {unigram_nll:.4f})')
    else:
      lines.append(f'unigram baseline unavailable: {unigram_error}')
  if not rundir.write_summary(workdir, summary):
    lines.append(f'(kept the earlier {workdir}/summary.json: it has validation numbers this one '
                 'lacks)')
  print('\n'.join(lines), flush=True)
