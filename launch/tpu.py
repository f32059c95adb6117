"""Cloud TPU launcher: create a TPU VM, set it up, run prime_jax on every host, tail logs, delete.

Each subcommand builds a list of commands. With --dry-run they are printed (one per line,
shell-quoted) and nothing runs; otherwise they run in order and the first failure stops the launch.

Multi-host: a pod slice (v4-32, v5litepod-64, ...) runs one Python process per host. `run` starts
the same command on every worker at once (--worker=all) with PRIME_JAX_DISTRIBUTED=1, on which
prime_jax.main calls jax.distributed.initialize() (JAX reads the coordinator and process ids from
the TPU VM metadata), so nothing differs between workers.

Python: TPU images ship the system Python (3.8-3.10), but prime_jax needs 3.11. `setup` installs uv
with the system pip, lets uv download a standalone CPython 3.11 (needs internet on the workers) and
builds .venv from it, so the image's Python is never changed.

  python launch/tpu.py create --name my-tpu --zone us-central2-b --accelerator-type v4-32 --dry-run
  python launch/tpu.py run --name my-tpu --zone us-central2-b --config configs/owt.py:ell=4 \\
      --workdir gs://bucket/owt_ell4 -- --config.optim.lr=3e-4
"""

import argparse
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REMOTE_DIR = 'prime_jax'  # relative to the home directory on each worker
PYTHON_VERSION = '3.11'
JAX_PIN = 'jax[tpu]==0.10.2'
LOG_FILE = 'run.log'  # inside REMOTE_DIR, one per worker
PID_FILE = 'run.pid'
STAGE_MARKER = '.prime_jax_stage'  # lets `stage` replace only folders it made

# Runtime (image) per TPU generation when --version is not given; see Cloud TPU "software versions".
_DEFAULT_VERSIONS = (
  ('v6e', 'v2-alpha-tpuv6e'),
  ('v5litepod', 'v2-alpha-tpuv5-lite'),
  ('v5p', 'v2-alpha-tpuv5'),
)
_FALLBACK_VERSION = 'tpu-ubuntu2204-base'  # v2, v3, v4

# Subcommands that accept extra arguments after `--`, and where they go.
_EXTRA_USE = {
  'create': 'extra gcloud flags',
  'run': 'extra prime_jax.main flags',
  'delete': 'extra gcloud flags',
}


def default_version(accelerator_type: str) -> str:
  for prefix, version in _DEFAULT_VERSIONS:
    if accelerator_type.startswith(prefix):
      return version
  return _FALLBACK_VERSION


def _scope(args) -> list[str]:
  return [f'--zone={args.zone}'] + ([f'--project={args.project}'] if args.project else [])


def _tpu_vm(args, verb: str, *rest: str) -> list[str]:
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, args.name, *_scope(args), *rest]


def _ssh(args, worker: str, remote: str) -> list[str]:
  return _tpu_vm(args, 'ssh', f'--worker={worker}', '--command', remote)


def create_commands(args, extra: list[str]) -> list[list[str]]:
  version = args.version or default_version(args.accelerator_type)
  tier = ['--spot'] if args.spot else ['--reserved'] if args.reserved else []
  if args.queued:
    # Queued resources wait for capacity instead of failing; the node appears once ACTIVE.
    cmd = ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', args.name,
           f'--node-id={args.name}', *_scope(args), f'--accelerator-type={args.accelerator_type}',
           f'--runtime-version={version}']
  else:
    cmd = _tpu_vm(args, 'create', f'--accelerator-type={args.accelerator_type}',
                  f'--version={version}')
  return [cmd + tier + extra]


