"""SLURM launcher: writes (and with --submit, sbatch-submits) a job running prime_jax on N x G GPUs.

One task per GPU: srun starts N*G processes. That is the layout JAX's SLURM auto-detection expects:
jax.distributed.initialize() (called by prime_jax.main when SLURM_NTASKS > 1) reads
  SLURM_JOB_ID          detection, and the coordinator port (unless JAX_COORDINATOR_PORT is set)
  SLURM_STEP_NODELIST   its first host runs the coordinator
  SLURM_NTASKS          number of processes
  SLURM_PROCID          this process's id
  SLURM_LOCALID         the one local GPU this process drives (local_device_ids=[SLURM_LOCALID])
so every task must see all GPUs of its node (no --gpus-per-task / --gpu-bind): JAX picks its GPU.
With one task per node instead, JAX would still use only GPU SLURM_LOCALID = 0 on each node.

  python launch/gpu.py --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
      --config configs/owt.py:ell=4 --workdir /shared/runs/owt_ell4 --dry-run -- --config.seed=1
"""

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def resolve_paths(args) -> None:
  """Makes paths absolute (the job cd's into the repo) and puts the script and logs by the run."""
  remote = '://' in args.workdir
  if not remote:
    args.workdir = str(Path(args.workdir).resolve())
  default_dir = Path('slurm_logs') if remote else Path(args.workdir) / 'slurm'
  args.log_dir = Path(args.log_dir or default_dir).resolve()
  args.script = Path(args.script or args.log_dir / f'{args.job_name}.sbatch').resolve()
  args.repo = Path(args.repo).resolve()
  args.venv = Path(args.venv).resolve() if args.venv else args.repo / '.venv'


def render_script(args, extra: list[str]) -> str:
  """The sbatch script, from arguments already made absolute by resolve_paths."""
  directives = [
    f'--job-name={args.job_name}',
    f'--nodes={args.nodes}',
    f'--ntasks-per-node={args.gpus_per_node}',
    f'--gpus-per-node={args.gpus_per_node}',
    *([f'--cpus-per-task={args.cpus_per_task}'] if args.cpus_per_task else []),
    *([f'--partition={args.partition}'] if args.partition else []),
    *([f'--account={args.account}'] if args.account else []),
    *([f'--time={args.time}'] if args.time else []),
    f'--output={args.log_dir}/%x-%j.out',
  ]
  main = [str(args.venv / 'bin' / 'python'), '-m', 'prime_jax.main', '--config', args.config,
          '--workdir', args.workdir, *extra]
  env = ['export PYTHONUNBUFFERED=1']
  if args.coordinator_port:
    env.append(f'export JAX_COORDINATOR_PORT={args.coordinator_port}')
  lines = [
    '#!/bin/bash',
    *(f'#SBATCH {d}' for d in directives),
    f'# {args.nodes} node(s) x {args.gpus_per_node} GPU(s): one JAX process per GPU. srun sets',
    '# SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID, which',
    '# jax.distributed.initialize() reads; each task sees all GPUs and JAX picks SLURM_LOCALID.',
    'set -euo pipefail',
    f'cd {shlex.quote(str(args.repo))}',
    *env,
    f'srun --kill-on-bad-exit=1 {shlex.join(main)}',
  ]
  return '\n'.join(lines) + '\n'


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog='launch/gpu.py', description=__doc__.split('\n\n')[0],
    epilog='Arguments after `--` are passed to prime_jax.main.')
  parser.add_argument('--nodes', type=int, default=1)
  parser.add_argument('--gpus-per-node', type=int, default=8)
  parser.add_argument('--partition')
  parser.add_argument('--time', help='wall-clock limit, e.g. 24:00:00')
  parser.add_argument('--account')
  parser.add_argument('--cpus-per-task', type=int)
  parser.add_argument('--job-name', default='prime_jax')
  parser.add_argument('--config', required=True, help='e.g. configs/owt.py:ell=4')
  parser.add_argument('--workdir', required=True, help='on a shared filesystem (or gs://)')
  parser.add_argument('--venv', help='virtual environment with jax[cuda12] (default: REPO/.venv)')
  parser.add_argument('--repo', default=str(REPO), help='checkout the job runs in')
  parser.add_argument('--script', help='where to write it (default: LOG_DIR/JOB_NAME.sbatch)')
  parser.add_argument('--log-dir', help='job logs %%x-%%j.out (default: WORKDIR/slurm, or '
                      './slurm_logs for a gs:// workdir)')
  parser.add_argument('--coordinator-port', type=int, help='sets JAX_COORDINATOR_PORT')
  parser.add_argument('--submit', action='store_true', help='sbatch the script after writing it')
  parser.add_argument('--dry-run', action='store_true',
                      help='print the script and the sbatch command; write and run nothing')
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  at = argv.index('--') if '--' in argv else len(argv)
  own, extra = argv[:at], argv[at + 1:]  # everything after `--` goes to prime_jax.main untouched
  parser = build_parser()
  args = parser.parse_args(own)
  if '--dry-run' in extra:
    parser.error('--dry-run must come before `--` (after it, it would be passed through)')
  for flag, value in (('--nodes', args.nodes), ('--gpus-per-node', args.gpus_per_node)):
    if value < 1:
      parser.error(f'{flag} must be at least 1, got {value}')
  resolve_paths(args)
  if any(c.isspace() for c in str(args.log_dir)):
    parser.error(f'--log-dir {args.log_dir} contains whitespace, which #SBATCH lines cannot hold; '
                 'pass another --log-dir')
  script = render_script(args, extra)
  path = args.script
  sbatch = ['sbatch', str(path)]
  if args.dry_run:
    print(script, end='')
    print(shlex.join(sbatch))
    return 0
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(script)
  args.log_dir.mkdir(parents=True, exist_ok=True)  # SLURM does not create it
  print(f'wrote {path}', file=sys.stderr)
  if not args.submit:
    print(f'submit with: {shlex.join(sbatch)}', file=sys.stderr)
    return 0
  try:
    rc = subprocess.run(sbatch, check=False).returncode
  except FileNotFoundError:
    print("error: 'sbatch' was not found on PATH (run this on a SLURM login node)", file=sys.stderr)
    return 127
  if rc != 0:
    print(f'error: sbatch failed with exit status {rc}: {shlex.join(sbatch)}', file=sys.stderr)
  return rc


if __name__ == '__main__':
  sys.exit(main())
