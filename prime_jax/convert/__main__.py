"""python -m prime_jax.convert import|export ... (see prime_jax/convert/__init__.py)."""

from __future__ import annotations

import argparse
import sys

from prime_jax import torchfile


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m prime_jax.convert',
      description="The authors' MDM-Prime checkpoints in and out of prime_jax workdirs.")
  sub = parser.add_subparsers(dest='command', required=True)
  imp = sub.add_parser('import', help="an authors' .ckpt / .pth -> a prime_jax workdir")
  imp.add_argument('--checkpoint', required=True, help="the authors' file (.ckpt text, .pth image)")
  imp.add_argument('--config', required=True,
                   help='e.g. configs/official.py:setup=results_prime_l2_owt')
  imp.add_argument('--workdir', required=True, help='a new workdir for the converted checkpoint')
  imp.add_argument('--weights', choices=('ema', 'raw'), default='ema',
                   help='ema (default; every number the authors report uses it) or raw')
  exp = sub.add_parser('export', help="a prime_jax workdir -> a file the authors' code loads")
  exp.add_argument('--workdir', required=True)
  exp.add_argument('--out', required=True, help='the file to write (.ckpt text, .pth image)')
  exp.add_argument('--config', default=None, help='default: WORKDIR/config.json')
  exp.add_argument('--step', type=int, default=None, help='default: the latest checkpoint')
  args = parser.parse_args(argv)

  from prime_jax import convert  # pylint: disable=import-outside-toplevel
  try:
    if args.command == 'import':
      convert.import_checkpoint(args.checkpoint, args.config, args.workdir, weights=args.weights)
    else:
      convert.export_checkpoint(args.workdir, args.out, args.config, step=args.step)
  except (convert.ConversionError, torchfile.FormatError, torchfile.UnsafePickleError,
          FileNotFoundError, FileExistsError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
