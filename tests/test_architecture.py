"""The package's dependency rules, read from the source (every import, also inside functions):
no import cycles; models/ and kernels/ stay below the training code; only build (and the entry
points above it) read the config."""

import ast
import pathlib

import pytest

import prime_jax

PKG = pathlib.Path(prime_jax.__file__).parent


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PKG.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob('*.py'))}


def _imports(path: pathlib.Path) -> list[str]:
  """Every module name an import statement in `path` names (absolute imports)."""
  out = []
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      out.extend(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      out.append(node.module)
      # `from prime_jax.x import y` imports the module prime_jax.x.y when y is one.
      out.extend(f'{node.module}.{a.name}' for a in node.names
                 if f'{node.module}.{a.name}' in MODULES)
    elif isinstance(node, ast.ImportFrom) and node.level:
      raise AssertionError(f'{path}: relative import; the package uses absolute imports only.')
  return out


def import_graph() -> dict[str, set[str]]:
  """module -> the prime_jax modules it imports (a submodule import runs its packages' __init__
  too, so those are edges as well)."""
  graph = {}
  for name, path in MODULES.items():
    edges = set()
    for target in _imports(path):
      if target.split('.')[0] != 'prime_jax':
        continue
      parts = target.split('.')
      for i in range(1, len(parts) + 1):
        candidate = '.'.join(parts[:i])
        if candidate in MODULES and candidate != name and not name.startswith(candidate + '.'):
          edges.add(candidate)
    graph[name] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]):
  """A list of modules forming a cycle, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    state[node] = 'done'
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def _external_roots(name: str) -> set[str]:
  return {t.split('.')[0] for t in _imports(MODULES[name])} - {'prime_jax'}


def test_the_graph_sees_the_real_modules():
  graph = import_graph()
  assert {'prime_jax.build', 'prime_jax.train', 'prime_jax.evaluate', 'prime_jax.kernels.head',
          'prime_jax.models.dit'} <= set(graph)
  assert 'prime_jax.build' in graph['prime_jax.train']
  assert 'prime_jax.kernels.head' in graph['prime_jax.losses']


def test_find_cycle_finds_one():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set(), 'c': {'a', 'b'}}) is None


def test_no_import_cycles():
  cycle = find_cycle(import_graph())
  assert cycle is None, ' -> '.join(cycle)


@pytest.mark.parametrize('package,allowed', [
    # Flax modules only: no diffusion, losses, training, config.
    ('prime_jax.models', {'prime_jax.models'}),
    # Kernels take plain arrays: the core's maths, nothing of models or training.
    ('prime_jax.kernels', {'prime_jax.kernels', 'prime_jax.diffusion'}),
])
def test_layer_imports_stay_below(package, allowed):
  graph = import_graph()
  for name, edges in graph.items():
    if name == package or name.startswith(package + '.'):
      bad = sorted(e for e in edges if not any(e == a or e.startswith(a + '.') for a in allowed))
      assert not bad, f'{name} imports {bad}'


@pytest.mark.parametrize('package,forbidden', [
    ('prime_jax.models', {'optax', 'orbax', 'grain', 'ml_collections', 'configs'}),
    ('prime_jax.kernels', {'flax', 'optax', 'orbax', 'grain', 'ml_collections', 'configs'}),
])
def test_layer_external_imports(package, forbidden):
  for name in MODULES:
    if name == package or name.startswith(package + '.'):
      assert not _external_roots(name) & forbidden, f'{name}: {_external_roots(name) & forbidden}'


def test_only_the_composition_root_reads_the_config():
  """ml_collections (the config type) is imported by build (the reader), main (the flag) and
  train (train_and_evaluate(config, workdir) hands it to build and records it); nobody else."""
  readers = sorted(n for n in MODULES if 'ml_collections' in _external_roots(n))
  assert readers == ['prime_jax.build', 'prime_jax.main', 'prime_jax.train']
  for name, path in MODULES.items():
    assert 'configs' not in _external_roots(name), f'{name} imports the configs package'
