"""Dependency rule: prime_jax.diffusion imports only jax, numpy and the stdlib (the package-wide
rules are in tests/test_architecture.py)."""

import ast
import pathlib
import pkgutil
import subprocess
import sys

import prime_jax.diffusion

FORBIDDEN = ('flax', 'optax', 'orbax', 'grain', 'ml_collections', 'tensorflow', 'torch')
DIFFUSION_DIR = pathlib.Path(prime_jax.diffusion.__file__).parent
MODULES = sorted(
    f'prime_jax.diffusion.{m.name}' for m in pkgutil.iter_modules([str(DIFFUSION_DIR)]))


def test_core_modules_exist():
  for name in ('subtokens', 'schedules', 'forward', 'parameterization'):
    assert f'prime_jax.diffusion.{name}' in MODULES


def test_no_forbidden_modules_loaded():
  code = ('import importlib, sys\n'
          f'for m in {MODULES!r}: importlib.import_module(m)\n'
          f'bad = sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})\n'
          'assert not bad, bad\n'
          'assert not any(m.startswith("prime_jax.") and m.split(".")[1] not in ("diffusion",)\n'
          '               for m in sys.modules), "diffusion imports other prime_jax packages"\n')
  root = DIFFUSION_DIR.parent.parent
  proc = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True,
                        env={'PYTHONPATH': str(root), 'JAX_PLATFORMS': 'cpu', 'PATH': ''},
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]


def _imported_roots(path):
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      yield node.module


def test_no_forbidden_imports_in_source():
  files = sorted(DIFFUSION_DIR.glob('*.py'))
  assert len(files) >= 5
  for path in files:
    for name in _imported_roots(path):
      root = name.split('.')[0]
      assert root not in FORBIDDEN, f'{path.name} imports {name}'
      if root == 'prime_jax':
        assert name.startswith('prime_jax.diffusion'), f'{path.name} imports {name}'
