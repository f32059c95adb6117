"""DiT trunk of MDLM / MDM-Prime text (method.md §8.1): adaLN blocks, rotary, bidirectional
attention.

Dimension key:
  B: batch    L: tokens    K: sub-tokens per token (ell)    D: model width    N: heads    H: D / N
  E: cond_dim (128)    F: sinusoidal time features (256)    M: MLP width (mlp_ratio * D)
  C: token classes (vocab_size)    O: head outputs (C, or C + 1 with the mask class)    S: layers

The same trunk serves MDLM (ell = 1, base = C, embedding of C + 1 rows) and Prime (ell > 1, one
shared (b+1) x (D/ell) table): only the input embedding differs, so per-step compute is equal for
every ell.

Precision: parameters are float32. `dtype` is the compute dtype of every matmul and of attention;
the residual stream, LayerNorm, the time embedding and the returned logits stay float32 (as the
reference's fp32 LN and fp32 residual under bf16 autocast).

Logical axis names (parameter metadata `out_sharding`, read with `nnx.get_partition_spec`):
  'layers'      leading axis of the stacked blocks (scan_layers=True only)
  'vocab'       embedding rows (b + 1 symbols) and head outputs (C or C + 1)
  'embed'       model width D
  'qkv'         the size-3 q/k/v axis of the fused qkv kernel (never worth sharding)
  'heads'       attention features N * H (= D), head-major: contiguous shards split whole heads
  'mlp'         MLP hidden width M
  'modulation'  adaLN outputs (6D in blocks, 2D in the final layer)
  'cond'        conditioning width E
  'cond_in'     input of the second timestep linear (also width E)
  'freq'        sinusoidal time features F
Per parameter (blocks get a leading 'layers' axis when stacked):
  embed.table                ('vocab', 'embed')
  time_embed.fc1             kernel ('freq', 'cond')             bias ('cond',)
  time_embed.fc2             kernel ('cond_in', 'cond')          bias ('cond',)
  blocks.norm1/norm2.scale   ('embed',)
  blocks.adaln               kernel ('cond', 'modulation')       bias ('modulation',)
  blocks.qkv                 kernel ('embed', 'qkv', 'heads')    no bias
  blocks.attn_out            kernel ('heads', 'embed')           no bias
  blocks.mlp_in              kernel ('embed', 'mlp')             bias ('mlp',)
  blocks.mlp_out             kernel ('mlp', 'embed')             bias ('embed',)
  final.norm.scale           ('embed',)
  final.adaln                kernel ('cond', 'modulation')       bias ('modulation',)
  final.head                 kernel ('embed', 'vocab')           bias ('vocab',)
The fused qkv kernel is (D, 3, D) rather than (D, 3D) so that sharding 'heads' splits each of q, k
and v by whole heads; its flat layout (3, N, H) equals the reference's 'b s (three h d)'.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from prime_jax.models import layers
from prime_jax.models.attention import Attention
from prime_jax.models.embed import SubtokenEmbed
from prime_jax.models.layers import (
  Dense,
  LayerNorm,
  OutputHead,
  dropout_key,
)

LOGICAL_AXIS_NAMES = ('layers', 'vocab', 'embed', 'qkv', 'heads', 'mlp', 'modulation', 'cond',
                      'cond_in', 'freq')
TIME_FEATURES = 256

_PRESETS = {
    'tiny': dict(dim=512, num_heads=8, num_layers=8, cond_dim=128, dropout=0.1),
    'small': dict(dim=768, num_heads=12, num_layers=12, cond_dim=128, dropout=0.1),
    'medium': dict(dim=1024, num_heads=16, num_layers=24, cond_dim=128, dropout=0.1),
}


def preset(name: str) -> dict[str, Any]:
  """Trunk sizes of the reference configs (method.md §8.1), as keyword arguments for `DiT`."""
  if name not in _PRESETS:
    raise ValueError(f'Unknown DiT preset {name!r}; choose one of {sorted(_PRESETS)}.')
  return dict(_PRESETS[name])


# ------------------------------------------------------------------------------------------------
# Rotary position embedding and time features
# ------------------------------------------------------------------------------------------------


def rotary_cos_sin(seq_len: int, head_dim: int,
                   base: float = 10000.0) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables (L, H) of the non-interleaved (rotate-half) rotary embedding."""
  inv_freq = 1.0 / base**(jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  freqs_LxHh = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  emb_LxH = jnp.concatenate([freqs_LxHh, freqs_LxHh], axis=-1)
  return jnp.cos(emb_LxH), jnp.sin(emb_LxH)


def apply_rotary(x_BxLxNxH: jax.Array, cos_LxH: jax.Array, sin_LxH: jax.Array) -> jax.Array:
  """Rotates feature pairs (i, i + H/2) by position-dependent angles, in float32."""
  x = x_BxLxNxH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = cos_LxH[:, None, :], sin_LxH[:, None, :]
  return (x * cos + rotated * sin).astype(x_BxLxNxH.dtype)


def distance_bias(seq_len: int, num_heads: int, slope: float) -> jax.Array:
  """(1, N, L, L) attention-logit bias -m_n |i - j|: ALiBi's penalty made symmetric for
  bidirectional attention. Head n's slope is m_n = slope * r**n with ALiBi's ratio r = 2**(-8/N),
  so slope = r is ALiBi's own set."""
  ratio = 2.0**(-8.0 / num_heads)
  slopes_N = slope * ratio**jnp.arange(num_heads, dtype=jnp.float32)
  pos_L = jnp.arange(seq_len, dtype=jnp.float32)
  dist_LxL = jnp.abs(pos_L[:, None] - pos_L[None, :])
  return -(slopes_N[:, None, None] * dist_LxL)[None]


def timestep_features(sigma_B: jax.Array, dim: int = TIME_FEATURES,
                      max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features (B, F): cos half then sin half."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args_BxFh = sigma_B.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args_BxFh), jnp.sin(args_BxFh)], axis=-1)


def self_attention(block: nnx.Module, h_BxLxD: jax.Array, cos_LxH: jax.Array, sin_LxH: jax.Array,
                   bias_1xNxLxL: Optional[jax.Array], *, causal: bool) -> jax.Array:
  """A block's attention sublayer: the fused qkv projection (`block.qkv`), rotary q and k, the
  block's attention kernel (`block.attention`) and the output projection (`block.attn_out`)."""
  b, l, d = h_BxLxD.shape
  qkv_BxLx3xNxH = block.qkv(h_BxLxD).reshape(b, l, 3, block.num_heads, d // block.num_heads)
  q, k, v = (qkv_BxLx3xNxH[:, :, i] for i in range(3))
  q, k = apply_rotary(q, cos_LxH, sin_LxH), apply_rotary(k, cos_LxH, sin_LxH)
  bias = None if bias_1xNxLxL is None else bias_1xNxLxL.astype(q.dtype)
  o_BxLxNxH = block.attention(q, k, v, causal=causal, bias=bias)
  return block.attn_out(o_BxLxNxH.reshape(b, l, d))


def _modulate(h_BxLxD: jax.Array, shift_Bx1xD: jax.Array, scale_Bx1xD: jax.Array) -> jax.Array:
  return h_BxLxD * (1 + scale_Bx1xD.astype(jnp.float32)) + shift_Bx1xD.astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------


class TimestepEmbedder(nnx.Module):
  """sigma (B,) -> sinusoidal (B, F) -> Linear -> SiLU -> Linear -> (B, E), in float32."""

  def __init__(self, cond_dim: int, *, rngs: nnx.Rngs):
    self.fc1 = Dense(TIME_FEATURES, cond_dim, names=('freq', 'cond'), rngs=rngs)
    self.fc2 = Dense(cond_dim, cond_dim, names=('cond_in', 'cond'), rngs=rngs)

  def __call__(self, sigma_B: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.silu(self.fc1(timestep_features(sigma_B))))


class DiTBlock(nnx.Module):
  """Pre-norm transformer block with adaLN shift/scale/gate; the identity at init (gates are 0)."""

  def __init__(self, dim: int, num_heads: int, cond_dim: int, mlp_ratio: int, dropout: float, *,
               dtype, rngs: nnx.Rngs, adaln_init_scale: float = 0.0,
               attention: Attention = Attention()):
    self.num_heads = num_heads
    self.attention = attention
    self.norm1 = LayerNorm(dim, rngs=rngs)
    self.norm2 = LayerNorm(dim, rngs=rngs)
    self.adaln = Dense(cond_dim, 6 * dim, names=('cond', 'modulation'),
                       zero_init=adaln_init_scale == 0, init_scale=adaln_init_scale, dtype=dtype,
                       rngs=rngs)
    self.qkv = Dense(dim, (3, dim), names=('embed', 'qkv', 'heads'), use_bias=False, dtype=dtype,
                     rngs=rngs)
    self.attn_out = Dense(dim, dim, names=('heads', 'embed'), use_bias=False, dtype=dtype,
                          rngs=rngs)
    self.mlp_in = Dense(dim, mlp_ratio * dim, names=('embed', 'mlp'), dtype=dtype, rngs=rngs)
    self.mlp_out = Dense(mlp_ratio * dim, dim, names=('mlp', 'embed'), dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)  # stateless: the key comes with each call

  def _attention(self, h_BxLxD: jax.Array, cos_LxH: jax.Array, sin_LxH: jax.Array,
                 bias_1xNxLxL: Optional[jax.Array]) -> jax.Array:
    return self_attention(self, h_BxLxD, cos_LxH, sin_LxH, bias_1xNxLxL, causal=False)

  def __call__(self, x_BxLxD: jax.Array, c_BxE: jax.Array, cos_LxH: jax.Array, sin_LxH: jax.Array,
               key: Optional[jax.Array], deterministic: bool,
               bias_1xNxLxL: Optional[jax.Array] = None) -> jax.Array:
    mod_Bx1x6D = self.adaln(c_BxE)[:, None, :]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod_Bx1x6D, 6, -1)
    key_attn, key_mlp = (None, None) if deterministic else jax.random.split(key)
    dtype = self.qkv.dtype

    h = _modulate(self.norm1(x_BxLxD), shift_msa, scale_msa).astype(dtype)
    attn = self._attention(h, cos_LxH, sin_LxH, bias_1xNxLxL)
    attn = self.dropout(attn, deterministic=deterministic, rngs=key_attn)
    x_BxLxD = x_BxLxD + (gate_msa * attn).astype(x_BxLxD.dtype)

    h = _modulate(self.norm2(x_BxLxD), shift_mlp, scale_mlp).astype(dtype)
    mlp = self.mlp_out(jax.nn.gelu(self.mlp_in(h), approximate=True))
    mlp = self.dropout(mlp, deterministic=deterministic, rngs=key_mlp)
    return x_BxLxD + (gate_mlp * mlp).astype(x_BxLxD.dtype)


class FinalLayer(nnx.Module):
  """LN -> adaLN shift/scale (`features`) and the Linear(D -> O) head (`head_weights`, applied by
  the DiT or fused into the loss kernel); zero-initialised, so logits start at 0.

  `head_init_scale` > 0 draws the head kernel from U(±scale / sqrt(D)) instead (1 is PyTorch's
  Linear default); the bias stays zero. `adaln_init_scale` > 0 does the same for the modulation.
  A zero kernel makes every masked position's logits equal and gives the trunk no gradient at
  step 0 (the reference's choice; harmless over 10^6 steps, a slow start in a few hundred).
  The head's parameters are `HeadParam`s: their own optimizer group.
  """

  def __init__(self, dim: int, cond_dim: int, num_outputs: int, *, dtype, rngs: nnx.Rngs,
               head_init_scale: float = 0.0, adaln_init_scale: float = 0.0):
    self.norm = LayerNorm(dim, rngs=rngs)
    self.adaln = Dense(cond_dim, 2 * dim, names=('cond', 'modulation'),
                       zero_init=adaln_init_scale == 0, init_scale=adaln_init_scale, dtype=dtype,
                       rngs=rngs)
    self.head = OutputHead(dim, num_outputs, dtype=dtype, rngs=rngs, init_scale=head_init_scale)

  def set_bias(self, bias_C: jax.Array) -> None:
    """Sets the first len(bias_C) output biases (e.g. the training unigram's log-probabilities)."""
    self.head.set_bias(bias_C)

  def head_weights(self, num_classes: int, dtype) -> tuple[jax.Array, jax.Array]:
    """(kernel (D, num_classes), bias (num_classes,)) of the first `num_classes` outputs."""
    return self.head.weights(num_classes, dtype)

  def features(self, x_BxLxD: jax.Array, c_BxE: jax.Array) -> jax.Array:
    shift, scale = jnp.split(self.adaln(c_BxE)[:, None, :], 2, axis=-1)
    return _modulate(self.norm(x_BxLxD), shift, scale)


class DiT(nnx.Module):
  """Sub-tokens y (B, L, K) -> logits (B, L, C) over the C token classes, float32.

  `mask_logit_in_head` (default: ell == 1) gives the head C + 1 outputs as MDLM's does, so
  parameter counts match the reference; only the first C are returned, which is MDLM's SUBS with
  a -inf mask logit. With `time_conditioning=False` sigma is replaced by 0: c is a learned
  constant, as in the reference. Dropout draws from the `rngs` passed at call time (a key or
  nnx.Rngs), never from module state, so the model's state is parameters only and a train step
  can pass fold_in(key, step).
  """

  def __init__(self, *, vocab_size: int, base: int, ell: int, dim: int, num_heads: int,
               num_layers: int, cond_dim: int = 128, mlp_ratio: int = 4, dropout: float = 0.1,
               time_conditioning: bool = False, mask_logit_in_head: Optional[bool] = None,
               scan_layers: bool = False, remat: bool | str = 'none', dtype=jnp.float32,
               head_init_scale: float = 0.0, adaln_init_scale: float = 0.0,
               rope_base: float = 10000.0,
               distance_bias_slope: float = 0.0, attention: Attention = Attention(),
               rngs: nnx.Rngs):
    if base**ell < vocab_size:
      raise ValueError(f'base**ell = {base}**{ell} = {base**ell} < vocab_size = {vocab_size}: the '
                       f'digits cannot represent every token.')
    if dim % num_heads != 0 or (dim // num_heads) % 2 != 0:
      raise ValueError(f'dim={dim} must split into num_heads={num_heads} heads of even width '
                       f'(rotary pairs features), got head width {dim / num_heads}.')
    if num_layers < 1:
      raise ValueError(f'num_layers must be >= 1, got {num_layers}.')
    if rope_base <= 1:
      raise ValueError(f'rope_base must be > 1 (10000 = the reference), got {rope_base}.')
    if distance_bias_slope < 0:
      raise ValueError(f'distance_bias_slope must be >= 0 (0 = no bias, the reference), got '
                       f'{distance_bias_slope}.')
    if head_init_scale < 0 or adaln_init_scale < 0:
      raise ValueError(f'head_init_scale and adaln_init_scale must be >= 0 (0 = zero init, the '
                       f'reference), got {head_init_scale} and {adaln_init_scale}.')
    self.vocab_size, self.base, self.ell = vocab_size, base, ell
    self.dim, self.num_heads, self.num_layers = dim, num_heads, num_layers
    self.cond_dim, self.mlp_ratio, self.dropout_rate = cond_dim, mlp_ratio, dropout
    self.time_conditioning = time_conditioning
    self.mask_logit_in_head = (ell == 1) if mask_logit_in_head is None else mask_logit_in_head
    self.scan_layers, self.remat, self.dtype = scan_layers, remat, dtype
    self.rope_base, self.distance_bias_slope = rope_base, distance_bias_slope

    self.embed = SubtokenEmbed(base + 1, ell, dim, rngs=rngs)
    self.time_embed = TimestepEmbedder(cond_dim, rngs=rngs)
    make_block = lambda r: DiTBlock(dim, num_heads, cond_dim, mlp_ratio, dropout, dtype=dtype,
                                    rngs=r, adaln_init_scale=adaln_init_scale,
                                    attention=attention)
    if scan_layers:
      # One vmapped construction: every leaf gets a leading (S,) axis, named 'layers' in metadata.
      @nnx.split_rngs(splits=num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
      def make_stack(r: nnx.Rngs) -> DiTBlock:
        return make_block(r)

      self.blocks = make_stack(rngs)
    else:
      self.blocks = nnx.List([make_block(rngs) for _ in range(num_layers)])
    self.final = FinalLayer(dim, cond_dim, vocab_size + int(self.mask_logit_in_head), dtype=dtype,
                            rngs=rngs, head_init_scale=head_init_scale,
                            adaln_init_scale=adaln_init_scale)

  def __call__(self, y_BxLxK: jax.Array, sigma_B: Optional[jax.Array] = None, *,
               deterministic: bool = True,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """y (B, L, K) sub-token ids in [0, b] (b = mask) -> float32 logits (B, L, C)."""
    h_BxLxD = self.features(y_BxLxK, sigma_B, deterministic=deterministic, rngs=rngs)
    kernel_DxC, bias_C = self.head_weights()
    logits = jax.lax.dot_general(h_BxLxD, kernel_DxC, (((2,), (0,)), ((), ())))
    return (logits + bias_C).astype(jnp.float32)

  def head_weights(self) -> tuple[jax.Array, jax.Array]:
    """(kernel (D, C), bias (C,)) of the output head over the C token classes, in the compute
    dtype: logits = features @ kernel + bias. A loss kernel can fuse them with the softmax
    instead of materialising (B, L, C) logits."""
    return self.final.head_weights(self.vocab_size, self.dtype)

  def features(self, y_BxLxK: jax.Array, sigma_B: Optional[jax.Array] = None, *,
               deterministic: bool = True,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """The head's input (B, L, D) in the compute dtype: trunk, final LN and adaLN modulation.

    sigma_B is read only with time_conditioning=True. Training (deterministic=False) needs `rngs`:
    a PRNG key, split here into one key per layer (so scanned and unscanned stacks agree), or an
    nnx.Rngs whose 'dropout' (else 'default') stream is drawn once.
    """
    b, l, _ = y_BxLxK.shape
    if self.time_conditioning and sigma_B is None:
      raise ValueError('time_conditioning=True needs sigma_B.')
    if not self.time_conditioning or sigma_B is None:
      sigma_B = jnp.zeros((b,), jnp.float32)
    deterministic = deterministic or self.dropout_rate == 0.0
    keys_S = None if deterministic else jax.random.split(dropout_key(rngs), self.num_layers)

    x_BxLxD = self.embed(y_BxLxK).astype(jnp.float32)
    c_BxE = jax.nn.silu(self.time_embed(sigma_B))
    cos_LxH, sin_LxH = rotary_cos_sin(l, self.dim // self.num_heads, self.rope_base)
    bias_1xNxLxL = (distance_bias(l, self.num_heads, self.distance_bias_slope)
                    if self.distance_bias_slope > 0 else None)

    def block_fn(block: DiTBlock, x: jax.Array, key: Optional[jax.Array]) -> jax.Array:
      return block(x, c_BxE, cos_LxH, sin_LxH, key, deterministic, bias_1xNxLxL)

    # Inside scan the loop boundary already stops CSE across layers, so prevent_cse can be off.
    block_fn = layers.remat(block_fn, self.remat, prevent_cse=not self.scan_layers)

    if self.scan_layers:
      key_axis = None if keys_S is None else 0

      @nnx.scan(in_axes=(nnx.Carry, 0, key_axis), out_axes=nnx.Carry,
                transform_metadata={nnx.PARTITION_NAME: 'layers'})
      def run_stack(x: jax.Array, block: DiTBlock, key: Optional[jax.Array]) -> jax.Array:
        return block_fn(block, x, key)

      x_BxLxD = run_stack(x_BxLxD, self.blocks, keys_S)
    else:
      for i, block in enumerate(self.blocks):
        x_BxLxD = block_fn(block, x_BxLxD, None if keys_S is None else keys_S[i])

    return self.final.features(x_BxLxD, c_BxE).astype(self.dtype)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token at this sequence length; see the module-level `flops_per_token`."""
    return flops_per_token(seq_len, vocab_size=self.vocab_size, base=self.base, ell=self.ell,
                           dim=self.dim, num_layers=self.num_layers, cond_dim=self.cond_dim,
                           mlp_ratio=self.mlp_ratio, mask_logit_in_head=self.mask_logit_in_head)


# ------------------------------------------------------------------------------------------------
# Analytic sizes (no parameters materialised)
# ------------------------------------------------------------------------------------------------


def param_counts(*, vocab_size: int, base: int, ell: int, dim: int, num_layers: int,
                 cond_dim: int = 128, mlp_ratio: int = 4, mask_logit_in_head: Optional[bool] = None,
                 **unused: Any) -> dict[str, int]:
  """Parameter counts by role: 'embedding' (input table), 'conditioning' (timestep MLP and every
  adaLN, applied once per sequence), 'per_token' (everything applied at every token), 'total'.

  Extra keyword arguments (num_heads, dropout, ...) are ignored so `preset(...)` can be splatted.
  """
  del unused
  if mask_logit_in_head is None:
    mask_logit_in_head = ell == 1
  d, m, e = dim, mlp_ratio * dim, cond_dim
  outputs = vocab_size + int(mask_logit_in_head)
  embedding = (base + 1) * (d // ell)
  conditioning = (TIME_FEATURES * e + e) + (e * e + e) + num_layers * (e * 6 * d + 6 * d) + (
      e * 2 * d + 2 * d)
  block = 2 * d + 3 * d * d + d * d + (d * m + m) + (m * d + d)
  per_token = num_layers * block + d + (d * outputs + outputs)
  return dict(embedding=embedding, conditioning=conditioning, per_token=per_token,
              total=embedding + conditioning + per_token)


def flops_per_token(seq_len: int, **model_kwargs: Any) -> float:
  """Forward + backward FLOPs per token for an MFU estimate.

    flops = 6 * N + 12 * num_layers * dim * seq_len

  N = `param_counts(...)['per_token']`: the parameters applied at every token (trunk and output
  head). The input embedding is a gather, and the timestep MLP and adaLN act once per sequence, so
  they are left out. The second term is attention: QK^T and AV cost 2 * 2 * L * D FLOPs per token
  and layer forward, tripled for the backward pass, counting the full bidirectional L x L scores.
  """
  n = param_counts(**model_kwargs)['per_token']
  return 6.0 * n + 12.0 * model_kwargs['num_layers'] * model_kwargs['dim'] * seq_len
