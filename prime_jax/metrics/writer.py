"""Metric writer: TensorBoard (tensorboardX), metrics.jsonl and console lines; process 0 only.

clu's metric writers pull in TensorFlow, so TensorBoard events go through tensorboardX.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping

import jax
import numpy as np


class MetricWriter:

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

  def write(self, step: int, metrics: Mapping[str, float], *, prefix: str = '') -> None:
    if not self.enabled:
      return
    row = {'step': int(step), 'time': time.time()}
    for k, v in metrics.items():
      if isinstance(v, str):  # labels (e.g. the evaluated source) are not scalars to plot
        continue
      v = float(np.asarray(v))
      row[prefix + k] = v
      self._tb.add_scalar(prefix + k, v, int(step))
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()

  def print(self, line: str) -> None:
    if self.enabled:
      print(line, flush=True)
      sys.stdout.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
