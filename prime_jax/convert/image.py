"""The authors' image checkpoints (`.pth`): the discrete UNet in their EMA wrapper.

Layout facts (docs/official.md, "The authors' layouts"; from the format description, not
from the authors' code): the `.pth`'s `model` entry is the EMA wrapper's state dict, in this
order: `num_updates` (an int64 0-d tensor, the optimizer step), `model.<name>` (the raw
weights), `shadow_params.N` (the EMA value of the N-th `model.*` entry). The inner names are
`pixel_embedding.embedding_table.weight` (one (b+1, E/ell) table) and, under `unet.`:
  input_blocks.k    k = 0 is an identity; k >= 1 is our `down[k - 1]` (a downsampler: no tensors)
  middle_block.0/1/2    our `mid.res` / `mid.attn` / `mid_res`
  output_blocks.k   our `up[k]`; `.0` a residual block, `.1` an attention block where there is one
  out.0 / out.2     our `out_norm` / `out_conv`
A residual block: in_layers.0 (GroupNorm), in_layers.2 (3x3 conv), emb_layers.embedding_table
((1, 2D): the constant FiLM (scale, shift)), out_layers.0 (GroupNorm), out_layers.3 (3x3 conv),
skip_connection (1x1 conv, only when the width changes). An attention block: norm, qkv (1-D conv
(3D, D, 1), output channel k D + h Hd + i = component k, head h, feature i), proj_out ((D, D, 1)).
Conv weights are (out, in, kh, kw) (ours HWIO); GroupNorm weight/bias are our scale/bias.

The same names cover MDM (ell = 1: a 257-row table, C * 257 output channels with the mask class,
our `mask_logit_in_head`); that variant's names are assumed, not checked against a file.

Shapes reveal the widths, depth, attention placement, ell and the output head, so a config that
differs in those fails naming the tensor and both shapes. They cannot reveal head_channels (the qkv
layout is the same for any head count) or norm_groups: those must come from the setup's config.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Collection, Mapping, Optional, Union

import numpy as np
from flax import nnx

from prime_jax import torchfile
from prime_jax.convert import common

RAW = 'model.'  # the EMA wrapper's prefix of the raw weights
SHADOW = 'shadow_params.'
NUM_UPDATES = 'num_updates'
WEIGHTS = ('ema', 'raw')
HINT = ('Use the config of the setup the file comes from, or set model.unet (model_channels, '
        'channel_mult, num_res_blocks, attention_resolutions) and diffusion.ell to the file\'s.')

# kind -> (theirs -> ours, ours -> theirs, our shape -> their shape). Every one is a transpose or a
# reshape: values are copied bit for bit both ways. A file tensor's shape is compared with the
# expected one before it is transformed.
_Kind = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray],
              Callable[[tuple], tuple]]
_KINDS: dict[str, _Kind] = {
    'copy': (lambda w: w, lambda w: w, lambda s: s),
    # (O, I, kh, kw) <-> (kh, kw, I, O)
    'conv': (lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1),
             lambda s: (s[3], s[2], s[0], s[1])),
    # 1x1 conv (O, I, 1, 1) <-> Dense (I, O)
    'conv1x1': (lambda w: w[:, :, 0, 0].T, lambda w: w.T[:, :, None, None],
                lambda s: (s[1], s[0], 1, 1)),
    # 1-D conv (O, I, 1) <-> Dense (I, O)
    'conv1d': (lambda w: w[:, :, 0].T, lambda w: w.T[:, :, None], lambda s: (s[1], s[0], 1)),
    # (1, 2D) <-> (2D,)
    'film': (lambda w: w[0], lambda w: w[None], lambda s: (1, s[0])),
    # qkv (3D, I, 1), output index (k, h, i) <-> our fused (I, 3, D), D index (h, i)
    'qkv': (lambda w: w[:, :, 0].reshape(3, -1, w.shape[1]).transpose(2, 0, 1),
            lambda w: w.transpose(1, 2, 0).reshape(-1, w.shape[0])[:, :, None],
            lambda s: (s[1] * s[2], s[0], 1)),
    'qkv_bias': (lambda b: b.reshape(3, -1), lambda b: b.reshape(-1), lambda s: (s[0] * s[1],)),
}


def _res(theirs: str, ours: str, paths: Collection[str]) -> list[tuple[str, str, str]]:
  out = [(f'{theirs}.in_layers.0.weight', f'{ours}.in_norm.scale', 'copy'),
         (f'{theirs}.in_layers.0.bias', f'{ours}.in_norm.bias', 'copy'),
         (f'{theirs}.in_layers.2.weight', f'{ours}.in_conv.kernel', 'conv'),
         (f'{theirs}.in_layers.2.bias', f'{ours}.in_conv.bias', 'copy'),
         (f'{theirs}.emb_layers.embedding_table', f'{ours}.film', 'film'),
         (f'{theirs}.out_layers.0.weight', f'{ours}.out_norm.scale', 'copy'),
         (f'{theirs}.out_layers.0.bias', f'{ours}.out_norm.bias', 'copy'),
         (f'{theirs}.out_layers.3.weight', f'{ours}.out_conv.kernel', 'conv'),
         (f'{theirs}.out_layers.3.bias', f'{ours}.out_conv.bias', 'copy')]
  if f'{ours}.skip.kernel' in paths:
    out += [(f'{theirs}.skip_connection.weight', f'{ours}.skip.kernel', 'conv1x1'),
            (f'{theirs}.skip_connection.bias', f'{ours}.skip.bias', 'copy')]
  return out


def _attn(theirs: str, ours: str) -> list[tuple[str, str, str]]:
  return [(f'{theirs}.norm.weight', f'{ours}.norm.scale', 'copy'),
          (f'{theirs}.norm.bias', f'{ours}.norm.bias', 'copy'),
          (f'{theirs}.qkv.weight', f'{ours}.qkv.kernel', 'qkv'),
          (f'{theirs}.qkv.bias', f'{ours}.qkv.bias', 'qkv_bias'),
          (f'{theirs}.proj_out.weight', f'{ours}.proj.kernel', 'conv1d'),
          (f'{theirs}.proj_out.bias', f'{ours}.proj.bias', 'copy')]


def _stage(theirs: str, ours: str, paths: Collection[str]) -> list[tuple[str, str, str]]:
  out = _res(f'{theirs}.0', f'{ours}.res', paths)
  if f'{ours}.attn.norm.scale' in paths:
    out += _attn(f'{theirs}.1', f'{ours}.attn')
  return out


def _indices(paths: Collection[str], head: str) -> list[int]:
  return sorted({int(p.split('.')[1]) for p in paths if p.startswith(head + '.')})


def names(paths: Collection[str], *, source: str = '') -> list[tuple[str, str, str]]:
  """(their inner key, without 'model.'; our dotted path; kind) for every parameter of our UNet
  with these parameter paths, in the authors' state-dict order (= the order of shadow_params)."""
  paths = set(paths)
  timed = sorted(p for p in paths if p.startswith('time_fc') or p.endswith('film.kernel'))
  if timed:
    raise common.ConversionError(
        f'{source}: this config\'s UNet is time-conditioned ({timed[0]}); the authors\' image '
        'models ignore time (a constant FiLM vector per block). Set '
        'model.time_conditioning=False.')
  down, up = _indices(paths, 'down'), _indices(paths, 'up')
  if not down or not up:
    raise common.ConversionError(f'{source}: these parameters are not a prime_jax UNet\'s.')
  out = [('pixel_embedding.embedding_table.weight', 'embed.table', 'copy')]
  for i in down:  # the indices missing from `down` are the downsamplers (no tensors)
    out += _stage(f'unet.input_blocks.{i + 1}', f'down.{i}', paths)
  out += _res('unet.middle_block.0', 'mid.res', paths)
  out += _attn('unet.middle_block.1', 'mid.attn')
  out += _res('unet.middle_block.2', 'mid_res', paths)
  for k in up:
    out += _stage(f'unet.output_blocks.{k}', f'up.{k}', paths)
  out += [('unet.out.0.weight', 'out_norm.scale', 'copy'),
          ('unet.out.0.bias', 'out_norm.bias', 'copy'),
          ('unet.out.2.weight', 'out_conv.kernel', 'conv'),
          ('unet.out.2.bias', 'out_conv.bias', 'copy')]
  return out


