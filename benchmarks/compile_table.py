"""The pod table: owt small and medium at the reference global batch 512 x 1024, compiled ahead of
time for TPU topologies (`--mode compile`, XLA's estimates, not measurements).

  python benchmarks/compile_table.py                      # every row below, splash attention
  python benchmarks/compile_table.py --rows small:4 --topologies v5p-128 --attention xla

Each row is compiled in its own process (memory stays bounded) with a data-parallel mesh and no
remat first; a step that does not fit is retried with the next candidate (fsdp over the slice,
then remat full). Per row: fits, GiB per chip, XLA's estimated step time, the estimated MFU and
tokens/s per chip, and the candidate that gave them. Needs libtpu (`make tpu-tools`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ('small:1', 'small:2', 'small:4', 'medium:2', 'medium:4')
TOPOLOGIES = ('v5e-256', 'v5p-128', 'v6e-64')
CANDIDATES = (  # (label, config overrides), tried in order until one fits
    ('data-parallel, remat none', []),
    ('fsdp, remat none', ['--config.mesh.data=1', '--config.mesh.fsdp=-1']),
    ('fsdp, remat full', ['--config.mesh.data=1', '--config.mesh.fsdp=-1',
                          '--config.model.remat=full']),
)


def compile_once(row: str, topology: str, overrides: list[str]) -> tuple[int, dict, str]:
  """(exit status, the JSON report, the last stderr line) of one `--mode compile` process."""
  size, ell = row.split(':')
  with tempfile.TemporaryDirectory() as workdir:
    cmd = [sys.executable, '-m', 'prime_jax.main', '--mode', 'compile', '--topology', topology,
           '--config', f'configs/owt.py:ell={ell},size={size}', '--workdir', workdir,
           *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    out = os.path.join(workdir, f'compile_{topology}.json')
    result = json.load(open(out)) if os.path.exists(out) else {}
  return proc.returncode, result, (proc.stderr.strip().splitlines() or [''])[-1]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--rows', default=','.join(ROWS))
  ap.add_argument('--topologies', default=','.join(TOPOLOGIES))
  ap.add_argument('--attention', default='splash', help='model.attention: splash | xla')
  ap.add_argument('--out', default='')
  args = ap.parse_args()
  table = []
  for topology in args.topologies.split(','):
    for row in args.rows.split(','):
      for label, overrides in CANDIDATES:
        t0 = time.time()
        rc, r, err = compile_once(row, topology,
                                  overrides + [f'--config.model.attention={args.attention}'])
        took = time.time() - t0
        if rc == 0:
          t = r['programs']['train']
          entry = dict(row=row, topology=topology, candidate=f'{label}, {args.attention}',
                       fits=True,
                       gib_per_chip=t['memory_bytes']['total'] / 2**30,
                       est_step_ms=1e3 * t.get('estimated_s', t['xla_estimated_s']),
                       est_mfu=t['estimated_mfu'],
                       est_tokens_per_s_per_chip=t['estimated_tokens_per_s_per_chip'],
                       params=r['params'], mesh=r['mesh'], compile_s=took,
                       xla_to_analytic_flops=t['xla_to_analytic_flops'],
                       collectives=t['collectives'])
          break
        entry = dict(row=row, topology=topology, candidate=f'{label}, {args.attention}',
                     fits=False, error=err, compile_s=took)
        if rc != 3:
          break  # not a memory problem: the next candidate would not help
      table.append(entry)
      print(json.dumps(entry), flush=True)
      if args.out:
        with open(args.out, 'w') as f:
          json.dump(table, f, indent=2)
  print('\n| model | ell | topology | fits | GiB/chip | est. step | est. MFU | est. tokens/s/chip '
        '| mesh, remat |')
  print('|---|---|---|---|---|---|---|---|---|')
  for e in table:
    size, ell = e['row'].split(':')
    if e['fits']:
      print(f'| {size} | {ell} | {e["topology"]} | yes | {e["gib_per_chip"]:.1f} | '
            f'{e["est_step_ms"]:.0f} ms | {100 * e["est_mfu"]:.1f} % | '
            f'{e["est_tokens_per_s_per_chip"]:,.0f} | {e["candidate"]} |')
    else:
      print(f'| {size} | {ell} | {e["topology"]} | no | | | | | {e["error"][:80]} |')


if __name__ == '__main__':
  main()