def setup_commands(args, extra: list[str]) -> list[list[str]]:
  del extra
  # Stage a clean copy first: scp has no excludes, and .venv/.git must not reach the workers.
  stage_root = Path(args.stage_dir or Path(tempfile.gettempdir()) / f'prime_jax-stage-{args.name}')
  staged = stage_root / REMOTE_DIR
  uv = 'python3 -m uv'
  remote = ' && '.join([
    f'cd {REMOTE_DIR}',
    # PEP 668 images refuse --user installs unless told; older pips do not know the flag.
    '(python3 -m pip install --user --upgrade uv'
    ' || python3 -m pip install --user --upgrade --break-system-packages uv)',
    f'{uv} python install {PYTHON_VERSION}',
    'rm -rf .venv',
    f'{uv} venv --seed --python {PYTHON_VERSION} .venv',
    f'{uv} pip install --python .venv/bin/python {shlex.quote(JAX_PIN)} -r requirements.txt',
    ".venv/bin/python -c 'import sys, jax; print(sys.version.split()[0], jax.__version__)'",
  ])
  return [
    [sys.executable, str(Path(__file__).resolve()), 'stage', str(REPO), str(staged)],
    ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', '--recurse', '--worker=all', *_scope(args),
     str(staged), f'{args.name}:~/'],
    _ssh(args, 'all', remote),
  ]


def repo_files(src: Path) -> list[str]:
  """The files git would ship (tracked + untracked, not ignored); a plain walk without git."""
  try:
    out = subprocess.run(['git', '-C', str(src), 'ls-files', '-z', '-co', '--exclude-standard'],
                         capture_output=True, check=True).stdout
    return sorted(f for f in out.decode().split('\0') if f and (src / f).is_file())
  except (OSError, subprocess.CalledProcessError):
    skip = {'.git', '.venv', '__pycache__', '.pytest_cache', '.ruff_cache', 'workdir', 'workdirs'}
    return sorted(str(p.relative_to(src)) for p in src.rglob('*')
                  if p.is_file() and not skip & set(p.relative_to(src).parts))


def stage(src: Path, dest: Path) -> int:
  """Copies the repository's files into a fresh DEST (the `stage` subcommand)."""
  src, dest = src.resolve(), dest.resolve()
  if dest == src or src in dest.parents or dest in src.parents:
    print(f'error: stage folder {dest} overlaps the repository {src}', file=sys.stderr)
    return 2
  if dest.exists():
    if not (dest / STAGE_MARKER).exists():
      print(f'error: {dest} exists and was not made by `stage`; refusing to replace it',
            file=sys.stderr)
      return 2
    shutil.rmtree(dest)
  dest.mkdir(parents=True)
  (dest / STAGE_MARKER).touch()
  files = repo_files(src)
  for rel in files:
    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / rel, dest / rel)
  print(f'staged {len(files)} files in {dest}', file=sys.stderr)
  return 0


def run_commands(args, extra: list[str]) -> list[list[str]]:
  if not args.workdir.startswith('gs://'):
    print(f'warning: --workdir {args.workdir} is local to each worker; a pod slice needs a shared '
          'gs:// workdir for checkpoints', file=sys.stderr)
  main = ['.venv/bin/python', '-m', 'prime_jax.main', '--config', args.config,
          '--workdir', args.workdir, *extra]
  remote = (
    f'cd {REMOTE_DIR} && '
    f'if [ -f {PID_FILE} ] && kill -0 "$(cat {PID_FILE})" 2>/dev/null; then '
    f'echo "prime_jax already running (pid $(cat {PID_FILE})); use the stop subcommand" >&2; '
    'exit 1; fi && '
    f'(PRIME_JAX_DISTRIBUTED=1 nohup {shlex.join(main)} > {LOG_FILE} 2>&1 < /dev/null '
    f'& echo $! > {PID_FILE})')
  return [_ssh(args, 'all', remote)]


def logs_commands(args, extra: list[str]) -> list[list[str]]:
  del extra
  follow = ' -F' if args.follow else ''
  return [_ssh(args, str(args.worker), f'tail -n {args.lines}{follow} {REMOTE_DIR}/{LOG_FILE}')]


def stop_commands(args, extra: list[str]) -> list[list[str]]:
  del extra
  remote = (f'cd {REMOTE_DIR} && if [ -f {PID_FILE} ]; then '
            f'kill "$(cat {PID_FILE})" 2>/dev/null || true; rm -f {PID_FILE}; fi')
  return [_ssh(args, 'all', remote)]


def delete_commands(args, extra: list[str]) -> list[list[str]]:
  quiet = ['--quiet'] if args.yes else []
  if args.queued:
    # --force also deletes the TPU node the queued resource holds.
    cmd = ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', args.name, *_scope(args),
           '--force']
  else:
    cmd = _tpu_vm(args, 'delete')
  return [cmd + quiet + extra]


