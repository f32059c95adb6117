"""Metric writer: TensorBoard (tensorboardX), metrics.jsonl and console lines; process 0 only.

clu's metric writers pull in TensorFlow, so TensorBoard events go through tensorboardX. The workdir
may be a gs:// URI: files go through etils.epath, TensorBoard's event files included (see
`RewrittenFile`: object stores have no append).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from typing import Mapping

import jax
import numpy as np
from etils import epath

_FILES = itertools.count()


class MetricWriter:
  """Training writes scalars to TensorBoard and metrics.jsonl; the --mode commands (`mode`: 'eval',
  'sample', 'fid') write TensorBoard only, into event files of their own in the same folder.

  TensorBoard gets text (`text`: the config, samples) and images (`image`) too. A resumed run calls
  `resume(step)`: what an earlier run logged after that step is dropped from metrics.jsonl and
  purged from TensorBoard, so no step is shown twice.
  """

  def __init__(self, workdir: str, *, enabled: bool | None = None, mode: str = ''):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    self._purge_step = None
    self._mode = mode
    if self.enabled:
      workdir = epath.Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      if '://' in str(workdir):
        _tensorboard_through_epath(str(workdir).split('://')[0])
      self._logdir = str(workdir / 'tensorboard')
      self._jsonl_path = workdir / 'metrics.jsonl'
      if not mode:
        self._jsonl = open_append(self._jsonl_path, min_interval_s=30.0)

  @property
  def tb(self):
    """The tensorboardX SummaryWriter, opened on first use (after `resume` set what to purge)."""
    if self._tb is None:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      # A file of its own (tensorboardX names files by the second and truncates a taken name).
      suffix = f'.{self._mode}' if self._mode else ''
      self._tb = SummaryWriter(self._logdir, purge_step=self._purge_step,
                               filename_suffix=f'{suffix}.{os.getpid()}.{next(_FILES)}')
    return self._tb

  def resume(self, step: int) -> None:
    """Training restarts after `step`: TensorBoard hides every event an earlier run logged at a
    later step (tensorboardX's purge_step, written in the new event file), and metrics.jsonl keeps
    only rows of steps <= step."""
    if not self.enabled:
      return
    if self._tb is not None:
      raise RuntimeError('MetricWriter.resume must come before anything is logged.')
    self._purge_step = int(step) + 1
    if self._jsonl is None or not self._jsonl_path.exists():
      return
    self._jsonl.close()
    lines = [line for line in self._jsonl_path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if _row_step(line) <= step]
    if len(kept) < len(lines):
      self._jsonl_path.write_text(''.join(line + '\n' for line in kept))
    self._jsonl = open_append(self._jsonl_path, min_interval_s=30.0)

  def write(self, step: int, metrics: Mapping[str, float], *, prefix: str = '') -> None:
    if not self.enabled:
      return
    row = {'step': int(step), 'time': time.time()}
    for k, v in metrics.items():
      if isinstance(v, str):  # labels (e.g. the evaluated source) are not scalars to plot
        continue
      v = float(np.asarray(v))
      row[prefix + k] = v
      self.tb.add_scalar(prefix + k, v, int(step))
    if self._jsonl is not None:
      self._jsonl.write(json.dumps(row) + '\n')
      self._jsonl.flush()

  def text(self, step: int, tag: str, text: str, *, verbatim: bool = True) -> None:
    """TensorBoard text at `step`. TensorBoard renders markdown: verbatim text (samples, the
    config) is indented as a code block so that it shows as written."""
    if self.enabled:
      self.tb.add_text(tag, code_block(text) if verbatim else text, int(step))

  def image(self, step: int, tag: str, image_HxWxC: np.ndarray) -> None:
    """A uint8 image (H, W, C) with C = 1 or 3, as a TensorBoard image at `step`."""
    if self.enabled:
      image = np.asarray(image_HxWxC, np.uint8)
      if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
      self.tb.add_image(tag, image, int(step), dataformats='HWC')

  def print(self, line: str) -> None:
    if self.enabled:
      print(line, flush=True)
      sys.stdout.flush()

  def close(self) -> None:
    if self.enabled:
      if self._tb is not None:
        self._tb.close()
      if self._jsonl is not None:
        self._jsonl.close()


def code_block(text: str) -> str:
  """Markdown that shows `text` as written (an indented code block)."""
  return '\n'.join('    ' + line for line in text.splitlines())


def _row_step(line: str) -> float:
  """A metrics.jsonl row's step; inf for a line a crash cut short (dropped on resume)."""
  try:
    return json.loads(line).get('step', 0)
  except ValueError:
    return float('inf')


def read_jsonl(path: epath.PathLike) -> list[dict]:
  with epath.Path(path).open() as f:
    return [json.loads(line) for line in f if line.strip()]


class RewrittenFile:
  """A file appended to on an object store, which has no append (gcsfs would silently start the
  file afresh): what the file held plus what was written since is kept in memory and the whole
  object rewritten on flush, at most every `min_interval_s` (the first flush at once), and on
  close. Each rewrite replaces the object whole, so a reader never sees half a line."""

  def __init__(self, path: epath.Path, *, binary: bool = False, min_interval_s: float = 0.0):
    self.path, self.binary, self.min_interval_s = path, binary, min_interval_s
    self._data = [path.read_bytes()] if path.exists() else []
    self._dirty, self._last, self.closed = False, -float('inf'), False

  def write(self, data) -> int:
    self._data.append(data if self.binary else data.encode())
    self._dirty = True
    return len(data)

  def flush(self) -> None:
    if self._dirty and time.monotonic() - self._last >= self.min_interval_s:
      self._data = [b''.join(self._data)]
      self.path.write_bytes(self._data[0])
      self._dirty, self._last = False, time.monotonic()

  def close(self) -> None:
    if not self.closed:
      self.min_interval_s = 0.0
      self.flush()
      self.closed = True


def open_append(path: epath.Path, *, min_interval_s: float = 0.0):
  """A text file opened for appending: the local file itself, or a RewrittenFile for a URI."""
  if '://' in str(path):
    return RewrittenFile(path, min_interval_s=min_interval_s)
  return open(path, 'a')


class _EpathEventFiles:
  """tensorboardX writer factory: event files of a URI logdir written through epath."""

  def open(self, path: str) -> RewrittenFile:
    return RewrittenFile(epath.Path(path), binary=True)  # tensorboardX flushes every 120 s

  def directory_check(self, path: str) -> None:
    del path  # object stores have no folders to create


def _tensorboard_through_epath(scheme: str) -> None:
  from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel
  record_writer.register_writer_factory(scheme, _EpathEventFiles())
