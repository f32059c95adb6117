"""LM1B through tfds (prepared with `tfds build lm1b` on a machine with internet), GPT-2 tokenized.

  python -m prime_jax.main --config configs/lm1b.py:ell=2 --workdir workdir/lm1b \
      --config.data.data_dir=~/tensorflow_datasets
"""

from configs import base


def get_config(arg: str = ''):
  c = base.get_config()
  kv = base.parse_arg(arg, ell=2, objective='nelbo')
  c.diffusion.ell = kv['ell']
  c.diffusion.objective = kv['objective']
  c.model.dtype = 'bfloat16'
  c.data.source = 'lm1b'
  c.data.seq_len = 128
  c.data.batch_size = 512
  c.train.eval_every = 5000
  c.lock()
  return c