def expected_keys(abstract_params: nnx.State) -> 'collections.OrderedDict[str, tuple]':
  """The `model.*` keys (their state-dict order) and shapes a `.pth` must hold for this config."""
  tree = common.ParamTree(abstract_params, source='')
  return collections.OrderedDict((f'{RAW}{their}', _KINDS[kind][2](tree.shape(ours)))
                                 for their, ours, kind in names(tree.paths()))


def file_weights(model_sd: Mapping[str, Any], weights: str = 'ema', *,
                 source: str = '') -> 'collections.OrderedDict[str, Any]':
  """Their inner key (without 'model.') -> tensor (lazy: a torchfile.Tensor is read on use), in
  the file's order: the raw `model.*` tensors, or the `shadow_params.N` paired with the N-th."""
  if weights not in WEIGHTS:
    raise ValueError(f'weights must be one of {WEIGHTS}, got {weights!r}.')
  if not isinstance(model_sd, Mapping):
    raise common.ConversionError(f'{source}: the `model` entry is a {type(model_sd).__name__}, '
                                 'not the EMA wrapper\'s state dict.')
  if 'model' in model_sd and isinstance(model_sd['model'], Mapping):
    raise common.ConversionError(f'{source}: pass the checkpoint\'s `model` entry (the EMA '
                                 'wrapper\'s state dict), not the whole checkpoint.')
  raw = collections.OrderedDict((k[len(RAW):], v) for k, v in model_sd.items()
                                if k.startswith(RAW))
  if not raw:
    raise common.ConversionError(
        f'{source}: the `model` state dict has no {RAW}* keys (it holds {list(model_sd)[:4]}): '
        'not the EMA wrapper\'s (the authors train with --use_ema, and their loader reads nothing '
        'from a file without it).')
  shadow = {k: v for k, v in model_sd.items() if k.startswith(SHADOW)}
  other = [k for k in model_sd if k != NUM_UPDATES and not k.startswith((RAW, SHADOW))]
  if other:
    raise common.ConversionError(f'{source}: unexpected entry {other[0]!r} in the `model` state '
                                 f'dict ({len(other)} such); expected num_updates, model.*, '
                                 'shadow_params.*.')
  if weights == 'raw':
    return raw
  if not shadow:
    raise common.ConversionError(f'{source}: the file has no EMA weights (shadow_params.*); '
                                 'convert its raw weights (weights=\'raw\').')
  want = [f'{SHADOW}{n}' for n in range(len(raw))]
  if sorted(shadow) != sorted(want):
    raise common.ConversionError(
        f'{source}: {len(shadow)} shadow_params for {len(raw)} {RAW}* tensors, or not numbered '
        f'0..{len(raw) - 1}: the EMA copies do not pair with the weights.')
  out = collections.OrderedDict()
  for (key, r), s in zip(raw.items(), want):
    if tuple(r.shape) != tuple(shadow[s].shape):
      raise common.ConversionError(f'{source}: {s} has shape {tuple(shadow[s].shape)}, but the '
                                   f'weight it pairs with, {RAW}{key}, has {tuple(r.shape)}.')
    out[key] = shadow[s]
  return out


