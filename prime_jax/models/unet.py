"""Discrete UNet for images (method.md §8.2): sub-token pixel embedding, ADM-style trunk, 256-way
logits.

Dimension key:
  B: batch    H, W: image height and width (halved at each level)    C: colour channels
  K: sub-tokens per token (ell)    E: embedding width per colour token (D0 / C)
  D: feature channels at the current level (D0 = model_channels * channel_mult[0])
  V: pixel values, the 256 token classes (O = V + 1 with the MDM mask class in the head)
  T: attention positions (H * W)    N: heads    Hd: channels per head    G: norm groups

Every colour channel of every pixel is one token with V = 256 classes. The K sub-tokens of a token
are embedded through one shared (b+1) x (E/K) table and concatenated, and the colour tokens of a
pixel are concatenated after that, so the D0 input features are ordered (colour, digit, feature).
The trunk is written from the architecture facts of method.md §8.2 (the reference image code is not
ported): residual blocks GroupNorm -> SiLU -> 3x3 conv -> GroupNorm with FiLM scale/shift -> SiLU ->
dropout -> zero-init 3x3 conv, plus a 1x1 projection on the skip path when the width changes;
self-attention (zero-init output projection) after the residual blocks at the chosen downsampling
factors and in the middle; average-pool down and nearest up with no convolution; skip connections
concatenated channel-wise as [h, skip] on the way up. No input projection: the embedding feeds the
first block. The output GroupNorm -> SiLU -> zero-init 3x3 conv gives C * O channels, read as
(C, O) per pixel, so the logits are exactly 0 at initialisation.

Time: the reference image model ignores time (`ignore_time`): each residual block's FiLM vector is
a learned constant of 2 * D parameters. `time_conditioning=True` instead adds ADM's timestep MLP and
one Linear per block.

Initialisation follows the reference (docs/official.md, "The authors' layouts"): the
pixel-embedding table is N(0, 1) (PyTorch's nn.Embedding default); each constant FiLM vector is
U(-sqrt(4 * model_channels), +sqrt(4 * model_channels)) (+-19.6 at paper size), so FiLM does not
start as the identity; the residual blocks' output conv, the attention output projection and the
output conv are zero (each block is its skip path and the logits are 0 at initialisation);
everything else has PyTorch's defaults: U(+-1/sqrt(fan_in)) for conv / Linear kernels and biases,
(1, 0) for GroupNorm.

Layout is NHWC; the convolution kernels are HWIO. Precision: parameters are float32, convolutions
and attention run in `dtype`, GroupNorm and the residual stream run in float32, logits are float32.

Logical axis names (parameter metadata, read with `nnx.get_partition_spec`):
  'vocab'       embedding rows (b + 1 symbols)
  'embed'       block input / residual channels      'mlp'   block hidden channels
  'conv_h', 'conv_w'   kernel taps (never sharded)    'modulation'  FiLM vector (2D)
  'qkv', 'heads'       the fused (D, 3, D) attention kernel, head-major
  'out'         output channels C * O                'cond', 'cond_in', 'freq'  time MLP only
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from prime_jax.models import layers
from prime_jax.models.dit import timestep_features
from prime_jax.models.embed import SubtokenEmbed
from prime_jax.models.layers import (
  Dense,
  dropout_key,
  make_param,
  ones_init,
  uniform_init,
  zeros_init,
)

LOGICAL_AXIS_NAMES = ('vocab', 'embed', 'mlp', 'conv_h', 'conv_w', 'modulation', 'qkv', 'heads',
                      'out', 'cond', 'cond_in', 'freq')
NUM_VALUES = 256

_PRESETS = {
    # The reference CIFAR-10 / ImageNet-32 model (method.md §8.2): widths 288 / 384 / 384 at 32 /
    # 16 / 8.
    'paper': dict(model_channels=96, channel_mult=(3, 4, 4), num_res_blocks=5,
                  attention_resolutions=(2,), head_channels=64, dropout=0.4, norm_groups=32),
    # Fashion-MNIST on a CPU (configs/fashion_mnist.py): 28 -> 14, widths 32 / 64, attention at
    # 14 x 14 and in the middle; 0.93M parameters for ell = 2.
    'cpu': dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=2,
                attention_resolutions=(2,), head_channels=32, dropout=0.0, norm_groups=16),
}


def preset(name: str) -> dict[str, Any]:
  """Trunk sizes as keyword arguments for `UNet`: 'paper' (method.md §8.2) or 'cpu'
  (Fashion-MNIST)."""
  if name not in _PRESETS:
    raise ValueError(f'Unknown UNet preset {name!r}; choose one of {sorted(_PRESETS)}.')
  return dict(_PRESETS[name])


# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------


class Conv(nnx.Module):
  """k x k convolution with 'SAME' padding, NHWC in and out, PyTorch init U(+-1/sqrt(k*k*I))."""

  def __init__(self, in_features: int, out_features: int, *, kernel_size: int = 3,
               names: tuple[str, str] = ('embed', 'mlp'), zero_init: bool = False,
               dtype=jnp.float32, rngs: nnx.Rngs):
    fan_in = kernel_size * kernel_size * in_features
    init = zeros_init if zero_init else uniform_init(1.0 / math.sqrt(fan_in))
    self.kernel = make_param(init, ('conv_h', 'conv_w', *names),
                             (kernel_size, kernel_size, in_features, out_features), rngs)
    self.bias = make_param(init, names[1:], (out_features,), rngs)
    self.dtype = dtype

  def __call__(self, x_BxHxWxI: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x_BxHxWxI.astype(self.dtype), self.kernel[...].astype(self.dtype), (1, 1), 'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
  """GroupNorm over (H, W, D/G) per group, in float32 (the reference's GroupNorm32), eps 1e-5."""

  def __init__(self, features: int, groups: int, *, name: str = 'embed', eps: float = 1e-5,
               rngs: nnx.Rngs):
    if features % groups:
      raise ValueError(f'GroupNorm: {features} channels do not split into {groups} groups; pick '
                       f'channel widths that are multiples of norm_groups={groups}.')
    self.groups, self.eps = groups, eps
    self.scale = make_param(ones_init, (name,), (features,), rngs)
    self.bias = make_param(zeros_init, (name,), (features,), rngs)

  def __call__(self, x_BxHxWxD: jax.Array) -> jax.Array:
    x = x_BxHxWxD.astype(jnp.float32)
    *lead, d = x.shape
    g = x.reshape(*lead, self.groups, d // self.groups)
    axes = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)  # all but batch and group
    mean = g.mean(axis=axes, keepdims=True)
    var = jnp.square(g - mean).mean(axis=axes, keepdims=True)
    g = (g - mean) * jax.lax.rsqrt(var + self.eps)
    return g.reshape(x.shape) * self.scale[...] + self.bias[...]


class ResBlock(nnx.Module):
  """GN -> SiLU -> conv -> GN * (1 + scale) + shift -> SiLU -> dropout -> zero conv, plus skip.

  The FiLM (scale, shift) is a learned constant (`cond_dim=None`, the reference's ignore_time),
  initialised U(+-film_bound), or a Linear of the time embedding. The block is its skip path at
  initialisation.
  """

  def __init__(self, in_features: int, out_features: int, *, norm_groups: int, dropout: float,
               cond_dim: Optional[int], film_bound: float = 0.0, dtype, rngs: nnx.Rngs):
    self.in_norm = GroupNorm(in_features, norm_groups, name='embed', rngs=rngs)
    self.in_conv = Conv(in_features, out_features, names=('embed', 'mlp'), dtype=dtype, rngs=rngs)
    if cond_dim is None:
      init = uniform_init(film_bound) if film_bound > 0 else zeros_init
      self.film = make_param(init, ('modulation',), (2 * out_features,), rngs)
    else:
      self.film = Dense(cond_dim, 2 * out_features, names=('cond', 'modulation'), rngs=rngs)
    self.out_norm = GroupNorm(out_features, norm_groups, name='mlp', rngs=rngs)
    self.out_conv = Conv(out_features, out_features, names=('mlp', 'embed'), zero_init=True,
                         dtype=dtype, rngs=rngs)
    self.skip = (Dense(in_features, out_features, names=('embed', 'mlp'), dtype=dtype, rngs=rngs)
                 if in_features != out_features else nnx.data(None))
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x_BxHxWxI: jax.Array, c_BxE: Optional[jax.Array], key: Optional[jax.Array],
               deterministic: bool) -> jax.Array:
    dtype = self.in_conv.dtype
    h = self.in_conv(jax.nn.silu(self.in_norm(x_BxHxWxI)).astype(dtype))
    if isinstance(self.film, Dense):
      film_Bx1x1x2D = self.film(c_BxE).astype(jnp.float32)[:, None, None, :]
    else:
      film_Bx1x1x2D = self.film[...]
    scale, shift = jnp.split(film_Bx1x1x2D, 2, axis=-1)
    h = self.out_norm(h) * (1.0 + scale) + shift
    h = self.dropout(jax.nn.silu(h).astype(dtype), deterministic=deterministic, rngs=key)
    h = self.out_conv(h).astype(jnp.float32)
    skip = x_BxHxWxI if self.skip is None else self.skip(x_BxHxWxI).astype(jnp.float32)
    return skip + h


