"""Entry point: python -m prime_jax.main --config configs/X.py --workdir DIR [--mode M] [--step N].

Modes: train (resumes from WORKDIR), eval (valid-bound likelihood of a checkpoint on the validation
split and the zero-shot sets of eval.sets), sample (text samples, NFE / idle steps, optional
generative perplexity), fid (image samples with the paper's sampler, FID against the training set,
a PNG grid), bench (synthetic batches: step time, tokens/s, MFU, memory), compile (the train, eval
and sampler steps compiled ahead of time for a TPU topology, --topology v5p-128: memory per chip and
XLA's estimates; needs libtpu, `make tpu-tools`).

Every other setting is a config field, overridden as --config.section.field=value (configs/base.py
declares them all). eval, sample and fid read WORKDIR/config.json (the run's own config) when
--config is not given.

A mistake of the user (a missing file, an unknown config field, an impossible setting) prints one
line, `error: ...`, and exits with status 2; a bug keeps its traceback (PRIME_JAX_TRACEBACK=1 shows
the traceback of a user error too).
"""

import difflib
import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'ml_collections config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, logs and results go here.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'sample', 'fid', 'bench', 'compile'],
                          'What to run.')
_STEP = flags.DEFINE_integer('step', None, 'eval / sample / fid: the checkpoint step (default: the '
                             'latest).')

_TOPOLOGY = flags.DEFINE_string('topology', None, 'compile: a Cloud TPU accelerator type (v5p-128, '
                                'v5e-256, v6e-64, v4-128) or chip grid (v5p:4x4x4).')
_NUM_SLICES = flags.DEFINE_integer('num_slices', 1, 'compile: slices joined over the data-center '
                                   'network (multislice); the mesh\'s data axis spans them.')

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)


class UsageError(Exception):
  """A mistake in how the command was called; its message says what to change."""


def run(cfg, mode: str, workdir: str, step=None, topology=None, num_slices=1):
  from prime_jax import build  # pylint: disable=import-outside-toplevel
  if mode == 'compile':
    if not topology:
      raise UsageError('--mode compile needs --topology (e.g. --topology v5p-128).')
    from prime_jax import compile as compile_lib  # pylint: disable=import-outside-toplevel
    try:
      return compile_lib.run(cfg, topology, num_slices, workdir)
    except compile_lib.Unfit as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(3)
  exp = build.experiment(cfg)  # a config that cannot run stops here, before anything starts
  if mode == 'train':
    from prime_jax import report, train  # pylint: disable=import-outside-toplevel
    summary = train.train_and_evaluate(cfg, workdir)
    baseline, error = None, None
    if not exp.task.image and not exp.task.autoregressive:
      try:
        baseline = exp.data.unigram_baseline_nll()
      except Exception as e:  # pylint: disable=broad-except  # informative, never fatal
        error = str(e)
    report.print_summary(workdir, summary, source=exp.data.source, ell=exp.codec.ell,
                         unigram_nll=baseline, unigram_error=error)
    return summary
  if mode == 'bench':
    from prime_jax import bench  # pylint: disable=import-outside-toplevel
    return bench.run(exp)
  if mode == 'eval':
    from prime_jax import evaluate  # pylint: disable=import-outside-toplevel
    return evaluate.run_eval(exp, workdir, step=step)
  if mode == 'sample':
    from prime_jax import sample  # pylint: disable=import-outside-toplevel
    return sample.run_sample(exp, workdir, step=step)
  from prime_jax import fid  # pylint: disable=import-outside-toplevel
  return fid.run_fid(exp, workdir, step=step)


def _is_user_error(e: BaseException) -> bool:
  """Raised on purpose by our code (its innermost frame is in prime_jax/ or configs/) with a type
  that means bad input, rather than by a library deep inside a computation (a bug)."""
  if isinstance(e, UsageError):
    return True
  if not isinstance(e, _USER_ERRORS):
    return False
  frames = traceback.extract_tb(e.__traceback__)
  if not frames:
    return False
  inner = os.path.abspath(frames[-1].filename)
  return any(inner.startswith(os.path.join(_ROOT, d) + os.sep) for d in ('prime_jax', 'configs'))


def _config_spec(argv) -> str:
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      return a.split('=', 1)[1]
    if a == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return ''


def _diagnose_overrides(argv) -> str:
  """The first --config.a.b=v naming a field the config does not have, with the closest names."""
  spec = _config_spec(argv)
  if not spec:
    return ''
  from prime_jax import build  # pylint: disable=import-outside-toplevel
  try:
    cfg = build.load_config(spec)
  except Exception:  # pylint: disable=broad-except  # the parser's own message is shown instead
    return ''
  for a in argv:
    if not a.startswith('--config.'):
      continue
    path = a[len('--config.'):].split('=', 1)[0].split('.')
    node, walked = cfg, []
    for part in path:
      keys = list(node.keys()) if hasattr(node, 'keys') else []
      if part not in keys:
        where = '.'.join(walked) or 'the config'
        close = difflib.get_close_matches(part, keys, n=3, cutoff=0.5)
        hint = f'; did you mean {", ".join(".".join(walked + [c]) for c in close)}?' if close else (
            f'; it has {", ".join(sorted(keys))}' if keys else '')
        return (f'unknown config field {".".join(path)!r}: {where} has no field {part!r}{hint} '
                '(configs/base.py declares every field).')
      node, walked = node[part], walked + [part]
  return ''


def parse_flags(argv):
  """absl's flag parsing with one-line messages for the mistakes users make."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # A config file that raised while building its config: absl embeds the traceback; its last
    # line is the message.
    lines = [line for line in str(e).splitlines() if line.strip()]
    message = _diagnose_overrides(argv) or (lines[-1] if 'Traceback' in str(e) else lines[0])
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    print(f'error: {_diagnose_overrides(argv) or e}', file=sys.stderr)
    sys.exit(2)


def _config_or_workdir(mode: str, workdir, argv):
  try:
    cfg = _CONFIG.value
    if cfg is not None:
      cfg.keys()  # the file is read on first use: here
  except OSError:
    raise UsageError(f'cannot read the config file {_config_spec(argv).split(":")[0]!r}; pass an '
                     'existing one, e.g. --config configs/sotu.py.') from None
  if cfg is not None:
    return cfg
  if mode in ('eval', 'sample', 'fid') and workdir:
    from etils import epath  # pylint: disable=import-outside-toplevel
    path = str(epath.Path(workdir) / 'config.json')  # local or gs://
    if not epath.Path(path).exists():
      raise UsageError(f'--config is not given and {path} does not exist: pass the config the run '
                       'was trained with (--config configs/x.py), or the --workdir of a run.')
    from prime_jax import build  # pylint: disable=import-outside-toplevel
    return build.load_config(path)
  raise UsageError(f'--mode {mode} needs --config (e.g. --config configs/sotu.py).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # keep Orbax/JAX INFO chatter out of the progress lines
  from prime_jax import sharding  # pylint: disable=import-outside-toplevel
  sharding.maybe_initialize_distributed()  # before anything touches a device
  try:
    if _WORKDIR.value is None and _MODE.value not in ('bench', 'compile'):
      raise UsageError('--workdir is required for --mode ' + _MODE.value)
    cfg = _config_or_workdir(_MODE.value, _WORKDIR.value, sys.argv)
    run(cfg, _MODE.value, _WORKDIR.value, _STEP.value, _TOPOLOGY.value, _NUM_SLICES.value)
  except Exception as e:  # pylint: disable=broad-except
    if not _is_user_error(e) or os.environ.get('PRIME_JAX_TRACEBACK'):
      raise
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
