"""--mode bench: the real train step on synthetic batches: step time, tokens/s, MFU, memory."""

from __future__ import annotations

import math
import resource
import time

import jax
import jax.numpy as jnp
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
  mem, mem_kind = peak_memory_bytes()  # before the matmul benchmark allocates its own
  # MFU counts the FLOPs the model needs (the analytic count: every row through the full head),
  # not the rows the head kernel skips; against the device's documented dense peak and against a
  # matmul this process measures in the compute dtype.
  n = jax.device_count()
  model_flops_s = tokens_s * tr.flops_per_token
  documented = throughput.peak_flops_per_device(exp.loop.peak_flops) * n
  assumed = ' (assumed)' if throughput.peak_is_assumed(exp.loop.peak_flops) else ''
  dtype = jnp.bfloat16 if exp.dtype == 'bfloat16' else jnp.float32
  measured = throughput.measure_matmul_flops(dtype) * n
  out = dict(params=tr.n_params, batch=B, seq_len=L, ell=tr.codec.ell, step_s=step_s,
             tokens_per_s=tokens_s, mfu=model_flops_s / documented,
             mfu_measured_peak=model_flops_s / measured, peak_flops=documented,
             measured_matmul_flops=measured, compile_s=compile_s, peak_mem_gib=mem / 2**30)
  print(f'bench: {n} x {jax.devices()[0].device_kind}, params {tr.n_params:,}, '
        f'batch {B} x {L} tokens, ell {tr.codec.ell} (base {tr.codec.base})')
  print(f'  step {step_s * 1e3:.1f} ms  |  {tokens_s:,.0f} tokens/s  |  '
        f'{tr.flops_per_token / 1e6:.1f} MFLOP/token  |  {mem_kind} {mem / 2**30:.2f} GiB  |  '
        f'compile {compile_s:.1f} s')
  print(f'  MFU {100 * out["mfu"]:.1f}% of the documented peak{assumed} '
        f'{documented / 1e12:.3g} TFLOP/s  |  {100 * out["mfu_measured_peak"]:.1f}% of a measured '
        f'{jnp.dtype(dtype).name} matmul at {measured / 1e12:.3g} TFLOP/s')
  return out
