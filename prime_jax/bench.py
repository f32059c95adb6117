"""--mode bench: the real train step on synthetic batches: step time, tokens/s, MFU, memory."""

from __future__ import annotations

import math
import resource
import time

import jax
import numpy as np

from prime_jax import build
from prime_jax import train as train_lib
from prime_jax.metrics import throughput


def peak_memory_bytes() -> tuple[int, str]:
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device peak'
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'host max RSS'


def run(exp: build.Experiment) -> dict[str, float]:
  steps = exp.loop.bench_steps
  tr = train_lib.Trainer(exp)
  state = train_lib.init_state(exp.make_model, exp.loop.seed, tr.tx, tr.shardings)
  rng = np.random.default_rng(0)
  B, S = exp.data.batch_size, tr.token_shape  # S = (L,) text, (H, W, channels) images
  L = math.prod(S)  # tokens per example
  local = {'tokens': rng.integers(0, tr.codec.vocab_size, size=(B // jax.process_count(), *S))}
  batch = tr.global_batch(local)
  t0 = time.time()
  state, m = tr.train_step(state, batch)
  jax.block_until_ready(m['loss'])
  compile_s = time.time() - t0
  t0 = time.time()
  for _ in range(steps):
    state, m = tr.train_step(state, batch)
  jax.block_until_ready(m['loss'])
  step_s = (time.time() - t0) / steps
  tokens_s = B * L / step_s
  peak = throughput.peak_flops_per_device(exp.loop.peak_flops) * jax.device_count()
  mfu = tokens_s * tr.flops_per_token / peak
  mem, mem_kind = peak_memory_bytes()
  out = dict(params=tr.n_params, batch=B, seq_len=L, ell=tr.codec.ell, step_s=step_s,
             tokens_per_s=tokens_s, mfu=mfu, compile_s=compile_s, peak_mem_gib=mem / 2**30)
  print(f'bench: {jax.device_count()} x {jax.devices()[0].device_kind}, params {tr.n_params:,}, '
        f'batch {B} x {L} tokens, ell {tr.codec.ell} (base {tr.codec.base})')
  print(f'  step {step_s * 1e3:.1f} ms  |  {tokens_s:,.0f} tokens/s  |  MFU {100 * mfu:.1f}% '
        f'(of {peak / 1e12:.3g} TFLOP/s assumed peak, {tr.flops_per_token / 1e6:.1f} MFLOP/token)'
        f'  |  {mem_kind} {mem / 2**30:.2f} GiB  |  compile {compile_s:.1f} s')
  return out
