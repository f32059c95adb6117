"""Entry point: python -m prime_jax.main --config configs/X.py --workdir DIR [--mode M] [--step N].

Modes: train (resumes from WORKDIR), eval (valid-bound likelihood of a checkpoint on the validation
split and the zero-shot sets of eval.sets), sample (text samples, NFE / idle steps, optional
generative perplexity), fid (image samples with the paper's sampler, FID against the training set,
a PNG grid), bench (synthetic batches: step time, tokens/s, MFU, memory).

Every other setting is a config field, overridden as --config.section.field=value (configs/base.py
declares them all).
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'ml_collections config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, logs and results go here.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'sample', 'fid', 'bench'],
                          'What to run.')
_STEP = flags.DEFINE_integer('step', None, 'eval / sample / fid: the checkpoint step (default: the '
                             'latest).')


def run(cfg, mode: str, workdir: str, step=None):
  from prime_jax import build  # pylint: disable=import-outside-toplevel
  exp = build.experiment(cfg)  # a config that cannot run stops here, before anything starts
  if mode == 'train':
    from prime_jax import report, train  # pylint: disable=import-outside-toplevel
    summary = train.train_and_evaluate(cfg, workdir)
    baseline, error = None, None
    if not exp.task.image:
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # keep Orbax/JAX INFO chatter out of the progress lines
  if _WORKDIR.value is None and _MODE.value != 'bench':
    raise app.UsageError('--workdir is required for --mode ' + _MODE.value)
  run(_CONFIG.value, _MODE.value, _WORKDIR.value, _STEP.value)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
