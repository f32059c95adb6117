"""The authors' text checkpoints (Lightning `.ckpt`): DIT (MDLM), PerceiverDIT (Prime) and AR.

Layout facts (docs/official.md): every key of `state_dict` is 'backbone.' + the backbone's own key;
Linear weights are (out, in) (ours are (in, out)); the fused qkv output index is (which, head,
feature), so its transpose reshaped to (D, 3, D) is our kernel; LayerNorms have a weight and no
bias; the one buffer, `rotary_emb.inv_freq`, is 10000^(-2i/H) and holds no parameter. The EMA
weights are `ema['shadow_params']`, an unnamed list in `state_dict` order without that buffer.
The AR has no time embedding and no adaLN; otherwise the same names.
"""

from __future__ import annotations

import collections
from typing import Any, Iterator, Mapping

import numpy as np

from prime_jax import torchfile
from prime_jax.convert import common

PREFIX = 'backbone.'
INV_FREQ = 'rotary_emb.inv_freq'
LIGHTNING_VERSION = '2.2.1'  # the version the authors trained with

# (their name, our name, kind) per block; kind: 'linear' (transpose), 'qkv', 'vector'
_BLOCK = (('norm1.weight', 'norm1.scale', 'vector'),
          ('attn_qkv.weight', 'qkv.kernel', 'qkv'),
          ('attn_out.weight', 'attn_out.kernel', 'linear'),
          ('norm2.weight', 'norm2.scale', 'vector'),
          ('mlp.0.weight', 'mlp_in.kernel', 'linear'),
          ('mlp.0.bias', 'mlp_in.bias', 'vector'),
          ('mlp.2.weight', 'mlp_out.kernel', 'linear'),
          ('mlp.2.bias', 'mlp_out.bias', 'vector'),
          ('adaLN_modulation.weight', 'adaln.kernel', 'linear'),
          ('adaLN_modulation.bias', 'adaln.bias', 'vector'))
_TIME = (('sigma_map.mlp.0.weight', 'time_embed.fc1.kernel', 'linear'),
         ('sigma_map.mlp.0.bias', 'time_embed.fc1.bias', 'vector'),
         ('sigma_map.mlp.2.weight', 'time_embed.fc2.kernel', 'linear'),
         ('sigma_map.mlp.2.bias', 'time_embed.fc2.bias', 'vector'))
_FINAL = (('output_layer.norm_final.weight', 'final.norm.scale', 'vector'),
          ('output_layer.linear.weight', 'final.head.kernel', 'linear'),
          ('output_layer.linear.bias', 'final.head.bias', 'vector'),
          ('output_layer.adaLN_modulation.weight', 'final.adaln.kernel', 'linear'),
          ('output_layer.adaLN_modulation.bias', 'final.adaln.bias', 'vector'))


def names(num_layers: int, *, autoregressive: bool) -> list[tuple[str, str, str]]:
  """(their key without 'backbone.', our path, kind) in the authors' parameter order (= the order
  of `shadow_params`). Per-layer paths read 'blocks.<i>.'; a scanned stack is handled by `put`."""
  out = [('vocab_embed.embedding', 'embed.table', 'vector')]
  if not autoregressive:
    out += _TIME
  for i in range(num_layers):
    out += [(f'blocks.{i}.{a}', f'blocks.{i}.{b}', k) for a, b, k in _BLOCK
            if not (autoregressive and a.startswith('adaLN'))]
  out += [x for x in _FINAL if not (autoregressive and 'adaLN' in x[0])]
  return out


def state_dict_order(num_layers: int, *, autoregressive: bool) -> list[str]:
  """Their state-dict keys (without 'backbone.') in the file's order: the buffer sits after the
  time embedding (the module registration order)."""
  keys = [a for a, _, _ in names(num_layers, autoregressive=autoregressive)]
  at = 1 if autoregressive else 1 + len(_TIME)
  return keys[:at] + [INV_FREQ] + keys[at:]


