"""Entry point: python -m prime_jax.main --config configs/X.py --workdir DIR [--mode MODE].

Modes: train (resumes from WORKDIR), bench (synthetic batches: step time, tokens/s, MFU, memory).
eval and sample are dispatched here and land with the evaluation issue.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'ml_collections config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, logs and results go here.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'sample', 'bench'], 'What to run.')
_BENCH_STEPS = flags.DEFINE_integer('bench_steps', 5, 'Timed steps for --mode bench.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # keep Orbax/JAX INFO chatter out of the progress lines
  cfg = _CONFIG.value
  if _MODE.value == 'bench':
    from prime_jax import bench
    bench.run(cfg, steps=_BENCH_STEPS.value)
    return
  if _WORKDIR.value is None:
    raise app.UsageError('--workdir is required for --mode ' + _MODE.value)
  if _MODE.value == 'train':
    from prime_jax import train
    summary = train.train_and_evaluate(cfg, _WORKDIR.value)
    from prime_jax import report
    report.print_summary(cfg, _WORKDIR.value, summary)
  else:
    raise app.UsageError(f'--mode {_MODE.value} is not available yet: it arrives with the '
                         'evaluation issue (valid-bound PPL, sampling). Use --mode train or bench.')


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
