"""MDM-Prime on CIFAR-10 at the paper's settings (method.md §8.2, 9.2, 11.3): the 114M-parameter
UNet.

  python -m prime_jax.main --config configs/cifar10.py --workdir workdir/cifar10
  python -m prime_jax.main --config configs/cifar10.py:ell=1 --workdir workdir/cifar10_mdm  # MDM
  python -m prime_jax.main --config configs/cifar10.py --mode bench

Data: TFDS 'cifar10' prepared as ArrayRecord once, on a machine with internet and TensorFlow:
  tfds build cifar10 --data_dir DIR --file_format=array_record
then add --config.data.data_dir=DIR. The test split (10k) is the validation set.

Arguments (comma-separated): ell (1, 2, 3, 4 or 8; default 2), objective (paper | nelbo; default
paper, the reference's unweighted cross-entropy).

Training as the reference (method.md §9.2): AdamW lr 1e-4 constant, betas (0.9, 0.95), weight decay
0.01,
no clipping, EMA 0.999, global batch 512, alpha = t'**3, random horizontal flips, for the paper's
early-stopped epoch count of each ell. The reference trains in float32; on TPU/GPU
--config.model.dtype=bfloat16 runs the convolutions in bf16 with float32 parameters. The sampler
block holds the paper's best 512-NFE sampler row for the chosen ell (method.md §11.3).
"""

import math

from configs import base

# ell -> epochs at the best relative FID (method.md §9.2).
EPOCHS = {1: 2500, 2: 4250, 3: 3500, 4: 2500, 8: 1500}
TRAIN_IMAGES = 50_000
# ell -> 512-NFE row of the README table (method.md §11.3):
#   (temperature [a, b', c], corrector [c0, c1, c2], timestep [a, b', c], carry_over).
SAMPLER_512 = {
    1: ((-0.15, 1.0, 1.0), (12.0, 2.0, 0.75), (1.0, 0.0, 0.0), True),  # FID 4.66
    2: ((-0.2, 2.0, 1.0), (16.0, 2.0, 0.75), (1.0, 1.7, 0.0), True),  # FID 3.26, the best
    3: ((-0.1, 3.5, 1.0), (18.0, 1.0, 0.75), (1.0, 1.1, 0.0), False),  # FID 4.81
    4: ((-0.2, 3.0, 1.0), (16.0, 1.0, 1.0), (1.0, 0.0, 0.0), False),  # FID 5.04
    8: ((-0.15, 3.0, 1.0), (20.0, 0.5, 0.75), (1.0, 0.0, 0.0), True),  # FID 7.31
}


def paper_image_config(arg: str, *, source: str, epochs: dict, train_images: int,
                       sampler_512: dict):
  """The reference image recipe on `source`, unlocked (imagenet32.py reuses it)."""
  c = base.get_config()
  kv = base.parse_arg(arg, ell=2, objective='paper')
  ell = kv['ell']
  if ell not in epochs:
    raise ValueError(f'ell={ell} has no paper run on {source}; choose one of {sorted(epochs)}.')
  c.diffusion.vocab_size = 256
  c.diffusion.ell = ell
  c.diffusion.objective = kv['objective']  # unweighted CE over all tokens (method.md §4.1)
  c.diffusion.schedule = 'poly'  # alpha = (1 - t)**3 is the reference's t'**3 (method.md §2.2)
  c.diffusion.schedule_n = 3.0
  c.diffusion.antithetic = False  # the reference draws t ~ U(0, 1) independently per image
  c.diffusion.carry_over = False  # the reference image model is not carry-over filtered
  c.model.name = 'unet'  # base.py's model.unet defaults are the paper's model (method.md §8.2)
  c.model.dropout = 0.4
  c.data.source = source
  c.data.seq_len = 32 * 32 * 3  # informational: the token grid is (32, 32, 3)
  c.data.batch_size = 512
  c.data.random_flip = True
  c.optim.lr = 1e-4
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.95, 1e-8
  c.optim.weight_decay = 0.01  # PyTorch AdamW's default, which the reference leaves in place
  c.optim.warmup_steps = 0
  c.optim.schedule = 'constant'
  c.optim.grad_clip = 0.0
  c.optim.ema_decay = 0.999
  c.train.num_steps = math.ceil(epochs[ell] * train_images / c.data.batch_size)
  c.train.log_every = 100
  c.train.eval_every = 10_000
  c.train.ckpt_every = 5_000
  c.eval.num_batches = 0  # the whole validation split
  temperature, corrector, timestep, carry_over = sampler_512[ell]
  c.sampler.num_steps = 512
  c.sampler.temperature = temperature
  c.sampler.corrector = corrector
  c.sampler.timestep = timestep
  c.sampler.carry_over = carry_over
  c.sampler.use_corrector = True
  c.sampler.use_timestep_scheduler = timestep[1] != 0.0  # [1, 0, 0] is the reference's "off"
  return c


def get_config(arg: str = ''):
  c = paper_image_config(arg, source='cifar10', epochs=EPOCHS, train_images=TRAIN_IMAGES,
                         sampler_512=SAMPLER_512)
  c.lock()
  return c
