"""Sampler benchmark: dense vs compacted sampler per precision: samples/s, NFE, idle steps, split.

Prints samples/s, NFE, idle steps and the time split trunk / head / filter+draw.

  python benchmarks/sampler_bench.py             # DiT D=256, 4 blocks, C=50257, ell=2, 8x256, T=32
  python benchmarks/sampler_bench.py --dim 768 --layers 12 --heads 12 --length 1024 --ell 4 \
      --steps 1024 --estimate                       # the paper's setting, extrapolated (see below)

The model is a randomly initialised DiT (zero-initialised parameters perturbed so predictions are
not uniform), given to the sampler as a `SplitNetwork`; the sampler's cost does not depend on what
the weights have learnt, and neither do its idle-step statistics (method.md §6).

Full runs: for each precision, dense (`compact=False`: head, filter and draw at every position)
and compacted (only where a digit is revealed) are compiled, then timed in interleaved rounds with
the same keys; the medians are printed and the tokens of the two must be identical.

Time split: the trunk (one `features` call on the batch), head+filter+draw (`draw_positions` with
the split head) and filter+draw alone (`draw_positions` on precomputed logits) are timed on
synthetic mid-chain states (each sub-token masked with probability t, revealed with the step's
probability, averaged over --split-times); head = the difference. In the full runs the trunk is
one `features` call timed in each round times the NFE, and the rest of the batch's time is split
between head and filter+draw in the synthetic proportion.
--estimate skips the full runs and prints samples/s extrapolated from that split and the expected
NFE (labelled as extrapolated): the paper's setting takes hours per batch on a CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from prime_jax.diffusion import samplers, schedules, subtokens  # noqa: E402
from prime_jax.models import dit  # noqa: E402


def timed(fn, *args):
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def in_precision(precision, fn, *args):
  if precision == 'fp64':
    with jax.enable_x64(True):
      return fn(*args)
  return fn(*args)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--vocab', type=int, default=50257)
  ap.add_argument('--ell', type=int, default=2)
  ap.add_argument('--dim', type=int, default=256)
  ap.add_argument('--layers', type=int, default=4)
  ap.add_argument('--heads', type=int, default=4)
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--length', type=int, default=256)
  ap.add_argument('--steps', type=int, default=32)
  ap.add_argument('--precisions', default='fp64,fp32_hires')
  ap.add_argument('--modes', default='dense,compact')
  ap.add_argument('--rounds', type=int, default=3, help='interleaved timed rounds (median)')
  ap.add_argument('--split-times', default='0.25,0.75')
  ap.add_argument('--split-repeats', type=int, default=2)
  ap.add_argument('--capacity', type=int, default=None, help='chunk rows (default: the schedule)')
  ap.add_argument('--estimate', action='store_true', help='no full runs: extrapolate')
  args = ap.parse_args()

  codec = subtokens.Codec(args.vocab, args.ell)
  model = dit.DiT(vocab_size=args.vocab, base=codec.base, ell=args.ell, dim=args.dim,
                  num_heads=args.heads, num_layers=args.layers, dropout=0.0, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  # Non-trivial predictions: perturb every zero-initialised parameter.
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape, p.dtype)
                        if not jnp.any(p) else p, params)
  net = samplers.SplitNetwork(features=lambda p, y: nnx.merge(graphdef, p).features(y),
                              head=lambda p: nnx.merge(graphdef, p).head_weights())
  B, L, K, T, t_min = args.batch, args.length, args.ell, args.steps, 1e-5
  shape, N = (B, L), B * L
  grid = schedules.sampling_grid(T, t_min)
  q = (grid[:-1] - grid[1:]) / grid[:-1]
  caps = samplers.capacities(q, K, N) if args.capacity is None else (args.capacity,) * 2
  idle = samplers.expected_idle_fraction(N * K, T, t_min)
  nfe_expected = T * (1 - idle) + 1 - (1 - t_min)**(N * K)
  precisions = args.precisions.split(',')
  modes = args.modes.split(',')
  print(f'device: {jax.devices()[0].device_kind} x {jax.device_count()}; DiT D={args.dim} '
        f'{args.layers} blocks, C={args.vocab}, ell={K} (base {codec.base}); {B} x {L} tokens, '
        f'{T} steps, linear grid, carry-over, ddpm_cache')
  print(f'  expected NFE {nfe_expected:.1f}, expected idle fraction {idle:.4f}; revealed '
        f'sub-tokens per step {N * K / T:.1f} of {N * K}; chunk capacities (full, single) {caps}')

  # -- time split on synthetic states -------------------------------------------------------------
  feats = jax.jit(net.features)
  rng = np.random.default_rng(0)
  split_s = {}
  for precision in precisions:
    for mode in modes:
      split_s[precision, mode] = np.zeros(3)
  for t in (float(v) for v in args.split_times.split(',')):
    masked = rng.random((B, L, K)) < t
    x = codec.encode(jnp.asarray(rng.integers(0, args.vocab, (B, L)), jnp.int32))
    y = jnp.where(jnp.asarray(masked), codec.mask_id, x)
    reveal = masked & (rng.random((B, L, K)) < (1 - t_min) / T / t)
    h = feats(params, y)
    trunk = min(timed(feats, params, y) for _ in range(args.split_repeats))
    head = net.head(params)
    logits = jax.jit(lambda h, w: (jnp.dot(h.reshape(N, -1), w[0]) + w[1]).astype(jnp.float32))(
        h, head)
    for precision in precisions:
      for mode in modes:
        active = (jnp.asarray(reveal.any(-1).reshape(N)) if mode == 'compact'
                  else jnp.ones((N,), bool))

        def run(net_in, hd, active=active, precision=precision):
          return samplers.draw_positions(jax.random.key(0), net_in, y.reshape(N, K), active,
                                         codec, head=hd, carry_over=True, top_p=1.0,
                                         precision=precision, argmax=False, caps=caps)

        with_head = jax.jit(lambda n, hd, run=run: run(n, hd))
        no_head = jax.jit(lambda n, run=run: run(n, None))
        hf = h.reshape(N, -1)

        def measure(fn, *a, precision=precision):
          in_precision(precision, fn, *a)  # compile
          return min(in_precision(precision, timed, fn, *a) for _ in range(args.split_repeats))

        hd_s, d_s = measure(with_head, hf, head), measure(no_head, logits)
        split_s[precision, mode] += np.asarray([trunk, max(hd_s - d_s, 0.0), d_s])
  n_t = len(args.split_times.split(','))
  for k in split_s:
    split_s[k] = split_s[k] / n_t

  print('\nper network evaluation (synthetic mid-chain states), s: trunk / head / filter+draw')
  for (precision, mode), (tr, hd, dr) in split_s.items():
    est = B / (nfe_expected * (tr + hd + dr))
    print(f'  {precision:>10s} {mode:>7s}: {tr:7.3f} / {hd:7.3f} / {dr:7.3f}   -> extrapolated '
          f'{est:.3g} samples/s at the expected NFE')
  if args.estimate:
    return

  # -- full runs, interleaved ---------------------------------------------------------------------
  print(f'\nfull runs: medians of {args.rounds} interleaved rounds (key r + 1 in round r)')
  for precision in precisions:
    kw = dict(shape=shape, num_steps=T, precision=precision, params=params, t_min=t_min,
              capacity=caps)
    compile_s = {m: timed(lambda m=m: samplers.sample(jax.random.key(0), net, codec,
                                                      compact=m == 'compact', **kw).tokens)
                 for m in modes}
    times = {m: [] for m in modes}
    trunk_calls = []
    outs = {}
    y_all = jnp.full((B, L, K), codec.mask_id, jnp.int32)
    for r in range(args.rounds):
      trunk_calls.append(timed(feats, params, y_all))
      for m in modes:
        t0 = time.perf_counter()
        out = samplers.sample(jax.random.key(r + 1), net, codec, compact=m == 'compact', **kw)
        jax.block_until_ready(out.tokens)
        times[m].append(time.perf_counter() - t0)
        outs[m] = out
    same = len({np.asarray(o.tokens).tobytes() for o in outs.values()}) == 1
    trunk_call = statistics.median(trunk_calls)
    for m in modes:
      med, out = statistics.median(times[m]), outs[m]
      # The trunk from calls timed in the same rounds; the rest split as on the synthetic states.
      tr = trunk_call * int(out.nfe)
      share = split_s[precision, m][1] / max(split_s[precision, m][1:].sum(), 1e-9)
      hd, dr = share * max(med - tr, 0.0), (1 - share) * max(med - tr, 0.0)
      print(f'  {precision:>10s} {m:>7s}: {B / med:7.3f} samples/s ({med:7.2f} s per batch, '
            f'{med / T * 1e3:7.1f} ms/step), NFE {int(out.nfe)}, idle steps '
            f'{int(out.idle_steps)}/{T}; split trunk {tr:6.2f} s / head {hd:6.2f} s / '
            f'filter+draw {dr:6.2f} s; first call incl. compile {compile_s[m]:.1f} s')
    print(f'  {precision:>10s} tokens identical across modes (last round): {same}')


if __name__ == '__main__':
  main()
