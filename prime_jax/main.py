"""Entry point: python -m prime_jax.main --config configs/X.py --workdir DIR [--mode MODE].

Modes: train (resumes from WORKDIR), eval (valid-bound PPL of a checkpoint on the validation split
and zero-shot sets), sample (text samples, NFE / idle steps, optional generative perplexity), fid (image samples
with the paper's sampler, FID against the training set, a PNG grid),
bench (synthetic batches: step time, tokens/s, MFU, memory).
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'ml_collections config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, logs and results go here.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'sample', 'fid', 'bench'],
                          'What to run.')
_BENCH_STEPS = flags.DEFINE_integer('bench_steps', 5, 'Timed steps for --mode bench.')
# --mode eval / sample
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the latest).')
_RAW = flags.DEFINE_bool('raw_weights', False, 'Use the raw parameters instead of the EMA (as '
                         '--config.eval.use_ema=False does).')
_SETS = flags.DEFINE_list('eval_sets', [], 'Extra sets for --mode eval, e.g. moby_dick,wikitext2 '
                          '(SOURCE or SOURCE:SPLIT); local sets are read from --data_dir.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Folder of local zero-shot sets / TFDS data.')
_NUM_T = flags.DEFINE_integer('num_t', None, 'Stratified times per sequence (default eval.num_t).')
_T_GRID = flags.DEFINE_list('t_grid', [], '--mode eval (text): also the NELBO integrand at these '
                            'times, e.g. 0.02,0.1,0.5,0.9, beside the training unigram\'s.')
_NUM_BATCHES = flags.DEFINE_integer('num_batches', None,
                                    'Evaluation batches (default eval.num_batches; 0 = all).')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 16, 'Samples for --mode sample.')
_SAMPLE_BATCH = flags.DEFINE_integer('sample_batch', 8, 'Samples drawn together.')
_STEPS = flags.DEFINE_integer('steps', None, 'Reverse steps T (default: the sequence length).')
_NUCLEUS = flags.DEFINE_float('nucleus_p', 1.0, 'Top-p mass kept when sampling (1 = off).')
_PRECISION = flags.DEFINE_enum('precision', 'fp64', ['fp64', 'fp32', 'fp32_hires'],
                               'Token draws: fp64 inverse CDF, fp32 race, or fp32 64-bit race.')
_CACHE = flags.DEFINE_bool('cache', True, 'Skip the network in idle steps.')
_PREFIX = flags.DEFINE_integer('prefix_len', 0, 'Keep the first N positions (BOS included) of '
                               'validation sequences: prefix-conditional sampling.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_SCORER = flags.DEFINE_string('scorer', '', "Generative-perplexity scorer: 'smollm2' (offline) or "
                              "'gpt2' (with --scorer_path to a Hugging Face folder); '' = none.")
_SCORER_PATH = flags.DEFINE_string('scorer_path', None, 'Local weights folder for --scorer gpt2.')
# --mode fid (images)
_FID_REF = flags.DEFINE_integer('fid_ref_images', 0, 'Training images for the FID reference '
                                'statistics (0 = the whole training set; cached).')
_INPAINT = flags.DEFINE_bool('inpaint', False, '--mode fid: keep the left half of validation '
                             'images and generate the right half.')


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
  use_ema = bool(cfg.eval.get('use_ema', True)) and not _RAW.value
  if _MODE.value == 'train':
    from prime_jax import train
    summary = train.train_and_evaluate(cfg, _WORKDIR.value)
    from prime_jax import report
    report.print_summary(cfg, _WORKDIR.value, summary)
  elif _MODE.value == 'eval':
    from prime_jax import evaluate
    evaluate.run_eval(cfg, _WORKDIR.value, step=_STEP.value, sets=_SETS.value,
                      num_t=_NUM_T.value, num_batches=_NUM_BATCHES.value,
                      data_dir=_DATA_DIR.value, use_ema=use_ema,
                      t_grid=[float(t) for t in _T_GRID.value])
  elif _MODE.value == 'fid':
    from prime_jax import evaluate_images
    evaluate_images.run_fid(cfg, _WORKDIR.value, step=_STEP.value, num_samples=_NUM_SAMPLES.value,
                            batch_size=_SAMPLE_BATCH.value, num_steps=_STEPS.value,
                            ref_images=_FID_REF.value, seed=_SEED.value, inpaint=_INPAINT.value,
                            use_ema=use_ema)
  elif _MODE.value == 'sample':
    from prime_jax import evaluate
    evaluate.run_sample(cfg, _WORKDIR.value, step=_STEP.value, num_samples=_NUM_SAMPLES.value,
                        batch_size=_SAMPLE_BATCH.value, steps=_STEPS.value,
                        nucleus_p=_NUCLEUS.value, precision=_PRECISION.value, cache=_CACHE.value,
                        prefix_len=_PREFIX.value, seed=_SEED.value, scorer=_SCORER.value,
                        scorer_path=_SCORER_PATH.value, use_ema=use_ema)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
