"""The embedded default: MDM-Prime on the State of the Union corpus, on a 2-core CPU in ~12 minutes.

  python -m prime_jax.main --config configs/sotu.py --workdir workdir/sotu
  python -m prime_jax.main --config configs/sotu.py:ell=1 --workdir workdir/sotu_l1   # MDLM
"""

from configs import base


def get_config(arg: str = ''):
  c = base.get_config()
  kv = dict(p.split('=') for p in arg.split(',') if p)
  c.diffusion.ell = int(kv.get('ell', 2))
  # Trained on the authors' objective (one exp pass cheaper than the bound on a CPU); every
  # likelihood printed is the valid bound.
  c.diffusion.objective = kv.get('objective', 'paper')
  c.model.dim = 128
  c.model.num_heads = 4
  c.model.num_layers = 4
  c.model.dropout = 0.0
  c.model.head_bias_init = 'unigram'
  c.data.source = 'sotu'
  c.data.seq_len = 64
  c.data.batch_size = 32
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 50
  c.optim.schedule = 'cosine'
  c.optim.ema_decay = 0.99
  c.train.num_steps = 500
  c.train.log_every = 25
  c.train.eval_every = 250
  c.train.ckpt_every = 100
  c.eval.num_batches = 0  # the whole validation split (2,687 sequences), as the unigram baseline
  c.eval.batch_size = 64
  c.lock()
  return c
