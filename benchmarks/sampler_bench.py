"""Sampler benchmark: samples/s, NFE and idle steps of the Prime ancestral sampler.

  python benchmarks/sampler_bench.py                       # DiT D=256, 4 blocks, 8 x 256 tokens
  python benchmarks/sampler_bench.py --steps 256 --batch 1 --length 1024 --ell 4

The model is a randomly initialised DiT (the head is perturbed so predictions are not uniform); the
sampler's cost does not depend on what the weights have learnt, only its idle-step statistics do
not either (method.md §6). The reference PyTorch sampler draws C fp64 uniforms per position per
step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from prime_jax.diffusion import samplers, subtokens  # noqa: E402
from prime_jax.models import dit  # noqa: E402


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
  ap.add_argument('--precisions', default='fp64,fp32_hires,fp32')
  ap.add_argument('--repeats', type=int, default=2)
  args = ap.parse_args()

  codec = subtokens.Codec(args.vocab, args.ell)
  model = dit.DiT(vocab_size=args.vocab, base=codec.base, ell=args.ell, dim=args.dim,
                  num_heads=args.heads, num_layers=args.layers, dropout=0.0, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  # Non-trivial predictions: perturb every zero-initialised parameter.
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape, p.dtype)
                        if not jnp.any(p) else p, params)

  def logits_fn(params, y):
    return nnx.merge(graphdef, params)(y, deterministic=True)

  print(f'device: {jax.devices()[0].device_kind} x {jax.device_count()}; DiT D={args.dim} '
        f'{args.layers} blocks, C={args.vocab}, ell={args.ell} (base {codec.base}); '
        f'{args.batch} x {args.length} tokens, {args.steps} steps')
  for precision in args.precisions.split(','):
    for cache in (True, False):
      kw = dict(shape=(args.batch, args.length), num_steps=args.steps, precision=precision,
                cache=cache, params=params)
      t0 = time.time()
      out = samplers.sample(jax.random.key(0), logits_fn, codec, **kw)
      jax.block_until_ready(out.tokens)
      compile_s = time.time() - t0
      times = []
      for r in range(args.repeats):
        t0 = time.time()
        out = samplers.sample(jax.random.key(r + 1), logits_fn, codec, **kw)
        jax.block_until_ready(out.tokens)
        times.append(time.time() - t0)
      best = min(times)
      expected = samplers.expected_idle_fraction(args.batch * args.length * args.ell, args.steps)
      print(f'  {precision:>10s} cache={str(cache):5s}: {args.batch / best:7.3f} samples/s '
            f'({best / args.steps * 1e3:7.1f} ms/step), NFE {int(out.nfe)}, idle steps '
            f'{int(out.idle_steps)}/{args.steps} (expected idle fraction '
            f'{expected:.4f})'
            f', first call incl. compile {compile_s:.1f} s')


if __name__ == '__main__':
  main()
