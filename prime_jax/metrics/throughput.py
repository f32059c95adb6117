"""Throughput figures: training FLOPs per token, the peak FLOP/s an MFU is measured against, and
the training rate and ETA with evaluations left out."""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp

PEAK_FLOPS = {  # dense bf16 per device (fp32 for CPU), for the MFU estimate; the first match wins
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
    'TPU v5': 459e12,  # how a v5p names itself
    'TPU v6 lite': 918e12, 'TPU v6e': 918e12, 'H100': 989e12, 'H200': 989e12, 'A100': 312e12,
}


def _known_peak(kind: str) -> Optional[float]:
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return None


def peak_is_assumed(override: float = 0.0) -> bool:
  """True when `peak_flops_per_device` guesses (no override, a device kind not in PEAK_FLOPS, e.g.
  a CPU): an MFU against it is then printed as measured against an assumed peak."""
  return override <= 0 and _known_peak(jax.devices()[0].device_kind) is None


def peak_flops_per_device(override: float = 0.0) -> float:
  """`override` if > 0, else the device kind's dense peak (PEAK_FLOPS)."""
  if override > 0:
    return float(override)
  known = _known_peak(jax.devices()[0].device_kind)
  if known is not None:
    return known
  # CPU: ~70 GFLOP/s fp32 per core (measured: a 2048x256x50257 matmul runs at 93-138 GFLOP/s on
  # 2 cores).
  return 70e9 * (os.cpu_count() or 1) / max(jax.local_device_count(), 1)


def measure_matmul_flops(dtype=jnp.bfloat16, size: int = 0, repeats: int = 5) -> float:
  """Measured dense matmul FLOP/s of one device: the best of `repeats` timed (size x size) @
  (size x size) products in `dtype` (size 8192 on accelerators, 1024 on a CPU), compiled first.
  The peak a model could reach on this device with this dtype, for an MFU against a measurement."""
  device = jax.devices()[0]
  size = size or (1024 if device.platform == 'cpu' else 8192)
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  chain = 8  # dependent products per timed call, so dispatch time does not count
  f = jax.jit(lambda x, y: functools.reduce(lambda acc, _: (acc @ y) * 0.5, range(chain), x))
  jax.block_until_ready(f(a, b))
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, b))
    best = min(best, time.perf_counter() - t0)
  return chain * 2.0 * size**3 / best


def train_flops_per_token(model, token_shape: tuple[int, ...]) -> float:
  """Forward + backward FLOPs per token of a (possibly abstract) model: the DiT's or the AR's
  analytic count (`models.dit.flops_per_token`, `models.ar.flops_per_token`), or 3 x the UNet's
  forward FLOPs per colour-channel token."""
  if hasattr(model, 'flops_per_token'):
    return float(model.flops_per_token(token_shape[0]))
  return 3.0 * model.forward_flops(*token_shape[:2]) / math.prod(token_shape)


class StepClock:
  """Training steps per second and the ETA of the remaining steps, with the time of evaluations
  and of the first step's compilation left out (`exclude`): the rate of the window since the
  last `tick` for the log line, the mean rate since the start for the ETA, so that neither jumps
  after an evaluation."""

  def __init__(self, step: int, now: float, num_steps: int):
    self.num_steps = num_steps
    self._start = self._last = (step, now)
    self._excluded_total = self._excluded_window = 0.0

  def exclude(self, seconds: float) -> None:
    self._excluded_total += seconds
    self._excluded_window += seconds

  def tick(self, step: int, now: float) -> tuple[float, float]:
    """(steps/s over the window since the last tick, ETA seconds of steps step..num_steps)."""
    window = max(now - self._last[1] - self._excluded_window, 1e-9)
    rate = (step - self._last[0]) / window
    total = max(now - self._start[1] - self._excluded_total, 1e-9)
    mean_rate = (step - self._start[0]) / total
    self._last, self._excluded_window = (step, now), 0.0
    return rate, (self.num_steps - step) / max(mean_rate, 1e-9)
