"""Graceful stops: SIGTERM (how Cloud TPU VMs and SLURM preempt a job, and `kill`) and SIGINT
(Ctrl-C) end training after the current step with a checkpoint, on every process at the same step.

The exit status is 128 + the signal number (143 for SIGTERM, 130 for SIGINT): what a shell reports
for a process that the signal ended, so schedulers and wrappers that react to it keep working; the
run is not complete, so it is never 0. The same command resumes from the workdir.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(SystemExit):
  """Training stopped on a signal after its checkpoint was written: exits with 128 + signum."""

  def __init__(self, signum: int, step: int, message: str):
    super().__init__(128 + signum)
    self.signum, self.step, self.message = signum, step, message


def _say(line: str) -> None:
  """One line straight to stdout's file descriptor: a signal handler must not re-enter a buffered
  stream that the interrupted code may be writing."""
  data = (line + '\n').encode()
  try:
    os.write(sys.stdout.fileno(), data)
  except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
    print(line, flush=True)


def signal_name(signum: int) -> str:
  return signal.Signals(signum).name


class StopRequest:
  """While entered, SIGTERM and SIGINT ask training to stop instead of ending the process.

  `should_stop()` is called once per step by every process. With one process it answers whether a
  signal came. With several (`sync`), each call OR-reduces the processes' flags on the devices and
  answers with the reduction of the previous call, so the host never waits for the step in flight
  and every process answers the same at the same step (any process that got a signal stops all).
  """

  def __init__(self, *, sync: Optional[bool] = None):
    self.signum: Optional[int] = None  # the first signal received (agreed, once stopping)
    self._sync = jax.process_count() > 1 if sync is None else sync
    self._pending = None
    self._previous: dict[int, object] = {}
    self._reduce = self._in_sharding = None

  def __enter__(self) -> StopRequest:
    if threading.current_thread() is threading.main_thread():  # handlers live in the main thread
      for s in SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None and issubclass(exc_type, Preempted):
      return  # the process is exiting: later signals still only say "please wait"
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    who = f'process {jax.process_index()}: ' if jax.process_count() > 1 else ''
    if self.signum is None:
      self.signum = signum
      _say(f'{who}{signal_name(signum)} received: finishing the current step, then writing a '
           'checkpoint and exiting.')
    else:
      _say(f'{who}{signal_name(signum)} received again: saving the checkpoint, please wait '
           '(SIGKILL skips it; the previous checkpoint stays intact).')

  def should_stop(self) -> bool:
    if not self._sync:
      return self.signum is not None
    previous, self._pending = self._pending, self._dispatch(self.signum or 0)
    if previous is None:
      return False
    agreed = int(np.asarray(previous.addressable_data(0)))
    if agreed:
      self.signum = agreed
    return bool(agreed)

  def _dispatch(self, value: int) -> jax.Array:
    """max over all devices of every process's `value`, replicated (asynchronous)."""
    if self._reduce is None:
      mesh = Mesh(np.asarray(jax.devices()), ('all',))
      self._in_sharding = NamedSharding(mesh, PartitionSpec('all'))
      self._reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))
    flags = jax.make_array_from_callback(
        (jax.device_count(),), self._in_sharding, lambda _: np.full((1,), value, np.int32))
    return self._reduce(flags)


def stopped_message(signum: int, step: int, num_steps: int, directory: str) -> str:
  return (f'Stopped by {signal_name(signum)} after step {step}/{num_steps}; its checkpoint is in '
          f'{directory}. Run the same command again to resume from it. Exit status '
          f'{128 + signum} (128 + {signal_name(signum)}).')
