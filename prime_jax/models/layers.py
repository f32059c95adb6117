"""NNX building blocks shared by the models: PyTorch-style dense layers, a bias-free LayerNorm.

Dimension key:
  B: batch    L: sequence length    D: model width    I: input features    O: output features

Why not `nnx.Linear` / `nnx.LayerNorm`: the reference initialises every Linear with PyTorch's
U(+-1/sqrt(fan_in)) for weights AND biases, some kernels are multi-axis (the fused qkv kernel is
(D, 3, D) so that tensor parallelism can split heads cleanly), and every parameter carries a logical
axis name. One small `Dense` keeps all three in one place.

Sharding: every parameter is created through
`nnx.with_partitioning(init, names, eager_sharding=False)`. The logical names are metadata only
(read them with `nnx.get_partition_spec`); the model never needs a mesh, and `prime_jax/sharding.py`
decides placement (map names to mesh axes, jit the initialiser with out_shardings). Eager sharding
is off per variable because Flax 0.12's default would otherwise demand a mesh context for every
construction, CPU tests included.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]


def uniform_init(bound: float) -> Initializer:
  """U(-bound, +bound): PyTorch's Linear/Embedding default with bound = 1/sqrt(fan_in)."""

  def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def zeros_init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  del key
  return jnp.zeros(shape, dtype)


def ones_init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  del key
  return jnp.ones(shape, dtype)


class HeadParam(nnx.Param):
  """A parameter of a model's output head. Models declare their head with it; the optimizer gives
  the head its own group (`optim.head_b2`) by this type, never by parameter names."""


def make_param(init: Initializer, names: tuple[str, ...], shape: tuple[int, ...],
               rngs: nnx.Rngs, param_dtype=jnp.float32,
               param_type: type[nnx.Param] = nnx.Param) -> nnx.Param:
  """A Param with logical axis names; `len(names) == len(shape)` is enforced to catch typos."""
  if len(names) != len(shape):
    raise ValueError(f'Logical names {names} do not match the parameter shape {shape}.')
  init = nnx.with_partitioning(init, names, eager_sharding=False)
  return param_type(init(rngs.params(), shape, param_dtype))


class Dense(nnx.Module):
  """x @ W + b with W of shape (I, *out_shape), PyTorch init, and logical axis names.

  `names` covers the kernel axes (input first); the bias takes the output names. `zero_init` makes
  both kernel and bias zero (adaLN modulation, output head); otherwise both are U(±init_scale /
  sqrt(I)) (init_scale 1: PyTorch's Linear). The matmul runs in `dtype`; params stay
  in `param_dtype`, so bf16 compute keeps float32 master weights.
  """

  def __init__(self, in_features: int, out_shape: int | tuple[int, ...], *,
               names: tuple[str, ...], use_bias: bool = True, zero_init: bool = False,
               init_scale: float = 1.0, dtype=jnp.float32, param_dtype=jnp.float32,
               param_type: type[nnx.Param] = nnx.Param, rngs: nnx.Rngs):
    out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
    init = zeros_init if zero_init else uniform_init(init_scale / math.sqrt(in_features))
    self.kernel = make_param(init, names, (in_features, *out_shape), rngs, param_dtype, param_type)
    self.bias = (make_param(init, names[1:], out_shape, rngs, param_dtype, param_type) if use_bias
                 else nnx.data(None))
    self.dtype = dtype

  def __call__(self, x_BxI: jax.Array) -> jax.Array:
    kernel = self.kernel[...].astype(self.dtype)
    y = jax.lax.dot_general(x_BxI.astype(self.dtype), kernel,
                            (((x_BxI.ndim - 1,), (0,)), ((), ())))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm with a weight and no bias, always computed in float32 (the reference's fp32 LN)."""

  def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.scale = make_param(ones_init, ('embed',), (dim,), rngs, param_dtype)
    self.eps = eps

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x = x_BxLxD.astype(jnp.float32)
    mean = x.mean(axis=-1, keepdims=True)
    var = jnp.square(x - mean).mean(axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)


def dropout_key(rngs: nnx.Rngs | nnx.RngStream | jax.Array | None) -> jax.Array:
  """One PRNG key for a model's dropout from nnx.Rngs (its 'dropout' stream), a stream, or a key."""
  if rngs is None:
    raise ValueError('deterministic=False needs `rngs` (a PRNG key or nnx.Rngs) for dropout.')
  if isinstance(rngs, nnx.Rngs):
    return rngs.dropout()
  if isinstance(rngs, nnx.RngStream):
    return rngs()
  return rngs


class OutputHead(nnx.Module):
  """The Linear(D -> O) output head of the text models (the DiT's and the AR's `final.head`),
  zero-initialised, or U(±init_scale / sqrt(D)) with init_scale > 0 (1 is PyTorch's default); the
  bias starts at zero. Its parameters are `HeadParam`s: their own optimizer group."""

  def __init__(self, dim: int, num_outputs: int, *, dtype, rngs: nnx.Rngs,
               init_scale: float = 0.0):
    self.kernel = make_param(zeros_init, ('embed', 'vocab'), (dim, num_outputs), rngs,
                             jnp.float32, HeadParam)
    self.bias = make_param(zeros_init, ('vocab',), (num_outputs,), rngs, jnp.float32, HeadParam)
    if init_scale > 0:  # drawn third, so the random streams of existing runs stay as they were
      self.kernel = make_param(uniform_init(init_scale / math.sqrt(dim)), ('embed', 'vocab'),
                               (dim, num_outputs), rngs, jnp.float32, HeadParam)
    self.dtype = dtype

  def set_bias(self, bias_C: jax.Array) -> None:
    """Sets the first len(bias_C) output biases (e.g. the training unigram's log-probabilities)."""
    n = min(self.bias.shape[0], bias_C.shape[0])
    self.bias[...] = self.bias[...].at[:n].set(bias_C[:n])

  def weights(self, num_classes: int, dtype) -> tuple[jax.Array, jax.Array]:
    """(kernel (D, num_classes), bias (num_classes,)) of the first `num_classes` outputs."""
    return (self.kernel[...].astype(dtype)[:, :num_classes],
            self.bias[...].astype(dtype)[:num_classes])


# -- rematerialisation ---------------------------------------------------------------------------

# model.remat: what the backward pass keeps of each block's forward pass (one block = one DiT layer
# or one UNet resolution block); everything else is recomputed.
REMAT_POLICIES = {
    'none': None,  # keep everything (no remat)
    'full': jax.checkpoint_policies.nothing_saveable,  # keep only the block inputs
    # keep every matmul output (the attention scores included): cheapest recompute
    'dots': jax.checkpoint_policies.dots_saveable,
    # keep the weight matmuls' outputs, recompute the attention scores and everything elementwise
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_name(value) -> str:
  """model.remat as a policy name; booleans (configs before policies had names) map to 'full' and
  'none'."""
  if isinstance(value, bool):
    return 'full' if value else 'none'
  if value not in REMAT_POLICIES:
    raise ValueError(f'model.remat={value!r}: choose one of {list(REMAT_POLICIES)}.')
  return value


def remat(fn: Callable, policy, *, prevent_cse: bool = True) -> Callable:
  """fn under nnx.remat with the named policy ('none' and False: fn itself)."""
  name = remat_name(policy)
  if name == 'none':
    return fn
  return nnx.remat(fn, policy=REMAT_POLICIES[name], prevent_cse=prevent_cse)