def _to_ours(value: np.ndarray, kind: str) -> np.ndarray:
  if kind == 'linear':
    return np.ascontiguousarray(value.T)
  if kind == 'qkv':  # (3D, D) -> (D, 3, D)
    d = value.shape[1]
    return np.ascontiguousarray(value.T).reshape(d, 3, value.shape[0] // 3)
  return value


def _to_theirs(value: np.ndarray, kind: str) -> np.ndarray:
  if kind == 'linear':
    return np.ascontiguousarray(value.T)
  if kind == 'qkv':  # (D, 3, D) -> (3D, D)
    return np.ascontiguousarray(value.reshape(value.shape[0], -1).T)
  return value


def rope_base(inv_freq: np.ndarray) -> float:
  """The rotary base b of inv_freq = b^(-2i/H) (i < H/2)."""
  h = 2 * inv_freq.shape[0]
  return float(inv_freq[1] ** (-h / 2.0)) if inv_freq.shape[0] > 1 else 10000.0


def weights(ckpt: Mapping[str, Any], which: str, *, source: str) -> dict[str, Any]:
  """Their parameters by key (without 'backbone.'), lazily: the raw `state_dict` or the EMA list
  paired with the state-dict keys (the buffer left out)."""
  sd = ckpt.get('state_dict')
  if not isinstance(sd, Mapping):
    raise common.ConversionError(f'{source}: no state_dict: not a Lightning checkpoint.')
  bad = [k for k in sd if not k.startswith(PREFIX)]
  if bad:
    raise common.ConversionError(f'{source}: state_dict key {bad[0]!r} lacks the {PREFIX!r} '
                                 'prefix of the authors\' Diffusion module.')
  params = collections.OrderedDict((k[len(PREFIX):], v) for k, v in sd.items()
                                   if k != PREFIX + INV_FREQ)
  if which == 'raw':
    return params
  ema = ckpt.get('ema')
  shadow = ema.get('shadow_params') if isinstance(ema, Mapping) else None
  if not isinstance(shadow, list):
    raise common.ConversionError(
        f'{source}: the file has no EMA weights (ema.shadow_params); it was trained without EMA '
        '(training.ema=0). Convert its raw weights with --weights raw.')
  if len(shadow) != len(params):
    raise common.ConversionError(
        f'{source}: {len(shadow)} EMA tensors for {len(params)} parameters in state_dict: the '
        'lists do not pair.')
  out = collections.OrderedDict()
  for (key, raw), ema_t in zip(params.items(), shadow):
    if tuple(raw.shape) != tuple(ema_t.shape):
      raise common.ConversionError(f'{source}: EMA tensor for {key!r} has shape '
                                   f'{tuple(ema_t.shape)}, the weight {tuple(raw.shape)}.')
    out[key] = ema_t
  return out


def import_params(theirs: Mapping[str, Any], tree: common.ParamTree, num_layers: int, *,
                  autoregressive: bool, scanned: bool) -> None:
  """Fills `tree` from their tensors, one at a time; every tensor of the file must be used."""
  expected = names(num_layers, autoregressive=autoregressive)
  want = {a for a, _, _ in expected}
  extra = [k for k in theirs if k not in want]
  if extra:
    raise common.ConversionError(
        f'{tree.source}: tensor {PREFIX}{extra[0]!r} has no place in this config\'s model '
        f'({len(extra)} such tensors; a deeper model, or another architecture). {tree.hint}')
  stacks: dict[str, list] = collections.defaultdict(list)
  for their, ours, kind in expected:
    if their not in theirs:
      raise common.ConversionError(f'{tree.source}: the file has no tensor {PREFIX}{their!r}, '
                                   f'which this config\'s model needs ({ours}). {tree.hint}')
    value = _to_ours(common.array(theirs[their]), kind)
    if scanned and ours.startswith('blocks.'):
      stacks[ours.split('.', 2)[2]].append((their, value))
    else:
      tree.put(ours, value, PREFIX + their)
  for path, items in stacks.items():
    tree.put(f'blocks.{path}', np.stack([v for _, v in items]), PREFIX + items[0][0])


def export_params(params: Mapping[str, np.ndarray], num_layers: int, *, autoregressive: bool,
                  scanned: bool) -> Iterator[tuple[str, np.ndarray]]:
  """(their key without 'backbone.', tensor) in their parameter order, from our dotted paths."""
  for their, ours, kind in names(num_layers, autoregressive=autoregressive):
    if scanned and ours.startswith('blocks.'):
      i, rest = ours.split('.', 2)[1:]
      value = params[f'blocks.{rest}'][int(i)]
    else:
      value = params[ours]
    yield their, _to_theirs(np.asarray(value), kind)


def lightning_checkpoint(raw: Mapping[str, np.ndarray], ema: Mapping[str, np.ndarray], *,
                         num_layers: int, head_dim: int, autoregressive: bool, scanned: bool,
                         step: int, ema_decay: float) -> dict[str, Any]:
  """A checkpoint the authors' `Diffusion.load_from_checkpoint` reads (with their config and
  tokenizer passed, as their evaluation does): their keys, the inv_freq buffer, EMA in their
  list, the progress counters their `on_load_checkpoint` reads. No optimizer state."""
  raw_t = dict(export_params(raw, num_layers, autoregressive=autoregressive, scanned=scanned))
  ema_t = [v for _, v in export_params(ema, num_layers, autoregressive=autoregressive,
                                       scanned=scanned)]
  # As torch computes it, in float32: 1 / 10000 ** (arange(0, H, 2).float() / H).
  exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv_freq = np.float32(1.0) / np.power(np.float32(10000.0), exponent)
  sd = collections.OrderedDict()
  for key in state_dict_order(num_layers, autoregressive=autoregressive):
    sd[PREFIX + key] = inv_freq.astype(np.float32) if key == INV_FREQ else raw_t[key]
  progress = {'ready': 0, 'completed': 0, 'started': 0, 'processed': 0}
  batches = {'total': dict(progress, ready=step, completed=step, started=step, processed=step),
             'current': dict(progress, ready=step, completed=step, started=step, processed=step)}
  return collections.OrderedDict([
      ('epoch', 0), ('global_step', int(step)),
      ('pytorch-lightning_version', LIGHTNING_VERSION), ('state_dict', sd),
      ('loops', {'fit_loop': {
          'state_dict': {},
          'epoch_progress': {'total': dict(progress), 'current': dict(progress)},
          'epoch_loop.state_dict': {'_batches_that_stepped': int(step)},
          'epoch_loop.batch_progress': batches}}),
      ('callbacks', {}), ('hparams_name', 'kwargs'), ('hyper_parameters', {}),
      ('ema', {'decay': float(ema_decay), 'num_updates': int(step), 'shadow_params': ema_t}),
      ('sampler', {'random_state': None})])


def file_config(ckpt: Mapping[str, Any]) -> dict[str, Any]:
  """The training config the authors stored (an omegaconf DictConfig, read as inert stubs) as a
  plain nested dict; {} when absent."""
  hp = ckpt.get('hyper_parameters')
  cfg = hp.get('config') if isinstance(hp, Mapping) else None
  return _plain(cfg) if cfg is not None else {}


def _plain(node: Any) -> Any:
  if isinstance(node, torchfile.Stub):
    state = node.state if isinstance(node.state, dict) else {}
    if '_content' in state:
      content = state['_content']
      if isinstance(content, dict):
        return {k: _plain(v) for k, v in content.items()}
      if isinstance(content, list):
        return [_plain(v) for v in content]
      return content
    if '_val' in state:
      return _plain(state['_val'])
    return repr(node)
  if isinstance(node, dict):
    return {k: _plain(v) for k, v in node.items()}
  if isinstance(node, list):
    return [_plain(v) for v in node]
  return node
