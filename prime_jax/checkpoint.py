"""Orbax checkpoints: train state (parameters, optimizer, EMA, step) + the data-iterator state.

Checkpoints are written asynchronously; a crash leaves the last finished one readable (Orbax writes
into a temporary directory and renames it when complete). Restoring takes an abstract state whose
leaves carry the target shardings, so a checkpoint restores onto any mesh.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils


class DamagedCheckpointError(ValueError):
  """A checkpoint that exists but cannot be read (truncated, partial, corrupted)."""


class _ShapeMismatch(ValueError):
  """The checkpoint is readable but belongs to another config."""


def _first_line(e: BaseException, limit: int = 300) -> str:
  """The most telling line of an error and its causes: TensorStore's 'Error reading <array> ...
  at <file>' where there is one, else the innermost cause's first line."""
  chain = []
  while e is not None and e not in chain:
    chain.append(e)
    e = e.__cause__ or e.__context__
  lines = [x.strip() for err in chain for x in str(err).splitlines() if x.strip()]
  line = next((x for x in lines if 'Error reading' in x or 'No such file' in x),
              next((x for x in str(chain[-1]).splitlines() if x.strip()),
                   type(chain[-1]).__name__))
  return line if len(line) <= limit else line[:limit] + ' ...'


def _damaged_message(directory: str, step: int, e: BaseException, steps) -> str:
  others = sorted(s for s in steps if s != step)
  pick = (f'Other checkpoints in this workdir: steps {others}; pick one with --step N '
          f'(eval, sample, fid), or move {directory}/{step} aside so that training resumes from '
          'the newest readable one.' if others else
          f'It is the only checkpoint there; move {directory}/{step} aside to train from scratch.')
  return (f'The checkpoint of step {step} in {directory} cannot be read: {_first_line(e)}. It is '
          'damaged or partial (a crash, a full disk or an interrupted copy while it was written). '
          + pick)


def checkpoint_dir(workdir: str) -> epath.Path:
  """WORKDIR/checkpoints: a URI workdir (gs://...) as given, a local one made absolute (Orbax
  wants absolute paths)."""
  workdir = os.fspath(workdir)
  return epath.Path(workdir if '://' in workdir else os.path.abspath(workdir)) / 'checkpoints'


def _shape_fingerprint(abstract_state) -> dict[str, list[int]]:
  leaves = jax.tree_util.tree_leaves_with_path(abstract_state)
  return {jax.tree_util.keystr(p): list(x.shape) for p, x in leaves}


class Checkpointer:
  """Saves and restores {'state': TrainState, 'data': grain iterator} under WORKDIR/checkpoints."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
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
    """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs).

    Without `step`, the newest readable checkpoint: a damaged or partial newest one is skipped
    with a warning (training resumes from the one before); with `step`, that one or an error."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    if step is not None:
      steps = [step]
    if not steps:
      raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    damaged = []
    for s in steps:
      try:
        return self._restore(abstract_state, s, data_iterator)
      except _ShapeMismatch:
        raise
      except Exception as e:  # pylint: disable=broad-except  # any read failure: try an older step
        damaged.append(s)
        if s == steps[-1]:
          raise DamagedCheckpointError(_damaged_message(self.directory, s, e, steps)) from None
        aside = self._move_aside(s)
        print(f'warning: the checkpoint of step {s} in {self.directory} cannot be read '
              f'({_first_line(e)}); moved it to {aside} and resuming from step '
              f'{steps[len(damaged)]} instead.', flush=True)
    raise AssertionError('unreachable')

  def _move_aside(self, step: int) -> str:
    """Renames a damaged step's folder (kept for inspection, invisible to Orbax), so that the
    retrained step can be saved under its number again."""
    src = self.directory / str(step)
    dst = src.parent / f'{src.name}.damaged-{time.strftime("%Y%m%d-%H%M%S")}'
    if jax.process_index() == 0:
      src.rename(dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'checkpoint_move_aside_{step}')
    self.manager.reload()
    return str(dst)

  def _restore(self, abstract_state, step: int, data_iterator):
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    want = _shape_fingerprint(abstract_state)
    if meta.get('shapes') != want:
      diff = sorted(k for k in set(want) | set(meta.get('shapes', {}))
                    if want.get(k) != meta.get('shapes', {}).get(k))
      raise _ShapeMismatch(
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
    raise _ShapeMismatch(
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
  directory = checkpoint_dir(workdir)
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
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=args))['state']
    except Exception as e:  # pylint: disable=broad-except  # any read failure
      raise DamagedCheckpointError(_damaged_message(directory, step, e, available)) from None
  finally:
    manager.close()
  return restored[which], int(step)


def write_json(path: epath.PathLike, obj: Any) -> None:
  """Process 0 writes `obj` to `path` (local or gs://...), creating its folder."""
  if jax.process_index() == 0:
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
