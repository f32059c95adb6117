"""Launch scripts: dry runs print the exact commands, real runs execute those same commands.

Fake `gcloud`/`sbatch` executables early on PATH record their argv, so nothing here reaches a cloud
or a cluster, and an empty record after a dry run proves nothing was executed.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
TPU = REPO / 'launch' / 'tpu.py'
GPU = REPO / 'launch' / 'gpu.py'
SCOPE = ['--name', 'my-tpu', '--zone', 'us-central2-b']
SPACED = '--config.data.name=my data'  # one argument that must survive quoting intact

_RECORDER = """#!{python}
import json, os, sys
with open(os.environ['FAKE_LOG'], 'a') as f:
  f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + '\\n')
sys.exit(int(os.environ.get('FAKE_RC', '0')))
"""


def _write_recorder(path: Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(_RECORDER.format(python=sys.executable))
  path.chmod(0o755)


@pytest.fixture
def fake(tmp_path):
  """PATH with recording gcloud and sbatch first; .calls() returns every recorded argv."""
  for name in ('gcloud', 'sbatch'):
    _write_recorder(tmp_path / 'bin' / name)
  log = tmp_path / 'calls.jsonl'
  env = dict(os.environ, PATH=f'{tmp_path / "bin"}{os.pathsep}{os.environ["PATH"]}',
             FAKE_LOG=str(log))

  def calls():
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

  return SimpleNamespace(env=env, log=log, calls=calls, tmp=tmp_path)


def _launch(script: Path, *args: str, env: dict, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True,
                        text=True, timeout=120, **kwargs)


def _dry(fake, *args: str) -> list[list[str]]:
  """Runs a tpu.py dry run, checks it executed nothing, returns the printed commands."""
  args = list(args)
  at = args.index('--') if '--' in args else len(args)
  out = _launch(TPU, *args[:at], '--dry-run', *args[at:], env=fake.env)
  assert out.returncode == 0, out.stderr
  assert not fake.log.exists(), 'a dry run executed something'
  return [shlex.split(line) for line in out.stdout.splitlines()]


def _remote(cmd: list[str]) -> str:
  return cmd[cmd.index('--command') + 1]


def _bash_syntax_ok(script: str) -> None:
  if shutil.which('bash'):
    subprocess.run(['bash', '-n'], input=script, text=True, check=True)


# ---- tpu.py: the commands each dry run prints --------------------------------------------------


@pytest.mark.parametrize('accel, version', [('v5litepod-64', 'v2-alpha-tpuv5-lite'),
                                            ('v4-32', 'tpu-ubuntu2204-base'),
                                            ('v6e-16', 'v2-alpha-tpuv6e')])
def test_create_tpu_vm(fake, accel, version):
  [cmd] = _dry(fake, 'create', *SCOPE, '--accelerator-type', accel, '--project', 'proj')
  assert cmd == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'my-tpu', '--zone=us-central2-b',
                 '--project=proj', f'--accelerator-type={accel}', f'--version={version}']


def test_create_queued_spot_and_reserved(fake):
  [cmd] = _dry(fake, 'create', *SCOPE, '--accelerator-type', 'v4-32', '--version', 'my-runtime',
               '--queued', '--spot', '--', '--network=net')
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'my-tpu']
  for flag in ('--node-id=my-tpu', '--accelerator-type=v4-32', '--runtime-version=my-runtime',
               '--spot', '--network=net'):
    assert flag in cmd
  [cmd] = _dry(fake, 'create', *SCOPE, '--accelerator-type', 'v4-32', '--reserved')
  assert '--reserved' in cmd and '--spot' not in cmd
  both = _launch(TPU, 'create', *SCOPE, '--accelerator-type', 'v4-32', '--spot', '--reserved',
                 '--dry-run', env=fake.env)
  assert both.returncode != 0 and 'not allowed with' in both.stderr


def test_setup_copies_to_all_workers_and_provisions_python_311(fake):
  stage, scp, ssh = _dry(fake, 'setup', *SCOPE)
  assert stage[:3] == [sys.executable, str(TPU), 'stage'] and stage[3] == str(REPO)
  assert Path(stage[4]).name == 'prime_jax'
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert '--recurse' in scp and '--worker=all' in scp and scp[-2:] == [stage[4], 'my-tpu:~/']
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu']
  assert '--worker=all' in ssh
  remote = _remote(ssh)
  for step in ('cd prime_jax', 'uv python install 3.11', 'venv --seed --python 3.11 .venv',
               "'jax[tpu]==0.10.2'", '-r requirements.txt'):
    assert step in remote
  _bash_syntax_ok(remote)


def test_run_on_all_workers_passes_config_workdir_and_extra_args(fake):
  [ssh] = _dry(fake, 'run', *SCOPE, '--config', 'configs/owt.py:ell=4', '--workdir', 'gs://b/r',
               '--', SPACED, '--mode=train')
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu']
  assert '--worker=all' in ssh
  remote = _remote(ssh)
  assert remote.startswith('cd prime_jax && ')
  main = ['.venv/bin/python', '-m', 'prime_jax.main', '--config', 'configs/owt.py:ell=4',
          '--workdir', 'gs://b/r', SPACED, '--mode=train']
  assert f'nohup {shlex.join(main)} > run.log 2>&1' in remote
  _bash_syntax_ok(remote)


def test_run_remote_command_really_launches_in_background(fake):
  """Executes the remote command in a fake home: argv arrives intact, a second run is refused."""
  [ssh] = _dry(fake, 'run', *SCOPE, '--config', 'configs/owt.py:ell=4', '--workdir', 'gs://b/r',
               '--', SPACED)
  home = fake.tmp / 'home'
  _write_recorder(home / 'prime_jax' / '.venv' / 'bin' / 'python')
  subprocess.run(['bash', '-c', _remote(ssh)], cwd=home, env=fake.env, check=True, timeout=30)
  deadline = time.time() + 30
  while not fake.calls() and time.time() < deadline:
    time.sleep(0.05)
  assert fake.calls() == [['python', '-m', 'prime_jax.main', '--config', 'configs/owt.py:ell=4',
                           '--workdir', 'gs://b/r', SPACED]]
  assert (home / 'prime_jax' / 'run.pid').read_text().strip().isdigit()
  (home / 'prime_jax' / 'run.pid').write_text(str(os.getpid()))  # pretend a run is alive
  again = subprocess.run(['bash', '-c', _remote(ssh)], cwd=home, env=fake.env,
                         capture_output=True, text=True, timeout=30)
  assert again.returncode == 1 and 'already running' in again.stderr


def test_logs_stop_delete(fake):
  [logs] = _dry(fake, 'logs', *SCOPE, '--follow')
  assert '--worker=0' in logs and _remote(logs) == 'tail -n 100 -F prime_jax/run.log'
  [stop] = _dry(fake, 'stop', *SCOPE)
  assert '--worker=all' in stop and 'kill' in _remote(stop)
  _bash_syntax_ok(_remote(stop))
  [delete] = _dry(fake, 'delete', *SCOPE, '--yes')
  assert delete == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'my-tpu',
                    '--zone=us-central2-b', '--quiet']
  [delete] = _dry(fake, 'delete', *SCOPE, '--queued')
  assert delete[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'my-tpu']
  assert '--force' in delete


# ---- tpu.py: argument errors -------------------------------------------------------------------


@pytest.mark.parametrize('args, flag', [
  (['run', *SCOPE, '--config', 'configs/owt.py'], '--workdir'),
  (['run', *SCOPE, '--workdir', 'gs://b/r'], '--config'),
  (['create', *SCOPE], '--accelerator-type'),
  (['setup', '--zone', 'z'], '--name'),
  (['delete', '--name', 'n'], '--zone'),
])
def test_missing_required_argument_is_named(fake, args, flag):
  out = _launch(TPU, *args, '--dry-run', env=fake.env)
  assert out.returncode != 0 and flag in out.stderr and 'required' in out.stderr
  assert not fake.log.exists()


def test_misplaced_or_unused_extra_args_are_refused(fake):
  late = _launch(TPU, 'run', *SCOPE, '--config', 'c', '--workdir', 'gs://b', '--', '--dry-run',
                 env=fake.env)
  assert late.returncode != 0 and '--dry-run must come before' in late.stderr
  unused = _launch(TPU, 'setup', *SCOPE, '--dry-run', '--', '--x', env=fake.env)
  assert unused.returncode != 0 and 'setup takes no arguments after' in unused.stderr
  assert not fake.log.exists()


# ---- tpu.py: without --dry-run the same commands run --------------------------------------------


@pytest.mark.parametrize('args', [
  ['create', *SCOPE, '--accelerator-type', 'v5litepod-64', '--queued', '--spot'],
  ['run', *SCOPE, '--config', 'configs/owt.py:ell=4', '--workdir', 'gs://b/r', '--', SPACED],
  ['logs', *SCOPE],
  ['stop', *SCOPE],
  ['delete', *SCOPE, '--yes'],
])
def test_real_run_executes_the_printed_commands(fake, args):
  printed = _dry(fake, *args)
  out = _launch(TPU, *args, env=fake.env)
  assert out.returncode == 0, out.stderr
  assert fake.calls() == printed


def test_real_setup_stages_a_clean_copy_then_copies_and_installs(fake):
  args = ['setup', *SCOPE, '--stage-dir', str(fake.tmp / 'stage')]
  printed = _dry(fake, *args)
  out = _launch(TPU, *args, env=fake.env)
  assert out.returncode == 0, out.stderr
  assert fake.calls() == printed[1:]  # the stage step is Python itself, the rest is gcloud
  staged = fake.tmp / 'stage' / 'prime_jax'
  assert (staged / 'launch' / 'tpu.py').is_file() and (staged / 'requirements.txt').is_file()
  assert not (staged / '.venv').exists() and not (staged / '.git').exists()
  again = _launch(TPU, *args, env=fake.env)  # a second setup replaces its own stage
  assert again.returncode == 0, again.stderr


def test_stage_refuses_to_replace_a_folder_it_did_not_make(fake):
  (fake.tmp / 'mine').mkdir()
  (fake.tmp / 'mine' / 'keep.txt').write_text('x')
  out = _launch(TPU, 'stage', str(REPO), str(fake.tmp / 'mine'), env=fake.env)
  assert out.returncode != 0 and 'refusing' in out.stderr
  assert (fake.tmp / 'mine' / 'keep.txt').exists()


def test_first_failure_stops_with_a_clear_message(fake):
  env = dict(fake.env, FAKE_RC='3')
  out = _launch(TPU, 'setup', *SCOPE, '--stage-dir', str(fake.tmp / 'stage'), env=env)
  assert out.returncode == 3
  assert 'step 2/3 failed with exit status 3' in out.stderr
  assert [c[4] for c in fake.calls()] == ['scp']  # ssh never ran


def test_missing_gcloud_is_reported(fake):
  empty = fake.tmp / 'empty'
  empty.mkdir()
  out = _launch(TPU, 'delete', *SCOPE, env=dict(fake.env, PATH=str(empty)))
  assert out.returncode == 127 and "'gcloud' was not found" in out.stderr


# ---- gpu.py -----------------------------------------------------------------------------------


def _gpu_args(fake, *more: str) -> list[str]:
  return ['--nodes', '2', '--gpus-per-node', '4', '--partition', 'gpu', '--time', '02:00:00',
          '--account', 'acct', '--config', 'configs/owt.py:ell=4',
          '--workdir', str(fake.tmp / 'run'), '--venv', '/opt/venv', *more]


def test_gpu_dry_run_prints_script_and_sbatch_and_writes_nothing(fake):
  out = _launch(GPU, *_gpu_args(fake, '--submit', '--dry-run', '--', SPACED), env=fake.env)
  assert out.returncode == 0, out.stderr
  *script, sbatch = out.stdout.splitlines()
  script_path = fake.tmp / 'run' / 'slurm' / 'prime_jax.sbatch'
  assert shlex.split(sbatch) == ['sbatch', str(script_path)]
  for line in ('#SBATCH --nodes=2', '#SBATCH --ntasks-per-node=4', '#SBATCH --gpus-per-node=4',
               '#SBATCH --partition=gpu', '#SBATCH --time=02:00:00', '#SBATCH --account=acct'):
    assert line in script
  [srun] = [line for line in script if line.startswith('srun ')]
  assert shlex.split(srun) == ['srun', '--kill-on-bad-exit=1', '/opt/venv/bin/python', '-m',
                               'prime_jax.main', '--config', 'configs/owt.py:ell=4',
                               '--workdir', str(fake.tmp / 'run'), SPACED]
  _bash_syntax_ok('\n'.join(script))
  assert not script_path.exists() and not (fake.tmp / 'run').exists()
  assert not fake.log.exists()


def test_gpu_writes_then_submits_the_same_script(fake):
  dry = _launch(GPU, *_gpu_args(fake, '--dry-run', '--', SPACED), env=fake.env).stdout
  script_path = fake.tmp / 'run' / 'slurm' / 'prime_jax.sbatch'
  out = _launch(GPU, *_gpu_args(fake, '--', SPACED), env=fake.env)  # write only
  assert out.returncode == 0, out.stderr
  assert script_path.read_text() == dry.rsplit('sbatch ', 1)[0]
  assert not fake.log.exists()
  out = _launch(GPU, *_gpu_args(fake, '--submit', '--', SPACED), env=fake.env)
  assert out.returncode == 0, out.stderr
  assert fake.calls() == [['sbatch', str(script_path)]]
  failing = _launch(GPU, *_gpu_args(fake, '--submit'), env=dict(fake.env, FAKE_RC='1'))
  assert failing.returncode == 1 and 'sbatch failed' in failing.stderr


@pytest.mark.parametrize('drop, flag', [('--config', '--config'), ('--workdir', '--workdir')])
def test_gpu_missing_required_argument_is_named(fake, drop, flag):
  args = _gpu_args(fake, '--dry-run')
  i = args.index(drop)
  out = _launch(GPU, *args[:i], *args[i + 2:], env=fake.env)
  assert out.returncode != 0 and flag in out.stderr and 'required' in out.stderr


def test_gpu_rejects_impossible_sizes(fake):
  out = _launch(GPU, *_gpu_args(fake, '--dry-run'), '--nodes', '0', env=fake.env)
  assert out.returncode != 0 and '--nodes must be at least 1' in out.stderr
