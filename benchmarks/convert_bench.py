"""Converter benchmark at full size: time and peak memory of importing a released-size checkpoint.

  python benchmarks/convert_bench.py --setup results_prime_l2_owt --dir /tmp/convert_bench

1. Writes, in a child process, a Lightning checkpoint of the setup's model (131M parameters for
   Prime ℓ = 2) in the authors' layout: raw weights, EMA and, like their training states, AdamW
   moments (exp_avg, exp_avg_sq) for every parameter, so the file has the released files' size
   (≈ 2.1 GB here; theirs ≈ 2.7 GB with bf16-era extras).
2. Imports it in a fresh child process (`python -m prime_jax.convert import`) and prints the
   wall time and that process's peak resident memory (ru_maxrss), beside the file size.
3. Exports the workdir back and checks that the exported weights equal the file's, bit for bit.
The weights are random (their shapes are what matters for time and memory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_file(setup: str, path: str) -> None:
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from prime_jax import build, torchfile  # pylint: disable=import-outside-toplevel
  from prime_jax.convert import text  # pylint: disable=import-outside-toplevel
  exp = build.experiment(build.load_config(f'configs/official.py:setup={setup}'))
  module = nnx.eval_shape(lambda: exp.make_model(rngs=nnx.Rngs(0)))
  _, abstract, _ = build.abstract_params(exp.make_model)
  rng = np.random.default_rng(0)
  flat = {}
  import jax  # pylint: disable=import-outside-toplevel
  for path_, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(abstract)):
    name = '.'.join(str(getattr(k, 'key', getattr(k, 'idx', ''))) for k in path_)
    flat[name] = (rng.standard_normal(leaf.shape, np.float32) * 0.02)
  ckpt = text.lightning_checkpoint(flat, flat, num_layers=module.num_layers,
                                   head_dim=module.dim // module.num_heads,
                                   autoregressive=exp.task.autoregressive, scanned=False, step=1000,
                                   ema_decay=0.9999)
  params = [v for k, v in ckpt['state_dict'].items() if not k.endswith(text.INV_FREQ)]
  state = {i: {'step': np.asarray(1000.0, np.float32), 'exp_avg': p, 'exp_avg_sq': p * p}
           for i, p in enumerate(params)}
  ckpt['optimizer_states'] = [{'state': state, 'param_groups': [
      {'lr': 3e-4, 'params': list(range(len(params)))}]}]
  torchfile.write(ckpt, path)


def child(argv: list[str]) -> tuple[float, float, str]:
  """(wall seconds, peak RSS in GiB, output) of a child Python process."""
  code = ('import resource, runpy, sys; sys.argv = %r; '
          'rc = 0\ntry:\n  runpy.run_module("prime_jax.convert", run_name="__main__")\n'
          'except SystemExit as e:\n  rc = e.code or 0\n'
          'print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n'
          'sys.exit(rc)' % (['prime_jax.convert'] + argv,))
  t = time.time()
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       check=False)
  wall = time.time() - t
  if out.returncode:
    raise SystemExit(out.stdout + out.stderr)
  rss = [int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith('MAXRSS_KB')]
  return wall, rss[0] / 2**20, out.stdout


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--setup', default='results_prime_l2_owt')
  ap.add_argument('--dir', default='/tmp/convert_bench')
  args = ap.parse_args()
  os.makedirs(args.dir, exist_ok=True)
  path = os.path.join(args.dir, 'checkpoint.ckpt')
  t = time.time()
  if not os.path.exists(path):
    subprocess.run([sys.executable, __file__, '--write', args.setup, path], check=True)
  print(f'file: {path} ({os.path.getsize(path) / 2**30:.2f} GiB; written in '
        f'{time.time() - t:.0f} s)')
  work = os.path.join(args.dir, 'workdir')
  subprocess.run(['rm', '-rf', work], check=True)
  wall, rss, _ = child(['import', '--checkpoint', path, '--config',
                        f'configs/official.py:setup={args.setup}', '--workdir', work])
  print(f'import: {wall:.1f} s wall, peak RSS {rss:.2f} GiB')
  out = os.path.join(args.dir, 'exported.ckpt')
  wall_e, rss_e, _ = child(['export', '--workdir', work, '--out', out])
  print(f'export: {wall_e:.1f} s wall, peak RSS {rss_e:.2f} GiB, '
        f'{os.path.getsize(out) / 2**30:.2f} GiB written')
  import numpy as np  # pylint: disable=import-outside-toplevel

  from prime_jax import torchfile  # pylint: disable=import-outside-toplevel
  with torchfile.TorchFile(path) as a, torchfile.TorchFile(out) as b:
    same = all(np.array_equal(a.root['state_dict'][k].numpy(), b.root['state_dict'][k].numpy())
               for k in a.root['state_dict'])
    same &= all(np.array_equal(x.numpy(), y.numpy())
                for x, y in zip(a.root['ema']['shadow_params'], b.root['ema']['shadow_params']))
  print(f'export == file (state_dict and EMA, bit for bit): {same}')
  print(json.dumps({'setup': args.setup, 'file_gib': os.path.getsize(path) / 2**30,
                    'import_s': wall, 'import_peak_rss_gib': rss, 'export_s': wall_e,
                    'export_peak_rss_gib': rss_e, 'identical': same}))


if __name__ == '__main__':
  if len(sys.argv) == 4 and sys.argv[1] == '--write':
    write_file(sys.argv[2], sys.argv[3])
  else:
    main()