def import_unet(model_sd: Mapping[str, Any], abstract_params: nnx.State, *, weights: str = 'ema',
                source: str = '', hint: str = HINT) -> nnx.State:
  """Our UNet's parameters (an nnx State of numpy arrays, shaped like `abstract_params`) from the
  `.pth`'s `model` entry: its EMA weights ('ema', what the authors evaluate) or its raw ones.

  Every tensor of the chosen set must have a place in the model and every parameter must be
  filled; a tensor whose shape differs from the config's is named with both shapes.
  """
  source = source or 'the checkpoint'
  theirs = file_weights(model_sd, weights, source=source)
  tree = common.ParamTree(abstract_params, source=source, hint=hint)
  plan = {their: (ours, kind) for their, ours, kind in names(tree.paths(), source=source)}
  extra = [k for k in theirs if k not in plan]
  if extra:
    raise common.ConversionError(
        f'{source}: tensor {RAW}{extra[0]} has no place in this config\'s model ({len(extra)} such '
        f'tensors: another depth or attention placement). {hint}'.strip())
  for n, (their, tensor) in enumerate(theirs.items()):
    ours, kind = plan[their]
    to_ours, _, their_shape = _KINDS[kind]
    have, want = tuple(tensor.shape), their_shape(tree.shape(ours))
    label = f'{RAW}{their}' + (f' (EMA: {SHADOW}{n})' if weights == 'ema' else '')
    if have != want:
      raise common.ConversionError(
          f'{source}: tensor {label} has shape {have}, but this config\'s model needs {want} there '
          f'({ours}, {tree.shape(ours)} in our layout). {hint}'.strip())
    tree.put(ours, np.ascontiguousarray(to_ours(common.array(tensor))), label)
  missing = [k for k in plan if k not in theirs]
  if missing:
    raise common.ConversionError(
        f'{source}: the file has no tensor {RAW}{missing[0]}, which this config\'s model needs '
        f'({plan[missing[0]][0]}; {len(missing)} such). {hint}'.strip())
  return tree.state()


