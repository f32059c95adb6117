"""Orbax checkpoints: train state (parameters, optimizer, EMA, step) + the data-iterator state.

Checkpoints are written asynchronously; a crash leaves the last finished one readable (Orbax writes
into a temporary directory and renames it when complete). Restoring takes an abstract state whose
leaves carry the target shardings, so a checkpoint restores onto any mesh.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


def _shape_fingerprint(abstract_state) -> dict[str, list[int]]:
  leaves = jax.tree_util.tree_leaves_with_path(abstract_state)
  return {jax.tree_util.keystr(p): list(x.shape) for p, x in leaves}


class Checkpointer:
  """Saves and restores {'state': TrainState, 'data': grain iterator} under WORKDIR/checkpoints."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'data', 'meta'))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator=None, meta: Optional[dict] = None) -> None:
    items = dict(state=ocp.args.StandardSave(state),
                 meta=ocp.args.JsonSave(dict(meta or {}, shapes=_shape_fingerprint(state))))
    if data_iterator is not None:
      from prime_jax.data import pipeline
      items['data'] = pipeline.iterator_save_args(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items))

  def restore(self, abstract_state, step: Optional[int] = None, data_iterator=None):
    """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    want = _shape_fingerprint(abstract_state)
    if meta.get('shapes') != want:
      diff = sorted(k for k in set(want) | set(meta.get('shapes', {}))
                    if want.get(k) != meta.get('shapes', {}).get(k))
      raise ValueError(
          f'The checkpoint at {self.directory} (step {step}) does not match this config: '
          f'{len(diff)} parameter shape(s) differ, e.g. {diff[:3]} (checkpoint '
          f'{[meta.get("shapes", {}).get(k) for k in diff[:3]]} vs config '
          f'{[want.get(k) for k in diff[:3]]}). It was written with {meta.get("config_summary")}. '
          'Use the config it was trained with, or a fresh --workdir.')
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iterator is not None:
      from prime_jax.data import pipeline
      items['data'] = pipeline.iterator_restore_args(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored['state'], meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _check_shapes(meta: dict, want: dict, directory: str, step: int) -> None:
  saved = meta.get('shapes', {})
  diff = sorted(k for k in want if want[k] != saved.get(k))
  if diff:
    raise ValueError(
        f'The checkpoint at {directory} (step {step}) does not match this config: {len(diff)} '
        f'parameter shape(s) differ, e.g. {diff[:3]} (checkpoint {[saved.get(k) for k in diff[:3]]}'
        f' vs config {[want.get(k) for k in diff[:3]]}). It was written with '
        f'{meta.get("config_summary")}. Use the config it was trained with.')


def restore_params(workdir: str, abstract_params, *, step: Optional[int] = None,
                   which: str = 'ema'):
  """(params, step): the EMA ('ema') or raw ('params') weights of a training checkpoint, restored
  alone onto the shardings of `abstract_params`; the optimizer state is never read."""
  if which not in ('ema', 'params'):
    raise ValueError(f"which must be 'ema' or 'params', got {which!r}.")
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  manager = ocp.CheckpointManager(directory, item_names=('state', 'data', 'meta'),
                                  options=ocp.CheckpointManagerOptions(create=False))
  try:
    available = manager.all_steps()
    if not available:
      raise FileNotFoundError(
          f'No checkpoint in {directory}: train first (python -m prime_jax.main --config ... '
          f'--workdir {workdir}) or pass the --workdir that holds one.')
    if step is None:
      step = max(available)
    elif step not in available:
      raise ValueError(f'No checkpoint for step {step} in {directory}; available steps: '
                       f'{sorted(available)}.')
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    # The saved fingerprint is of the TrainState, whose fields are attributes: '.ema[...]'.
    want = {f'.{which}{k}': v for k, v in _shape_fingerprint(abstract_params).items()}
    _check_shapes(meta, want, directory, step)
    target = {which: abstract_params}
    args = ocp.args.PyTreeRestore(item=target,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    restored = manager.restore(step, args=ocp.args.Composite(state=args))['state']
  finally:
    manager.close()
  return restored[which], int(step)


def write_json(path: str, obj: Any) -> None:
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      json.dump(obj, f, indent=2, sort_keys=True, default=str)
