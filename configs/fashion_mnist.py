"""MDM-Prime on Fashion-MNIST (28 x 28 gray, C = 256) with a small UNet: ~10 minutes on 2 CPU cores.

  python -m prime_jax.main --config configs/fashion_mnist.py --workdir workdir/fmnist
  python -m prime_jax.main --config configs/fashion_mnist.py:ell=1 --workdir workdir/fm_l1  # MDM
  python -m prime_jax.main --config configs/fashion_mnist.py --mode bench

Arguments (comma-separated): ell (1, 2, 4 or 8; default 2), objective (paper | nelbo; default
paper). The data is the offline asset (`python -m prime_jax.data.assets fetch fashion_mnist`); the
test split is the validation set. Every reported likelihood is the valid bound, in bits per pixel.
"""

from configs import base


def get_config(arg: str = ''):
  c = base.get_config()
  kv = base.parse_arg(arg, ell=2, objective='paper')
  c.diffusion.vocab_size = 256
  c.diffusion.ell = kv['ell']
  c.diffusion.objective = kv['objective']  # the reference's image loss (method.md §4.1)
  c.diffusion.schedule = 'poly'  # alpha = (1 - t)**3, the reference's t'**3 (method.md §2.2)
  c.diffusion.schedule_n = 3.0
  # The reference image model is not carry-over filtered (training loss and sampler alike).
  c.diffusion.carry_over = False
  c.model.name = 'unet'
  # 28 -> 14 (two levels), widths 32 / 64, attention at 14 x 14 and in the middle. The first width
  # (32) is split into ell sub-token vectors, so ell must divide 32.
  c.model.unet.model_channels = 32
  c.model.unet.channel_mult = (1, 2)
  c.model.unet.num_res_blocks = 2
  c.model.unet.attention_resolutions = (2,)
  c.model.unet.head_channels = 32
  c.model.unet.norm_groups = 16
  c.model.dropout = 0.0
  c.data.source = 'fashion_mnist'
  c.data.seq_len = 28 * 28  # informational: the token grid is (28, 28, 1)
  c.data.batch_size = 32
  c.optim.lr = 2e-3
  c.optim.b2 = 0.99
  c.optim.warmup_steps = 50
  c.optim.schedule = 'cosine'
  c.optim.ema_decay = 0.99
  c.train.num_steps = 500
  c.train.log_every = 25
  c.train.eval_every = 500
  c.train.ckpt_every = 250
  c.eval.num_batches = 8
  c.eval.batch_size = 64
  c.sampler.num_steps = 128
  c.sampler.carry_over = True
  c.lock()
  return c
