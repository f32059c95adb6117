"""Throughput figures: training FLOPs per token and the peak FLOP/s an MFU is measured against."""

from __future__ import annotations

import math
import os

import jax

PEAK_FLOPS = {  # dense bf16 per device (fp32 for CPU), for the MFU estimate
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
    'TPU v6 lite': 918e12, 'TPU v6e': 918e12, 'H100': 989e12, 'H200': 989e12, 'A100': 312e12,
}


def peak_flops_per_device(override: float = 0.0) -> float:
  """`override` if > 0, else the device kind's dense peak (PEAK_FLOPS)."""
  if override > 0:
    return float(override)
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  # CPU: ~70 GFLOP/s fp32 per core (measured: a 2048x256x50257 matmul runs at 93-138 GFLOP/s on
  # 2 cores).
  return 70e9 * (os.cpu_count() or 1) / max(jax.local_device_count(), 1)


def train_flops_per_token(model, token_shape: tuple[int, ...]) -> float:
  """Forward + backward FLOPs per token of a (possibly abstract) model: the DiT's or the AR's
  analytic count (`models.dit.flops_per_token`, `models.ar.flops_per_token`), or 3 x the UNet's
  forward FLOPs per colour-channel token."""
  if hasattr(model, 'flops_per_token'):
    return float(model.flops_per_token(token_shape[0]))
  return 3.0 * model.forward_flops(*token_shape[:2]) / math.prod(token_shape)
