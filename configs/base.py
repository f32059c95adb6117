"""Base config: every dataset config starts from this one and changes only what differs.

Nested by concern: model, diffusion, data, optim, train, eval, sample, mesh. Every field is declared
here, once; `prime_jax.build` is the only reader. `get_config()` returns an unlocked ConfigDict;
dataset configs lock theirs before returning it, and read their argument with `parse_arg`.
"""

import ml_collections


def parse_arg(arg: str, **defaults):
  """The config argument 'key=value,key=value' (as in `--config configs/sotu.py:ell=1`) as a dict
  over `defaults`, each value converted to its default's type. Unknown keys are refused."""
  out = dict(defaults)
  for part in filter(None, (arg or '').split(',')):
    key, sep, value = part.partition('=')
    key = key.strip()
    if not sep or key not in defaults:
      raise ValueError(f'Config argument {part!r}: expected key=value with a key among '
                       f'{sorted(defaults)} (e.g. configs/x.py:ell=2).')
    kind = type(defaults[key])
    if kind is bool:
      if value.lower() not in ('1', '0', 'true', 'false'):
        raise ValueError(f'Config argument {key}={value!r}: expected true or false.')
      out[key] = value.lower() in ('1', 'true')
    else:
      try:
        out[key] = kind(value)
      except ValueError:
        raise ValueError(f'Config argument {key}={value!r}: expected a {kind.__name__}.') from None
  return out


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 1

  c.model = ml_collections.ConfigDict()
  # dit (text) | unet (images; data.source must be an image source) | ar (text: the authors'
  # autoregressive baseline, a causal DiT trunk without adaLN or time; needs diffusion.ell = 1 and
  # reads dim, num_heads, num_layers, mlp_ratio, dropout, dtype, rope_base, distance_bias_slope,
  # init.head_scale and init.head_bias)
  c.model.name = 'dit'
  c.model.dim = 768
  c.model.num_heads = 12
  c.model.num_layers = 12
  c.model.cond_dim = 128
  c.model.mlp_ratio = 4
  c.model.dropout = 0.1
  c.model.time_conditioning = False  # the reference forces sigma = 0 (method.md §2.1)
  c.model.scan_layers = False
  # what the backward pass keeps of each block: none (everything) | full (the block's input only)
  # | dots (every matmul output) | dots_no_batch (weight matmuls; attention scores recomputed)
  c.model.remat = 'none'
  c.model.rope_base = 10000.0  # rotary frequencies base**(-2i/H), i < H/2; 10000 = the reference
  # > 0: add -m_n |i - j| to head n's attention logits, m_n = slope * 2**(-8n/N) (ALiBi's slopes
  # for slope = 2**(-8/N), made symmetric); 0 = none, the reference
  c.model.distance_bias_slope = 0.0
  # text attention kernel: xla (any backend) | splash (Pallas, TPU) | cudnn (NVIDIA GPU, bf16)
  c.model.attention = 'xla'
  c.model.attention_block = (512, 512)  # splash tile sizes (q, kv), capped at data.seq_len
  # Initialisation (DiT); the defaults are the reference's.
  c.model.init = ml_collections.ConfigDict()
  c.model.init.head_scale = 0.0  # head kernel ~ U(±s/sqrt(D)); 0 = zeros, as the reference
  c.model.init.adaln_scale = 0.0  # adaLN modulation ~ U(±s/sqrt(E)); 0 = zeros (identity blocks)
  c.model.init.head_bias = ''  # 'unigram': start the head at log p(token) of the training data
  c.model.dtype = 'float32'  # compute dtype; parameters stay float32 ('bfloat16' on TPU/GPU)
  # model.name = 'unet': the discrete UNet (method.md §8.2); the defaults are the paper's CIFAR-10
  # model.
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
  # MDM-Prime-v2 index shuffling by the authors' file (e.g. perm_1.0_65536.pt); '' = none
  c.diffusion.permutation_file = ''
  c.diffusion.schedule = 'loglinear'
  c.diffusion.schedule_eps = 1e-3
  c.diffusion.schedule_n = 3.0  # 'poly' only: alpha = (1 - t)**n (images: n = 3)
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
  c.data.random_flip = False  # images: random horizontal flip of training images

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.head_b2 = 0.0  # Adam b2 of the model's output head (prime_jax.optim); 0: optim.b2
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
  c.train.bench_steps = 5  # --mode bench: timed steps

  c.eval = ml_collections.ConfigDict()
  c.eval.split = 'validation'
  c.eval.num_batches = 0  # 0 = the whole split
  c.eval.batch_size = 0  # 0 = data.batch_size
  c.eval.use_ema = True
  c.eval.seed = 0
  c.eval.num_t = 1  # stratified diffusion times per sequence (fixed seed: deterministic)
  # --mode eval (text): also these sets, 'SOURCE' or 'SOURCE:SPLIT', comma-separated, e.g.
  # 'moby_dick,wikitext2'; local sets are read from eval.sets_dir ('' = data.data_dir)
  c.eval.sets = ''
  c.eval.sets_dir = ''
  # --mode eval (text): also the NELBO integrand at these times, e.g. '0.02,0.1,0.5,0.9', beside
  # the training unigram's
  c.eval.t_grid = ''

  # --mode sample (text) and --mode fid (images): how many samples, with what sampler.
  c.sample = ml_collections.ConfigDict()
  c.sample.num_samples = 16
  c.sample.batch_size = 8  # samples drawn together
  c.sample.seed = 0
  c.sample.steps = 0  # text reverse steps T; 0 = data.seq_len (images: sampler.num_steps)
  c.sample.nucleus_p = 1.0  # text: top-p mass kept (1 = off)
  # token draws: fp64 inverse CDF | fp32 race | fp32_hires (a race on 64 random bits)
  c.sample.precision = 'fp64'
  c.sample.cache = True  # text: skip the network in idle steps
  c.sample.prefix_len = 0  # text: keep the first N positions of validation sequences
  c.sample.scorer = ''  # text: generative perplexity under 'smollm2' (offline) or 'gpt2'; '' = none
  c.sample.scorer_path = ''  # local weights folder for scorer 'gpt2'
  c.sample.fid_ref_images = 0  # images: training images for the FID statistics (0 = all; cached)
  c.sample.inpaint = False  # images: keep the left half of validation images, generate the right

  # The image sampler (method.md §5.3): the reference's flags, in its flow-matching time u = 1 - t;
  # it
  # samples the 'poly' schedule. The defaults are the plain sampler; the image configs carry the
  # paper's tuned rows (method.md §11.3).
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
