"""The autoregressive baseline (the authors' "ARM" rows): the DiT trunk with causal attention and
no time conditioning (docs/official.md, "The authors' layouts").

Dimension key:
  B: batch    L: tokens    D: model width    N: heads    H: D / N    M: MLP width (mlp_ratio * D)
  C: token classes (vocab_size)    O: head outputs (C + 1)

Differences from `models.dit.DiT`, and nothing else: query i attends to keys <= i; a block is
x += attn_out(attn(LN1 x)); x += mlp(LN2 x) (no adaLN modulation, no gates); no time embedding; the
final layer is linear(LN x). As the authors' AR, the input table has C + 1 rows (the last, the
mask / pad id C, is never fed in normal use) and the head C + 1 outputs; their log-probabilities
set output C to -1000 before a log-softmax over C + 1, which in float32 equals the log-softmax over
the first C logits, so `__call__` returns those C and the loss drops output C.

Parameter paths (a checkpoint converter maps the authors' keys onto them; logical axis names as in
models/dit.py):
  embed.table                (C + 1, D)    ('vocab', 'embed')
  blocks[i].norm1.scale      (D,)          ('embed',)
  blocks[i].qkv.kernel       (D, 3, D)     ('embed', 'qkv', 'heads')    no bias
  blocks[i].attn_out.kernel  (D, D)        ('heads', 'embed')           no bias
  blocks[i].norm2.scale      (D,)          ('embed',)
  blocks[i].mlp_in           kernel (D, M) ('embed', 'mlp')             bias (M,) ('mlp',)
  blocks[i].mlp_out          kernel (M, D) ('mlp', 'embed')             bias (D,) ('embed',)
  final.norm.scale           (D,)          ('embed',)
  final.head                 kernel (D, O) ('embed', 'vocab')           bias (O,) ('vocab',)
The head's parameters are `HeadParam`s (their own optimizer group), as the DiT's.

Initialisation: PyTorch's defaults, as the authors' modules get them: every Linear U(±1/sqrt(fan
in)) for weights and biases, LayerNorm scales 1, the embedding U(±1/sqrt(D)); the head starts at
zero as the reference DiT's final Linear (`head_init_scale` > 0 draws its kernel from
U(±scale/sqrt(D)) instead). Precision as the DiT: float32 parameters, residual stream, LayerNorm
and logits; `dtype` for the matmuls and attention.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from prime_jax.models.attention import Attention
from prime_jax.models.dit import distance_bias, rotary_cos_sin, self_attention
from prime_jax.models.embed import SubtokenEmbed
from prime_jax.models.layers import (
  Dense,
  LayerNorm,
  OutputHead,
  dropout_key,
)


class ARBlock(nnx.Module):
  """Pre-norm causal transformer block without modulation or gates."""

  def __init__(self, dim: int, num_heads: int, mlp_ratio: int, dropout: float, *, dtype,
               rngs: nnx.Rngs, attention: Attention = Attention()):
    self.num_heads = num_heads
    self.attention = attention
    self.norm1 = LayerNorm(dim, rngs=rngs)
    self.qkv = Dense(dim, (3, dim), names=('embed', 'qkv', 'heads'), use_bias=False, dtype=dtype,
                     rngs=rngs)
    self.attn_out = Dense(dim, dim, names=('heads', 'embed'), use_bias=False, dtype=dtype,
                          rngs=rngs)
    self.norm2 = LayerNorm(dim, rngs=rngs)
    self.mlp_in = Dense(dim, mlp_ratio * dim, names=('embed', 'mlp'), dtype=dtype, rngs=rngs)
    self.mlp_out = Dense(mlp_ratio * dim, dim, names=('mlp', 'embed'), dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)  # stateless: the key comes with each call

  def _attention(self, h_BxLxD: jax.Array, cos_LxH: jax.Array, sin_LxH: jax.Array,
                 bias_1xNxLxL: Optional[jax.Array]) -> jax.Array:
    return self_attention(self, h_BxLxD, cos_LxH, sin_LxH, bias_1xNxLxL, causal=True)

  def __call__(self, x_BxLxD: jax.Array, cos_LxH: jax.Array, sin_LxH: jax.Array,
               key: Optional[jax.Array], deterministic: bool,
               bias_1xNxLxL: Optional[jax.Array] = None) -> jax.Array:
    key_attn, key_mlp = (None, None) if deterministic else jax.random.split(key)
    dtype = self.qkv.dtype
    attn = self._attention(self.norm1(x_BxLxD).astype(dtype), cos_LxH, sin_LxH, bias_1xNxLxL)
    attn = self.dropout(attn, deterministic=deterministic, rngs=key_attn)
    x_BxLxD = x_BxLxD + attn.astype(x_BxLxD.dtype)
    mlp = self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm2(x_BxLxD).astype(dtype)),
                                   approximate=True))
    mlp = self.dropout(mlp, deterministic=deterministic, rngs=key_mlp)
    return x_BxLxD + mlp.astype(x_BxLxD.dtype)


class ARFinalLayer(nnx.Module):
  """LN and the Linear(D -> C + 1) head (`head_weights`, applied by the AR or fused into a loss
  kernel)."""

  def __init__(self, dim: int, num_outputs: int, *, dtype, rngs: nnx.Rngs,
               head_init_scale: float = 0.0):
    self.norm = LayerNorm(dim, rngs=rngs)
    self.head = OutputHead(dim, num_outputs, dtype=dtype, rngs=rngs, init_scale=head_init_scale)

  def set_bias(self, bias_C: jax.Array) -> None:
    """Sets the first len(bias_C) output biases (e.g. the training unigram's log-probabilities)."""
    self.head.set_bias(bias_C)

  def head_weights(self, num_classes: int, dtype) -> tuple[jax.Array, jax.Array]:
    """(kernel (D, num_classes), bias (num_classes,)) of the first `num_classes` outputs."""
    return self.head.weights(num_classes, dtype)


class AR(nnx.Module):
  """Tokens x (B, L) -> float32 logits (B, L, C) of p(x_{i+1} | x_{<=i}) at every position i.

  Dropout (after attention and after the MLP, as in the DiT) draws from the `rngs` passed at call
  time (a key or nnx.Rngs), never from module state. `distance_bias_slope` > 0 adds the DiT's
  -m_n |i - j| to the attention logits (under the causal mask this is ALiBi); 0 (the reference)
  adds nothing. Only unscanned blocks (`scan_layers=False`) are supported.
  """

  def __init__(self, *, vocab_size: int, dim: int, num_heads: int, num_layers: int,
               mlp_ratio: int = 4, dropout: float = 0.1, dtype=jnp.float32,
               rope_base: float = 10000.0, head_init_scale: float = 0.0,
               distance_bias_slope: float = 0.0, scan_layers: bool = False,
               attention: Attention = Attention(), rngs: nnx.Rngs):
    if scan_layers:
      raise ValueError('The AR model runs its blocks unscanned (an nnx.List); scan_layers=True '
                       'is not supported for it.')
    if dim % num_heads != 0 or (dim // num_heads) % 2 != 0:
      raise ValueError(f'dim={dim} must split into num_heads={num_heads} heads of even width '
                       f'(rotary pairs features), got head width {dim / num_heads}.')
    if num_layers < 1:
      raise ValueError(f'num_layers must be >= 1, got {num_layers}.')
    if rope_base <= 1:
      raise ValueError(f'rope_base must be > 1 (10000 = the reference), got {rope_base}.')
    if distance_bias_slope < 0 or head_init_scale < 0:
      raise ValueError(f'distance_bias_slope and head_init_scale must be >= 0, got '
                       f'{distance_bias_slope} and {head_init_scale}.')
    self.vocab_size, self.dim = vocab_size, dim
    self.num_heads, self.num_layers = num_heads, num_layers
    self.mlp_ratio, self.dropout_rate, self.dtype = mlp_ratio, dropout, dtype
    self.rope_base, self.distance_bias_slope = rope_base, distance_bias_slope
    self.embed = SubtokenEmbed(vocab_size + 1, 1, dim, rngs=rngs)
    self.blocks = nnx.List([ARBlock(dim, num_heads, mlp_ratio, dropout, dtype=dtype, rngs=rngs,
                                    attention=attention)
                            for _ in range(num_layers)])
    self.final = ARFinalLayer(dim, vocab_size + 1, dtype=dtype, rngs=rngs,
                              head_init_scale=head_init_scale)

  def __call__(self, x_BxL: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """x (B, L) token ids in [0, C] -> float32 logits (B, L, C): the first C head outputs."""
    h_BxLxD = self.features(x_BxL, deterministic=deterministic, rngs=rngs)
    kernel_DxC, bias_C = self.head_weights()
    logits = jax.lax.dot_general(h_BxLxD, kernel_DxC, (((2,), (0,)), ((), ())))
    return (logits + bias_C).astype(jnp.float32)

  def head_weights(self) -> tuple[jax.Array, jax.Array]:
    """(kernel (D, C), bias (C,)) of the head over the C token classes, in the compute dtype."""
    return self.final.head_weights(self.vocab_size, self.dtype)

  def features(self, x_BxL: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """The head's input LN(trunk(x)) (B, L, D) in the compute dtype. Training
    (deterministic=False) needs `rngs`: a PRNG key or an nnx.Rngs (see layers.dropout_key)."""
    l = x_BxL.shape[1]
    deterministic = deterministic or self.dropout_rate == 0.0
    keys_S = None if deterministic else jax.random.split(dropout_key(rngs), self.num_layers)
    x_BxLxD = self.embed(x_BxL[..., None]).astype(jnp.float32)
    cos_LxH, sin_LxH = rotary_cos_sin(l, self.dim // self.num_heads, self.rope_base)
    bias_1xNxLxL = (distance_bias(l, self.num_heads, self.distance_bias_slope)
                    if self.distance_bias_slope > 0 else None)
    for i, block in enumerate(self.blocks):
      x_BxLxD = block(x_BxLxD, cos_LxH, sin_LxH, None if keys_S is None else keys_S[i],
                      deterministic, bias_1xNxLxL)
    return self.final.norm(x_BxLxD).astype(self.dtype)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token at this sequence length; see the module-level `flops_per_token`."""
    return flops_per_token(seq_len, vocab_size=self.vocab_size, dim=self.dim,
                           num_layers=self.num_layers, mlp_ratio=self.mlp_ratio)


def param_counts(*, vocab_size: int, dim: int, num_layers: int, mlp_ratio: int = 4,
                 **unused: Any) -> dict[str, int]:
  """Parameter counts by role: 'embedding' (the input table, a gather), 'per_token' (everything
  applied at every position: blocks, final LN, head) and 'total'."""
  del unused
  d, m, outputs = dim, mlp_ratio * dim, vocab_size + 1
  embedding = outputs * d
  block = 2 * d + 3 * d * d + d * d + (d * m + m) + (m * d + d)
  per_token = num_layers * block + d + (d * outputs + outputs)
  return dict(embedding=embedding, per_token=per_token, total=embedding + per_token)


def flops_per_token(seq_len: int, **model_kwargs: Any) -> float:
  """Forward + backward FLOPs per token for an MFU estimate, counted as the DiT's
  (`models.dit.flops_per_token`): 6 * per-token parameters + 12 * layers * dim * seq_len. The
  attention term counts the full L x L scores although half of them are masked: that is what a
  dense causal attention computes."""
  n = param_counts(**model_kwargs)['per_token']
  return 6.0 * n + 12.0 * model_kwargs['num_layers'] * model_kwargs['dim'] * seq_len
