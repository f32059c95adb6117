"""The train step with the head as shipped (row compaction per call) against every row through the
full head, interleaved on the same batch and the same noise, one device.

  python benchmarks/head_step_bench.py                        # owt small, ell 4, 1 x 1024, fp32
  python benchmarks/head_step_bench.py --config configs/sotu.py --rounds 9

Prints each round's masked share and both step times, then their medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from prime_jax import build, losses  # noqa: E402
from prime_jax import train as train_lib  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--config', default='configs/owt.py:ell=4')
  ap.add_argument('--batch', type=int, default=1)
  ap.add_argument('--dtype', default='float32')
  ap.add_argument('--rounds', type=int, default=5)
  args = ap.parse_args()
  cfg = build.load_config(args.config)
  cfg.unlock()
  cfg.model.dtype, cfg.data.batch_size, cfg.mesh.data = args.dtype, args.batch, 1
  exp = build.experiment(cfg)
  devices = jax.devices()[:1]
  variants = {'compacted': exp.task, 'dense': dataclasses.replace(exp.task, compaction=None)}
  trainers = {v: train_lib.Trainer(dataclasses.replace(exp, task=t), devices)
              for v, t in variants.items()}
  tr = trainers['compacted']
  state = train_lib.init_state(exp.make_model, exp.loop.seed, tr.tx, tr.shardings)
  tokens = np.random.default_rng(0).integers(0, tr.codec.vocab_size,
                                             size=(args.batch, *tr.token_shape))
  batch = tr.global_batch({'tokens': tokens})
  for v, t in trainers.items():
    t0 = time.perf_counter()
    state, m = t.train_step(state, batch)
    jax.block_until_ready(m['loss'])
    print(f'{v}: compile and first step {time.perf_counter() - t0:.1f} s', flush=True)
  times = {v: [] for v in trainers}
  for i in range(args.rounds):
    step = 100 + i  # the step number keys the noise: both variants see the same masks
    key = jax.random.fold_in(jax.random.key(exp.loop.seed), step)
    _, y, _ = losses.noisy_batch(batch['tokens'], key, exp.task)
    share = float(jnp.mean(jnp.any(y == exp.codec.mask_id, -1)))
    order = list(trainers) if i % 2 == 0 else list(trainers)[::-1]
    for v in order:
      state = dataclasses.replace(state, step=jax.device_put(
          jnp.asarray(step, state.step.dtype), tr.shardings.step))
      t0 = time.perf_counter()
      state, m = trainers[v].train_step(state, batch)
      jax.block_until_ready(m['loss'])
      times[v].append(time.perf_counter() - t0)
    print(f'step {step}: masked share {share:.3f}  ' +
          '  '.join(f'{v} {times[v][-1]:.2f} s' for v in trainers), flush=True)
  print('median: ' + '  '.join(f'{v} {statistics.median(times[v]):.2f} s' for v in trainers))


if __name__ == '__main__':
  main()
