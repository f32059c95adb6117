"""Attention implementations of the text models: `model.attention = 'xla' | 'splash' | 'cudnn'`.

Dimension key: B batch, L tokens, N heads, H head width.

  xla     jax.nn.dot_product_attention with XLA's choice of kernel (materialises the L x L scores
          where XLA does); every backend, every option (causal, the distance penalty).
  splash  the Pallas TPU splash-attention kernel (full or causal mask, block sizes from the config;
          forward and backward are Pallas kernels). Off TPU it runs in interpret mode (how the CPU
          tests check it against 'xla'). No additive bias: the distance penalty is refused.
          Under a mesh set with `jax.set_mesh` it runs per shard (shard_map over the batch axes
          'data'/'fsdp' and the heads over 'tensor').
  cudnn   cuDNN flash attention (`implementation='cudnn'`): NVIDIA GPUs, bf16 or fp16 compute
          (model.dtype='bfloat16'); refused with a clear message elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('xla', 'splash', 'cudnn')


@dataclasses.dataclass(frozen=True)
class Attention:
  implementation: str = 'xla'
  block_q: int = 512  # splash tile sizes: multiples of 128, capped at L, dividing L
  block_kv: int = 512
  interpret: Optional[bool] = None  # splash: None = interpret unless the backend is TPU

  def __post_init__(self):
    if self.implementation not in IMPLEMENTATIONS:
      raise ValueError(f'model.attention={self.implementation!r}: choose one of '
                       f'{list(IMPLEMENTATIONS)}.')
    if self.block_q < 1 or self.block_kv < 1:
      raise ValueError(f'model.attention_block=({self.block_q}, {self.block_kv}) must be '
                       'positive.')

  def __call__(self, q_BxLxNxH: jax.Array, k_BxLxNxH: jax.Array, v_BxLxNxH: jax.Array, *,
               causal: bool = False, bias: Optional[jax.Array] = None) -> jax.Array:
    if self.implementation == 'xla':
      return jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, bias=bias,
                                          is_causal=causal, implementation=None)
    if self.implementation == 'cudnn':
      if jax.default_backend() != 'gpu':
        raise ValueError(f"model.attention='cudnn' is cuDNN flash attention on NVIDIA GPUs; this "
                         f"run's backend is {jax.default_backend()}: use 'xla' (or 'splash' on "
                         'TPU).')
      if q_BxLxNxH.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError("model.attention='cudnn' needs bf16 or fp16 compute: set "
                         "model.dtype='bfloat16'.")
      return jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, bias=bias,
                                          is_causal=causal, implementation='cudnn')
    if bias is not None:
      raise ValueError("model.attention='splash' takes no additive bias: set "
                       "model.distance_bias_slope=0 or use model.attention='xla'.")
    return self._splash(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, causal)

  def _splash(self, q, k, v, causal: bool) -> jax.Array:
    _, seq, heads, width = q.shape
    bq, bkv = min(self.block_q, seq), min(self.block_kv, seq)
    if seq % bq or seq % bkv or bq % 128 or bkv % 128:
      raise ValueError(f'splash attention: the blocks ({bq}, {bkv}) must be multiples of 128 (the '
                       f'TPU lane width) that divide the sequence length {seq}; set '
                       'model.attention_block (and a data.seq_len that is a multiple of 128).')
    interpret = _compiled_for() != 'tpu' if self.interpret is None else self.interpret
    mesh = jax.sharding.get_abstract_mesh()
    head_shards = mesh.shape.get('tensor', 1) if not mesh.empty else 1
    if heads % head_shards:
      raise ValueError(f'splash attention: {heads} heads do not split over tensor={head_shards}.')
    kernel = _splash_kernel(seq, heads // head_shards, causal, bq, bkv, interpret)
    scale = 1.0 / math.sqrt(width)

    def attend(q_, k_, v_):  # (b, L, n, H) -> (b, L, n, H), one shard
      t = lambda x: jnp.swapaxes(x, 1, 2)
      out = jax.vmap(kernel)(t(q_ * jnp.asarray(scale, q_.dtype)), t(k_), t(v_))
      return t(out).astype(q_.dtype)

    if mesh.empty:
      return attend(q, k, v)
    batch_axes = tuple(a for a in ('data', 'fsdp') if mesh.shape.get(a, 1) > 1) or None
    head_axis = 'tensor' if head_shards > 1 else None
    spec = jax.sharding.PartitionSpec(batch_axes, None, head_axis, None)
    return jax.shard_map(attend, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q, k, v)


def _compiled_for() -> str:
  """The platform of the mesh set by `jax.set_mesh` (TPU when compiling ahead of time for a
  topology on a CPU machine), else the default backend's."""
  device = getattr(jax.sharding.get_abstract_mesh(), 'abstract_device', None)
  return getattr(device, 'platform', None) or jax.default_backend()


@functools.lru_cache(maxsize=32)
def _splash_kernel(seq: int, heads: int, causal: bool, bq: int, bkv: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=import-outside-toplevel
    splash_attention_kernel as kernel_lib,
  )
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=import-outside-toplevel
    splash_attention_mask as mask_lib,
  )
  one = mask_lib.CausalMask((seq, seq)) if causal else mask_lib.FullMask((seq, seq))
  mask = mask_lib.MultiHeadMask([one] * heads)
  blocks = kernel_lib.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                                 block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                                 block_q_dq=bq, block_kv_dq=bkv)
  return kernel_lib.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