COMMANDS = {
  'create': create_commands,
  'setup': setup_commands,
  'run': run_commands,
  'logs': logs_commands,
  'stop': stop_commands,
  'delete': delete_commands,
}


def build_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--name', required=True, help='TPU VM (node) name')
  common.add_argument('--zone', required=True, help='e.g. us-central2-b')
  common.add_argument('--project', help='GCP project (default: gcloud config)')
  common.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')

  parser = argparse.ArgumentParser(
    prog='launch/tpu.py', description=__doc__.split('\n\n')[0],
    epilog='Arguments after `--` go to gcloud (create, delete) or prime_jax.main (run).')
  sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

  p = sub.add_parser('create', parents=[common], help='create a TPU VM or queued resource')
  p.add_argument('--accelerator-type', required=True, help='e.g. v4-32, v5litepod-64')
  p.add_argument('--version', help='runtime version (default: by TPU generation)')
  p.add_argument('--queued', action='store_true', help='request through queued resources')
  tier = p.add_mutually_exclusive_group()
  tier.add_argument('--spot', action='store_true', help='spot (preemptible) capacity')
  tier.add_argument('--reserved', action='store_true', help='use the project reservation')

  p = sub.add_parser('setup', parents=[common], help='copy the repo and build .venv on all workers')
  p.add_argument('--stage-dir', help='local staging folder (default: a temp folder)')

  p = sub.add_parser('run', parents=[common], help='start training on all workers (nohup)')
  p.add_argument('--config', required=True, help='e.g. configs/owt.py:ell=4')
  p.add_argument('--workdir', required=True, help='shared workdir, e.g. gs://bucket/run')

  p = sub.add_parser('logs', parents=[common], help="tail a worker's log (worker 0 by default)")
  p.add_argument('--lines', type=int, default=100)
  p.add_argument('--follow', action='store_true', help='keep following the log')
  p.add_argument('--worker', type=int, default=0)

  sub.add_parser('stop', parents=[common], help='stop the run on all workers')

  p = sub.add_parser('delete', parents=[common], help='delete the TPU VM or queued resource')
  p.add_argument('--queued', action='store_true', help='delete the queued resource and its node')
  p.add_argument('--yes', action='store_true', help='do not ask for confirmation')

  p = sub.add_parser('stage', help='copy the repo files (git ls-files) into DEST; used by setup')
  p.add_argument('src', type=Path)
  p.add_argument('dest', type=Path)
  return parser


def split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
  """Everything after the first `--` is passed through untouched."""
  if '--' in argv:
    i = argv.index('--')
    return argv[:i], argv[i + 1:]
  return argv, []


def execute(commands: list[list[str]], dry_run: bool) -> int:
  """Prints (dry run) or runs the commands in order; returns the exit status."""
  if dry_run:
    for cmd in commands:
      print(shlex.join(cmd))
    return 0
  for i, cmd in enumerate(commands, 1):
    print(f'[{i}/{len(commands)}] {shlex.join(cmd)}', file=sys.stderr, flush=True)
    try:
      rc = subprocess.run(cmd, check=False).returncode
    except FileNotFoundError:
      print(f'error: {cmd[0]!r} was not found on PATH', file=sys.stderr)
      return 127
    if rc != 0:
      print(f'error: step {i}/{len(commands)} failed with exit status {rc}; stopping.\n'
            f'  {shlex.join(cmd)}', file=sys.stderr)
      return rc
  return 0


def main(argv: list[str] | None = None) -> int:
  own, extra = split_extra(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  args = parser.parse_args(own)
  if '--dry-run' in extra:
    # Passing it through would run the real commands: refuse rather than guess.
    parser.error('--dry-run must come before `--` (after it, it would be passed through)')
  if extra and args.command not in _EXTRA_USE:
    parser.error(f'{args.command} takes no arguments after `--` (only '
                 + ', '.join(f'{c}: {u}' for c, u in _EXTRA_USE.items()) + ')')
  if args.command == 'stage':
    return stage(args.src, args.dest)
  return execute(COMMANDS[args.command](args, extra), args.dry_run)


if __name__ == '__main__':
  sys.exit(main())
