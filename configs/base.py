"""Base config: every dataset config starts from this one and changes only what differs.

Nested by concern: model, diffusion, data, optim, train, eval, mesh. `get_config()` returns an
unlocked ConfigDict; dataset configs lock theirs before returning it.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 1

  c.model = ml_collections.ConfigDict()
  c.model.name = 'dit'  # dit (text) | unet (images; data.source must be an image source)
  c.model.dim = 768
  c.model.num_heads = 12
  c.model.num_layers = 12
  c.model.cond_dim = 128
  c.model.mlp_ratio = 4
  c.model.dropout = 0.1
  c.model.time_conditioning = False  # the reference forces sigma = 0 (SPEC 2.1)
  c.model.scan_layers = False
  c.model.remat = False
  c.model.head_init_scale = 0.0  # head kernel ~ U(±s/sqrt(D)); 0 = zeros, as the reference
  c.model.adaln_init_scale = 0.0  # adaLN modulation ~ U(±s/sqrt(E)); 0 = zeros (identity blocks)
  c.model.head_tail_start = 0  # > 0: classes from this id on get a low-rank head (FinalLayer)
  c.model.head_tail_rank = 0  # the tail's rank R (0 with head_tail_start = 0: the full head)
  c.model.rope_base = 10000.0  # rotary frequencies base**(-2i/H), i < H/2; 10000 = the reference
  # > 0: add -m_n |i - j| to head n's attention logits, m_n = slope * 2**(-8n/N) (ALiBi's slopes
  # for slope = 2**(-8/N), made symmetric); 0 = none, the reference
  c.model.distance_bias_slope = 0.0
  c.model.head_bias_init = ''  # 'unigram': start the head at log p(token) of the training data
  c.model.dtype = 'float32'  # compute dtype; parameters stay float32 ('bfloat16' on TPU/GPU)
  # model.name = 'unet': the discrete UNet (SPEC 8.2); the defaults are the paper's CIFAR-10 model.
  # dropout, time_conditioning, remat and dtype above apply to it too.
  c.model.unet = ml_collections.ConfigDict()
  c.model.unet.model_channels = 96
  c.model.unet.channel_mult = (3, 4, 4)
  c.model.unet.num_res_blocks = 5
  c.model.unet.attention_resolutions = (2,)  # downsampling factors with self-attention
  c.model.unet.head_channels = 64
  c.model.unet.norm_groups = 32

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.vocab_size = 50257  # GPT-2 BPE
  c.diffusion.ell = 2  # sub-tokens per token; 1 is MDLM
  c.diffusion.shuffle_seed = -1  # >= 0: MDM-Prime-v2 index shuffling with this seed
  c.diffusion.schedule = 'loglinear'
  c.diffusion.schedule_eps = 1e-3
  c.diffusion.schedule_n = 3.0  # 'poly' only: alpha = (1 - t)**n (images: n = 3)
  c.diffusion.sampling_eps = 1e-3  # t ~ U[eps, 1)
  c.diffusion.antithetic = True
  c.diffusion.carry_over = True
  c.diffusion.objective = 'nelbo'  # nelbo (valid bound) | paper (the authors' token-joint loss)
  # Text: train on the self-normalised (ratio) estimate of the objective, per sequence
  # w(t) q(t) x the mean over its tokens with a masked sub-token (objectives.self_normalized_mean).
  c.diffusion.self_normalize = False

  c.data = ml_collections.ConfigDict()
  c.data.source = 'sotu'  # sotu | owt | lm1b
  c.data.data_dir = ''
  c.data.seq_len = 1024
  c.data.batch_size = 512  # global, in sequences
  c.data.worker_count = 0
  c.data.random_flip = False  # images: random horizontal flip of training images

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.head_b2 = 0.0  # Adam b2 of the output head only (train.optimizer_groups); 0: optim.b2
  c.optim.adaln_lr_scale = 1.0  # lr multiplier of the adaLN modulation layers (same groups)
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
  c.train.compact_head = True  # text: the head skips fully visible tokens (exact; unsharded batch)
  # ... and scores tokens with one masked sub-token over their b candidate classes only (exact;
  # faster at sotu's D = 128, l = 2, not measurably at owt small's D = 768, l = 4: off here)
  c.train.single_digit_head = False
  c.train.peak_flops = 0.0  # per device, for MFU; 0 = guess from the device kind

  c.eval = ml_collections.ConfigDict()
  c.eval.split = 'validation'
  c.eval.num_batches = 0  # 0 = the whole split
  c.eval.batch_size = 0  # 0 = data.batch_size
  c.eval.use_ema = True
  c.eval.seed = 0
  c.eval.num_t = 1  # stratified diffusion times per sequence (fixed seed: deterministic)

  # The image sampler (SPEC 5.3): the reference's flags, in its flow-matching time u = 1 - t.
  # The defaults are the plain sampler; the image configs carry the paper's tuned rows (SPEC 11.3).
  c.sampler = ml_collections.ConfigDict()
  c.sampler.num_steps = 512  # NFE grid size
  c.sampler.temperature = (1.0, 0.0, 0.0)  # [a, b', c]: logits / (a u**b' + c)
  c.sampler.corrector = (0.0, 0.0, 0.0)  # [c0, c1, c2]: kappa(u) = c0 u**c1 (1 - u)**c1 (c2 unused)
  c.sampler.timestep = (1.0, 0.0, 0.0)  # [a, b', c]: u -> 1 - a (1 - u)**b' + c
  c.sampler.carry_over = False  # per-digit marginal updates (the reference image 'carry_over')
  c.sampler.use_corrector = False
  c.sampler.use_timestep_scheduler = False

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  return c