def _by_path(params: Union[nnx.State, Mapping[str, Any]]) -> dict[str, np.ndarray]:
  if isinstance(params, nnx.State):
    return common.by_path(params)
  return {k: np.asarray(v) for k, v in params.items()}


def export_unet(params: Union[nnx.State, Mapping[str, Any]],
                ema: Optional[Union[nnx.State, Mapping[str, Any]]], *,
                num_updates: int) -> 'collections.OrderedDict[str, np.ndarray]':
  """The `.pth`'s `model` entry (the EMA wrapper's state dict) from our raw and EMA parameters (nnx
  States or dotted path -> array): `num_updates` (int64, 0-d), `model.*` in their state-dict order,
  `shadow_params.N`. `ema=None` writes the raw weights as the EMA too. Exact: `import_unet` of the
  result gives back `params` / `ema` bit for bit."""
  raw = _by_path(params)
  shadow = raw if ema is None else _by_path(ema)
  plan = names(raw)
  covered = {ours for _, ours, _ in plan}
  stray = sorted(set(raw) - covered) + sorted(set(shadow) ^ set(raw))
  if stray:
    raise common.ConversionError(f'parameter {stray[0]!r} has no place in the authors\' image '
                                 'format (or the EMA parameters differ from the raw ones).')
  out = collections.OrderedDict([(NUM_UPDATES, np.asarray(int(num_updates), np.int64))])
  for which, values in ((RAW, raw), (SHADOW, shadow)):
    for n, (their, ours, kind) in enumerate(plan):
      value = np.ascontiguousarray(_KINDS[kind][1](np.asarray(values[ours])))
      out[f'{RAW}{their}' if which == RAW else f'{SHADOW}{n}'] = value
  return out


def describe(args: Any) -> dict[str, Any]:
  """The training command's options stored in the `.pth`'s `args` (an argparse.Namespace, read as
  an inert torchfile.Stub; a real Namespace or a dict also do) as a plain JSON-able dict, e.g.
  dataset, vocab_size, target_length (ell), base, carry_over, super_token, schedule_n, nfe,
  epsilon, temperature_parameters, use_corrector_step, corrector_parameters,
  use_timestep_scheduler, timestep_parameters, use_ema, lr, batch_size, epochs. {} when absent."""
  if args is None:
    return {}
  if isinstance(args, torchfile.Stub):
    state = args.state if args.state is not None else args.kwargs
  elif isinstance(args, Mapping):
    state = args
  else:
    state = getattr(args, '__dict__', None)
  if isinstance(state, tuple) and state and isinstance(state[0], Mapping):
    state = state[0]  # (dict, slots) state
  if not isinstance(state, Mapping):
    raise common.ConversionError(f'the checkpoint\'s args ({type(args).__name__}) hold no '
                                 'options: not the authors\' argparse.Namespace.')
  return {str(k): _plain(v) for k, v in state.items()}


def _plain(value: Any) -> Any:
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (np.generic, np.ndarray)) and np.ndim(value) == 0:
    return value.item()
  return repr(value)