class AttentionBlock(nnx.Module):
  """Residual multi-head self-attention over the H * W positions; identity at init."""

  def __init__(self, features: int, *, head_channels: int, norm_groups: int, dtype,
               rngs: nnx.Rngs):
    if features % head_channels:
      raise ValueError(f'Attention over {features} channels does not split into heads of '
                       f'head_channels={head_channels}; pick widths that are multiples of it.')
    self.num_heads = features // head_channels
    self.norm = GroupNorm(features, norm_groups, rngs=rngs)
    self.qkv = Dense(features, (3, features), names=('embed', 'qkv', 'heads'), dtype=dtype,
                     rngs=rngs)
    self.proj = Dense(features, features, names=('heads', 'embed'), zero_init=True, dtype=dtype,
                      rngs=rngs)

  def __call__(self, x_BxHxWxD: jax.Array) -> jax.Array:
    b, hh, ww, d = x_BxHxWxD.shape
    qkv_BxTx3xD = self.qkv(self.norm(x_BxHxWxD).reshape(b, hh * ww, d))
    qkv = qkv_BxTx3xD.reshape(b, hh * ww, 3, self.num_heads, d // self.num_heads)
    o_BxTxNxHd = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    out = self.proj(o_BxTxNxHd.reshape(b, hh * ww, d)).astype(jnp.float32)
    return x_BxHxWxD + out.reshape(b, hh, ww, d)


class Stage(nnx.Module):
  """One residual block, optionally followed by self-attention."""

  def __init__(self, in_features: int, out_features: int, *, attention: bool, head_channels: int,
               norm_groups: int, dropout: float, cond_dim: Optional[int], film_bound: float = 0.0,
               dtype, rngs: nnx.Rngs):
    self.res = ResBlock(in_features, out_features, norm_groups=norm_groups, dropout=dropout,
                        cond_dim=cond_dim, film_bound=film_bound, dtype=dtype, rngs=rngs)
    self.attn = (AttentionBlock(out_features, head_channels=head_channels,
                                norm_groups=norm_groups, dtype=dtype, rngs=rngs)
                 if attention else nnx.data(None))

  def __call__(self, x, c, key, deterministic):
    x = self.res(x, c, key, deterministic)
    return x if self.attn is None else self.attn(x)


def downsample(x_BxHxWxD: jax.Array) -> jax.Array:
  """2 x 2 average pooling, stride 2 (no convolution)."""
  b, h, w, d = x_BxHxWxD.shape
  return x_BxHxWxD.reshape(b, h // 2, 2, w // 2, 2, d).mean(axis=(2, 4))


def upsample(x_BxHxWxD: jax.Array) -> jax.Array:
  """Nearest-neighbour 2x upsampling (no convolution)."""
  return jnp.repeat(jnp.repeat(x_BxHxWxD, 2, axis=1), 2, axis=2)


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


class UNet(nnx.Module):
  """Sub-tokens y (B, H, W, C, K) -> float32 logits (B, H, W, C, 256) over pixel values.

  `mask_logit_in_head` (default: ell == 1) gives the output conv C * 257 channels as MDM's does,
  so parameter counts match the reference; only the 256 value logits are returned. Dropout draws
  from the `rngs` passed at call time, so the model's state is parameters only.
  `attention_resolutions` are downsampling factors (2: the 16 x 16 level of a 32 x 32 image).
  """

  def __init__(self, *, vocab_size: int = NUM_VALUES, base: int, ell: int, image_channels: int = 3,
               model_channels: int = 96, channel_mult: Sequence[int] = (3, 4, 4),
               num_res_blocks: int = 5, attention_resolutions: Sequence[int] = (2,),
               head_channels: int = 64, dropout: float = 0.4, norm_groups: int = 32,
               time_conditioning: bool = False, mask_logit_in_head: Optional[bool] = None,
               remat: bool | str = 'none', dtype=jnp.float32, rngs: nnx.Rngs):
    if base**ell < vocab_size:
      raise ValueError(f'base**ell = {base}**{ell} = {base**ell} < vocab_size = {vocab_size}: the '
                       'digits cannot represent every pixel value.')
    channel_mult = tuple(int(m) for m in channel_mult)
    if not channel_mult or num_res_blocks < 1:
      raise ValueError(f'Need at least one level and one residual block per level, got '
                       f'channel_mult={channel_mult}, num_res_blocks={num_res_blocks}.')
    width0 = model_channels * channel_mult[0]
    if width0 % image_channels or (width0 // image_channels) % ell:
      raise ValueError(
          f'The first level has model_channels * channel_mult[0] = {width0} channels; they must '
          f'split into image_channels={image_channels} colour tokens of ell={ell} equal sub-token '
          f'vectors ({width0} / {image_channels} / {ell} is not an integer). Pick model_channels '
          'so that it is divisible by image_channels * ell.')
    self.vocab_size, self.base, self.ell = vocab_size, base, ell
    self.image_channels, self.model_channels = image_channels, model_channels
    self.channel_mult, self.num_res_blocks = channel_mult, num_res_blocks
    self.attention_resolutions = tuple(int(a) for a in attention_resolutions)
    self.dropout_rate, self.time_conditioning, self.remat = dropout, time_conditioning, remat
    self.mask_logit_in_head = (ell == 1) if mask_logit_in_head is None else mask_logit_in_head
    self.num_outputs = vocab_size + int(self.mask_logit_in_head)
    self.dtype = dtype

    self.embed = SubtokenEmbed(base + 1, ell, width0 // image_channels,
                               init=jax.nn.initializers.normal(stddev=1.0), rngs=rngs)
    cond_dim = None
    if time_conditioning:
      cond_dim = 4 * model_channels
      self.time_fc1 = Dense(model_channels, cond_dim, names=('freq', 'cond'), rngs=rngs)
      self.time_fc2 = Dense(cond_dim, cond_dim, names=('cond_in', 'cond'), rngs=rngs)
    # The reference's ConstantEmbedding: U(+-sqrt(4 * model_channels)) (its time-embedding width).
    film_bound = math.sqrt(4 * model_channels)
    stage = lambda i, o, attn: Stage(i, o, attention=attn, head_channels=head_channels,
                                     norm_groups=norm_groups, dropout=dropout, cond_dim=cond_dim,
                                     film_bound=film_bound, dtype=dtype, rngs=rngs)

    # Down: a Stage per block; None marks a downsampling. Every output is kept for the way up.
    down, skips, ch, ds = [], [width0], width0, 1
    for level, mult in enumerate(channel_mult):
      for _ in range(num_res_blocks):
        down.append(stage(ch, mult * model_channels, ds in self.attention_resolutions))
        ch = mult * model_channels
        skips.append(ch)
      if level != len(channel_mult) - 1:
        down.append(None)
        skips.append(ch)
        ds *= 2
    self.down = nnx.List(down)
    self.mid = stage(ch, ch, True)
    self.mid_res = ResBlock(ch, ch, norm_groups=norm_groups, dropout=dropout, cond_dim=cond_dim,
                            film_bound=film_bound, dtype=dtype, rngs=rngs)
    # Up: num_res_blocks + 1 Stages per level, each eating one skip; upsampling ends each level
    # but the last.
    up, up_after = [], []
    for level, mult in reversed(list(enumerate(channel_mult))):
      for i in range(num_res_blocks + 1):
        up.append(stage(ch + skips.pop(), mult * model_channels,
                        ds in self.attention_resolutions))
        ch = mult * model_channels
        up_after.append(bool(level and i == num_res_blocks))
        if up_after[-1]:
          ds //= 2
    self.up = nnx.List(up)
    self.up_after = tuple(up_after)
    self.num_downsamples = len(channel_mult) - 1
    self.out_norm = GroupNorm(ch, norm_groups, rngs=rngs)
    self.out_conv = Conv(ch, image_channels * self.num_outputs, names=('embed', 'out'),
                         zero_init=True, dtype=dtype, rngs=rngs)

  def __call__(self, y_BxHxWxCxK: jax.Array, sigma_B: Optional[jax.Array] = None, *,
               deterministic: bool = True,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """y (B, H, W, C, K) sub-token ids in [0, b] (b = mask) -> float32 logits (B, H, W, C, 256).

    sigma_B (B,), the diffusion time, is read only with time_conditioning=True (the reference image
    model ignores time). Training (deterministic=False) needs
    `rngs`: a PRNG key (split here into one key per residual block) or an nnx.Rngs.
    """
    b, hh, ww, cc, k = y_BxHxWxCxK.shape
    if cc != self.image_channels or k != self.ell:
      raise ValueError(f'Expected sub-tokens (B, H, W, {self.image_channels}, {self.ell}), got '
                       f'{y_BxHxWxCxK.shape}.')
    factor = 2**self.num_downsamples
    if hh % factor or ww % factor:
      raise ValueError(f'Image size {hh} x {ww} is not divisible by {factor}: the UNet halves it '
                       f'{self.num_downsamples} times. Use fewer levels (channel_mult).')
    c_BxE = None
    if self.time_conditioning:
      if sigma_B is None:
        raise ValueError('time_conditioning=True needs sigma_B.')
      feats = timestep_features(sigma_B, self.model_channels)
      c_BxE = jax.nn.silu(self.time_fc2(jax.nn.silu(self.time_fc1(feats))))
    deterministic = deterministic or self.dropout_rate == 0.0
    n_res = sum(s is not None for s in self.down) + 2 + len(self.up)
    keys = None if deterministic else list(jax.random.split(dropout_key(rngs), n_res))
    next_key = lambda: None if keys is None else keys.pop()

    def run(block, x, key):
      return block(x, c_BxE, key, deterministic)
    run = layers.remat(run, self.remat)

    h = self.input_features(y_BxHxWxCxK)
    skips = [h]
    for block in self.down:
      h = downsample(h) if block is None else run(block, h, next_key())
      skips.append(h)
    h = run(self.mid, h, next_key())
    h = run(self.mid_res, h, next_key())
    for block, then_up in zip(self.up, self.up_after):
      h = run(block, jnp.concatenate([h, skips.pop()], axis=-1), next_key())
      if then_up:
        h = upsample(h)
    out = self.out_conv(jax.nn.silu(self.out_norm(h)).astype(self.dtype))
    logits = out.reshape(b, hh, ww, cc, self.num_outputs)[..., :self.vocab_size]
    return logits.astype(jnp.float32)

  def input_features(self, y_BxHxWxCxK: jax.Array) -> jax.Array:
    """The first block's input (B, H, W, D0), float32, features ordered (colour, digit, feature)."""
    b, hh, ww = y_BxHxWxCxK.shape[:3]
    e_BxHxWxCxE = self.embed(y_BxHxWxCxK)  # (digit, feature) per colour token
    return e_BxHxWxCxE.reshape(b, hh, ww, -1).astype(jnp.float32)

  def forward_flops(self, height: int, width: int) -> float:
    """Forward FLOPs for one image (2 per multiply-add): convolutions, 1x1 projections and
    attention (QK^T and AV over all H*W positions); norms and pointwise ops are left out."""
    flops, res = 0.0, height * width

    def block_flops(module: nnx.Module, positions: int) -> float:
      total = 0.0
      for path, node in nnx.iter_graph(module):
        # A time-conditioned FiLM Linear acts once per image, not per position.
        if isinstance(node, (Conv, Dense)) and 'film' not in path:
          total += 2.0 * positions * math.prod(node.kernel.shape)
        if isinstance(node, AttentionBlock):
          total += 4.0 * positions * positions * node.proj.kernel.shape[0]
      return total

    for block in self.down:
      if block is None:
        res //= 4
      else:
        flops += block_flops(block, res)
    flops += block_flops(self.mid, res) + block_flops(self.mid_res, res)
    for block, then_up in zip(self.up, self.up_after):
      flops += block_flops(block, res)
      res *= 4 if then_up else 1
    return flops + 2.0 * res * math.prod(self.out_conv.kernel.shape)


# ------------------------------------------------------------------------------------------------
# Analytic sizes (no parameters materialised)
# ------------------------------------------------------------------------------------------------


def count_params(**model_kwargs: Any) -> int:
  """Total parameters of `UNet(**model_kwargs)`, from `nnx.eval_shape` (nothing is allocated)."""
  abstract = nnx.eval_shape(lambda: UNet(**model_kwargs, rngs=nnx.Rngs(0)))
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))
