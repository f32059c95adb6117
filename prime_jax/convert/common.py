"""What every mapping between the authors' tensors and our parameters shares.

Our parameters are addressed by dotted paths into the model's pure parameter dict
(`nnx.to_pure_dict`; list entries by their index), e.g. 'blocks.0.qkv.kernel'. A mapping fills a
`ParamTree` one tensor at a time; every tensor is checked against the config's shape as it arrives,
so a config that cannot hold the file fails at the first mismatching tensor, naming both.
"""

from __future__ import annotations

import collections
from typing import Any, Iterator, Union

import jax
import numpy as np
from flax import nnx

from prime_jax import torchfile


class ConversionError(ValueError):
  """The file does not fit the config (or is not the kind of checkpoint the config describes)."""


def array(x: Union[torchfile.Tensor, np.ndarray, Any]) -> np.ndarray:
  """A numpy array from a tensor of the file (read now) or anything array-like."""
  return x.numpy() if isinstance(x, torchfile.Tensor) else np.asarray(x)


def _split(path: str) -> tuple[Union[str, int], ...]:
  return tuple(int(p) if p.isdigit() else p for p in path.split('.'))


class ParamTree:
  """Our parameters, filled by dotted path from the file's tensors, shape-checked on arrival.

  `abstract` is the model's abstract parameter State (build.abstract_params); `source` names the
  file in messages; `hint` is appended to a mismatch message (which config field to change).
  """

  def __init__(self, abstract: nnx.State, *, source: str, hint: str = ''):
    self._abstract = abstract
    self._shapes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(abstract)):
      self._shapes[tuple(getattr(k, 'key', getattr(k, 'idx', None)) for k in path)] = (
          tuple(leaf.shape), np.dtype(leaf.dtype))
    self._values: dict[tuple, np.ndarray] = {}
    self.source, self.hint = source, hint

  def paths(self) -> list[str]:
    return ['.'.join(map(str, p)) for p in self._shapes]

  def shape(self, path: str) -> tuple[int, ...]:
    return self._shapes[_split(path)][0]

  def put(self, path: str, value: np.ndarray, their_key: str) -> None:
    key = _split(path)
    if key not in self._shapes:
      raise ConversionError(
          f'{self.source}: tensor {their_key!r} maps to {path!r}, which this config\'s model does '
          f'not have (a different architecture or depth). {self.hint}'.strip())
    want, dtype = self._shapes[key]
    value = np.asarray(value)
    if tuple(value.shape) != want:
      raise ConversionError(
          f'{self.source}: tensor {their_key!r} has shape {tuple(value.shape)} (as {path!r}), but '
          f'this config\'s model has {want} there. {self.hint}'.strip())
    if key in self._values:
      raise ConversionError(f'{self.source}: {path!r} is written twice (by {their_key!r}).')
    self._values[key] = value.astype(dtype, copy=False)

  def state(self) -> nnx.State:
    """The filled parameters as an nnx State of numpy arrays; every parameter must be filled."""
    missing = ['.'.join(map(str, k)) for k in self._shapes if k not in self._values]
    if missing:
      raise ConversionError(
          f'{self.source}: the file has no tensor for {len(missing)} of this config\'s parameters, '
          f'e.g. {missing[:3]}. {self.hint}'.strip())
    pure: dict = {}
    for key, value in self._values.items():
      node = pure
      for k in key[:-1]:
        node = node.setdefault(k, {})
      node[key[-1]] = value
    state = jax.tree.map(lambda x: x, self._abstract)
    nnx.replace_by_pure_dict(state, pure)
    return state


def leaves(params: nnx.State) -> Iterator[tuple[str, np.ndarray]]:
  """(dotted path, numpy array) of every parameter of a State, in a fixed order."""
  pure = nnx.to_pure_dict(params)
  for path, leaf in jax.tree_util.tree_leaves_with_path(pure):
    yield '.'.join(str(getattr(k, 'key', getattr(k, 'idx', None))) for k in path), np.asarray(
        jax.device_get(leaf))


def by_path(params: nnx.State) -> dict[str, np.ndarray]:
  return collections.OrderedDict(leaves(params))
