"""Base config: every dataset config starts from this one and changes only what differs.

Nested by concern: model, diffusion, data, optim, train, eval, mesh. `get_config()` returns an
unlocked ConfigDict; dataset configs lock theirs before returning it.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 1

  c.model = ml_collections.ConfigDict()
  c.model.dim = 768
  c.model.num_heads = 12
  c.model.num_layers = 12
  c.model.cond_dim = 128
  c.model.mlp_ratio = 4
  c.model.dropout = 0.1
  c.model.time_conditioning = False  # the reference forces sigma = 0 (SPEC 2.1)
  c.model.scan_layers = False
  c.model.remat = False
  c.model.dtype = 'float32'  # compute dtype; parameters stay float32 ('bfloat16' on TPU/GPU)

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.vocab_size = 50257  # GPT-2 BPE
  c.diffusion.ell = 2  # sub-tokens per token; 1 is MDLM
  c.diffusion.shuffle_seed = -1  # >= 0: MDM-Prime-v2 index shuffling with this seed
  c.diffusion.schedule = 'loglinear'
  c.diffusion.schedule_eps = 1e-3
  c.diffusion.sampling_eps = 1e-3  # t ~ U[eps, 1)
  c.diffusion.antithetic = True
  c.diffusion.carry_over = True
  c.diffusion.objective = 'nelbo'  # nelbo (valid bound) | paper (the authors' token-joint loss)

  c.data = ml_collections.ConfigDict()
  c.data.source = 'sotu'  # sotu | owt | lm1b
  c.data.data_dir = ''
  c.data.seq_len = 1024
  c.data.batch_size = 512  # global, in sequences
  c.data.worker_count = 0

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.warmup_steps = 2500
  c.optim.schedule = 'constant'  # constant | cosine (after warm-up)
  c.optim.final_lr_frac = 0.1  # cosine only
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.9999  # with the reference warm-up min(decay, (1+n)/(10+n))

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1_000_000
  c.train.log_every = 100
  c.train.eval_every = 10_000
  c.train.ckpt_every = 5_000
  c.train.keep_ckpts = 3
  c.train.peak_flops = 0.0  # per device, for MFU; 0 = guess from the device kind

  c.eval = ml_collections.ConfigDict()
  c.eval.split = 'validation'
  c.eval.num_batches = 0  # 0 = the whole split
  c.eval.batch_size = 0  # 0 = data.batch_size
  c.eval.use_ema = True
  c.eval.seed = 0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  return c
