"""PyTorch's zip checkpoint format, read and written without torch.

A `torch.save` file (and a TorchScript `.pt`) is a zip holding `<archive>/data.pkl`, a pickle whose
tensors are persistent references to raw little-endian storages `<archive>/data/<key>`. Unpickling
is code execution, so `read` resolves only:
  - tensor rebuilding and storage types (torch), OrderedDict / defaultdict, and the plain builtin
    types; nothing else is ever imported or called;
  - any other *class* (a name starting with a capital letter: omegaconf configs, a pickled
    tokenizer, argparse.Namespace, TorchScript modules) becomes an inert `Stub` that only records
    its arguments and state;
  - everything else (functions such as os.system or builtins.eval, or classes from modules that
    run programs) is refused with `UnsafePickleError` before anything happens.
Tensors come back as `Tensor`s: shape, dtype and where the bytes are; `.numpy()` reads just that
storage from the zip, so a 2.7 GB training state is converted one tensor at a time.

`write` produces a file `torch.load` reads (with `weights_only=True` when it holds only tensors and
plain containers): the same zip layout torch writes (stored, 64-byte aligned records).
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import functools
import io
import os
import pickle
import re
import zipfile
from typing import Any, Callable, Optional, Union

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle asked for a callable outside the allow-list (unpickling it could run code)."""


class FormatError(ValueError):
  """The file is not a readable torch zip checkpoint (truncated, damaged or of another format)."""


@dataclasses.dataclass(frozen=True)
class StorageType:
  name: str
  dtype: np.dtype


STORAGES = {name: StorageType(name, np.dtype(dt)) for name, dt in (
    ('FloatStorage', '<f4'), ('DoubleStorage', '<f8'), ('HalfStorage', '<f2'),
    ('BFloat16Storage', '<u2'), ('LongStorage', '<i8'), ('IntStorage', '<i4'),
    ('ShortStorage', '<i2'), ('CharStorage', 'i1'), ('ByteStorage', 'u1'),
    ('BoolStorage', '?'))}
_STORAGE_OF_DTYPE = {np.dtype('<f4'): 'FloatStorage', np.dtype('<f8'): 'DoubleStorage',
                     np.dtype('<f2'): 'HalfStorage', np.dtype('<i8'): 'LongStorage',
                     np.dtype('<i4'): 'IntStorage', np.dtype('<i2'): 'ShortStorage',
                     np.dtype('i1'): 'CharStorage', np.dtype('u1'): 'ByteStorage',
                     np.dtype('?'): 'BoolStorage'}


# -- reading ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Storage:
  reader: 'TorchFile'
  key: str
  type: StorageType
  numel: int


@dataclasses.dataclass(frozen=True)
class Tensor:
  """A tensor of the file, not yet read: `.numpy()` reads its storage from the zip."""
  storage: _Storage
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]

  @property
  def dtype(self) -> np.dtype:
    return self.storage.type.dtype

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

  def numpy(self) -> np.ndarray:
    """The tensor as a new native-endian, C-contiguous numpy array (bfloat16 as uint16 bits)."""
    flat = self.storage.reader.read_storage(self.storage)
    if 0 in self.shape:
      return np.zeros(self.shape, flat.dtype)
    item = flat.itemsize
    view = np.lib.stride_tricks.as_strided(flat[self.offset:], self.shape,
                                           [s * item for s in self.stride], writeable=False)
    return np.array(view, order='C')  # (ascontiguousarray would make a 0-d tensor 1-d)

  def __repr__(self) -> str:
    return f'Tensor({self.shape}, {self.storage.type.name})'


class Stub:
  """Inert stand-in for a pickled object of a class we do not import: its constructor arguments,
  its state and any items or elements the pickle added. `qualname` is 'module.Name'."""
  qualname = '?'

  def __new__(cls, *args, **kwargs):
    obj = super().__new__(cls)
    obj.args, obj.kwargs, obj.state, obj.items, obj.elements = args, kwargs, None, {}, []
    return obj

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state: Any) -> None:
    self.state = state

  def __setitem__(self, key, value) -> None:
    self.items[key] = value

  def append(self, value) -> None:
    self.elements.append(value)

  def extend(self, values) -> None:
    self.elements.extend(values)

  def __repr__(self) -> str:
    return f'<stub {self.qualname}>'


@functools.lru_cache(maxsize=None)
def stub_class(qualname: str) -> type:
  return type(qualname.rpartition('.')[2], (Stub,), {'qualname': qualname})


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None) -> Tensor:
  """torch._utils._rebuild_tensor_v2 for lazy storages, with the bounds checked first."""
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage):
    raise FormatError('a tensor is rebuilt from something that is not a storage of the file')
  size, stride, offset = tuple(map(int, size)), tuple(map(int, stride)), int(storage_offset)
  if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
    raise FormatError(f'bad tensor geometry size={size} stride={stride} offset={offset}')
  if 0 not in size:
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.numel:
      raise FormatError(f'a tensor (size={size}, stride={stride}, offset={offset}) reaches past '
                        f'its storage of {storage.numel} elements')
  return Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state) -> Any:
  del requires_grad, backward_hooks, state
  return data


_BUILTIN_TYPES = {name: getattr(builtins, name) for name in (
    'dict', 'list', 'tuple', 'set', 'frozenset', 'int', 'float', 'complex', 'str', 'bytes',
    'bytearray', 'bool', 'slice', 'range', 'object')}
_BUILTIN_TYPES['long'] = int
_BUILTIN_TYPES['unicode'] = str

_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch', 'Size'): tuple,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('collections', 'defaultdict'): collections.defaultdict,
}
# Classes from these modules are refused even as stubs: they exist to run programs or code.
_REFUSED_MODULES = ('os', 'posix', 'nt', 'subprocess', 'sys', 'shutil', 'socket', 'importlib',
                    'runpy', 'pickle', 'marshal', 'types', 'code', 'codeop', 'ctypes', 'operator',
                    'functools', 'builtins', '__builtin__', 'multiprocessing', 'threading',
                    'asyncio', 'pty', 'webbrowser', 'torch', 'numpy', 'copyreg', 'inspect')
_IDENT = re.compile(r'[A-Za-z_][A-Za-z0-9_]*\Z')


def _is_class_name(module: str, name: str) -> bool:
  parts = module.split('.')
  return (all(_IDENT.match(p) for p in parts) and bool(_IDENT.match(name)) and name[0].isupper()
          and parts[0] not in _REFUSED_MODULES)


class _Unpickler(pickle.Unpickler):

  def __init__(self, data: bytes, reader: 'TorchFile', extra: dict):
    super().__init__(io.BytesIO(data))
    self._reader, self._extra = reader, extra

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in self._extra:
      return self._extra[(module, name)]
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == 'torch' and name in STORAGES:
      return STORAGES[name]
    if module in ('builtins', '__builtin__') and _BUILTIN_TYPES.get(name) is not None:
      return _BUILTIN_TYPES[name]
    if module == 'typing' and _IDENT.match(name):
      return stub_class(f'typing.{name}')  # typing.Any and friends: markers, never called
    if _is_class_name(module, name):
      return stub_class(f'{module}.{name}')
    raise UnsafePickleError(
        f'{self._reader.path}: refusing to unpickle the global {module}.{name}: it is not on the '
        'allow-list of tensor, container and class names (unpickling arbitrary callables can '
        'execute code). This file is not a plain PyTorch checkpoint; do not load it with '
        'torch.load either unless you trust its origin.')

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
      raise FormatError(f'unsupported persistent id {pid!r}')
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, StorageType):
      raise FormatError(f'a persistent id names no storage type: {storage_type!r}')
    if not (isinstance(key, str) and _IDENT.match('k' + key)):
      raise FormatError(f'bad storage key {key!r}')
    return self._reader.storage(key, storage_type, int(numel))


class TorchFile:
  """An open torch zip checkpoint. `root` is its unpickled object (read lazily on first access);
  tensors read their bytes from the open zip, so keep the file open until they are read:

    with TorchFile(path) as f:
      weights = {k: t.numpy() for k, t in f.root['state_dict'].items()}
  """

  def __init__(self, path: Union[str, os.PathLike], *,
               extra_globals: Optional[dict[tuple[str, str], Callable[..., Any]]] = None):
    self.path = str(path)
    self._extra = dict(extra_globals or {})
    try:
      self._zip = zipfile.ZipFile(self.path)
    except zipfile.BadZipFile as e:
      size = os.path.getsize(self.path)
      raise FormatError(
          f'{self.path} ({size:,} bytes) is not a readable zip archive ({e}): a truncated or '
          'damaged download, or a checkpoint saved with the legacy (non-zip) format. Download it '
          'again; compare its size with the one the source lists.') from None
    pkls = [n for n in self._zip.namelist() if n.count('/') == 1 and n.endswith('/data.pkl')]
    if len(pkls) != 1:
      self._zip.close()
      raise FormatError(f'{self.path}: expected one <archive>/data.pkl in the zip, found {pkls}.')
    self.archive = pkls[0].split('/')[0]
    self._storages: dict[str, _Storage] = {}
    self._root = None
    self._loaded = False

  def __enter__(self) -> 'TorchFile':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self._zip.close()

  @property
  def root(self) -> Any:
    if not self._loaded:
      data = self._read(f'{self.archive}/data.pkl')
      try:
        self._root = _Unpickler(data, self, self._extra).load()
      except (EOFError, pickle.UnpicklingError) as e:
        if isinstance(e, UnsafePickleError):
          raise
        raise FormatError(f'{self.path}: its data.pkl does not unpickle ({e}).') from None
      self._loaded = True
    return self._root

  def storage(self, key: str, storage_type: StorageType, numel: int) -> _Storage:
    if key not in self._storages:
      name = f'{self.archive}/data/{key}'
      try:
        info = self._zip.getinfo(name)
      except KeyError:
        raise FormatError(f'{self.path}: storage {key} is missing from the archive (a truncated '
                          'file?).') from None
      if info.file_size != numel * storage_type.dtype.itemsize:
        raise FormatError(f'{self.path}: storage {key} holds {info.file_size} bytes for {numel} '
                          f'x {storage_type.dtype}.')
      self._storages[key] = _Storage(self, key, storage_type, numel)
    return self._storages[key]

  def _read(self, name: str) -> bytes:
    try:
      return self._zip.read(name)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
      raise FormatError(f'{self.path}: cannot read {name} ({e}); the file is truncated or '
                        'damaged. Download it again.') from None

  def read_storage(self, storage: _Storage) -> np.ndarray:
    raw = self._read(f'{self.archive}/data/{storage.key}')
    dtype = storage.type.dtype
    return np.frombuffer(raw, dtype).astype(dtype.newbyteorder('='), copy=False)


def read(path: Union[str, os.PathLike], **kwargs) -> Any:
  """The whole object of a small file, every tensor read as a numpy array."""
  with TorchFile(path, **kwargs) as f:
    return map_tensors(f.root, lambda t: t.numpy())


def map_tensors(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
  """`obj` with every Tensor replaced by fn(tensor), through dicts, lists and tuples."""
  if isinstance(obj, Tensor):
    return fn(obj)
  if isinstance(obj, collections.OrderedDict):
    return collections.OrderedDict((k, map_tensors(v, fn)) for k, v in obj.items())
  if isinstance(obj, dict):
    return {k: map_tensors(v, fn) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(map_tensors(v, fn) for v in obj)
  return obj


# -- writing ---------------------------------------------------------------------------------------


class _Global:
  """A name the pickle refers to (written as GLOBAL module name, never imported here)."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name


_REBUILD = _Global('torch._utils', '_rebuild_tensor_v2')
_STORAGE_GLOBALS = {name: _Global('torch', name) for name in _STORAGE_OF_DTYPE.values()}
_ORDERED_DICT = _Global('collections', 'OrderedDict')


class _StorageRef:
  """A storage of the file being written: pickled as a persistent id, its bytes go to data/<key>."""

  def __init__(self, key: str, array: np.ndarray):
    self.key, self.array = key, array


class _Pickler(pickle._Pickler):  # the Python pickler: it lets us write GLOBALs without importing
  dispatch = dict(pickle._Pickler.dispatch)

  def persistent_id(self, obj):
    if isinstance(obj, _StorageRef):
      storage = _STORAGE_GLOBALS[_STORAGE_OF_DTYPE[obj.array.dtype.newbyteorder('<')]]
      return ('storage', storage, obj.key, 'cpu', int(obj.array.size))
    return None

  def save_global(self, obj, name=None):
    if isinstance(obj, _Global):
      self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode('utf-8'))
      self.memoize(obj)
      return
    raise pickle.PicklingError(f'cannot write {obj!r}: only tensors and plain containers')

  def _save_tensor(self, tensor: '_TensorOut') -> None:
    array = tensor.storage.array
    shape = tuple(int(n) for n in array.shape)
    stride = tuple(int(s // array.itemsize) for s in array.strides)
    self.save_reduce(_REBUILD, (tensor.storage, 0, shape, stride, False, _OrderedDictOut({})),
                     obj=tensor)

  def _save_ordered(self, od: '_OrderedDictOut') -> None:
    self.save_reduce(_ORDERED_DICT, (), obj=od)
    self._batch_setitems(iter(od.items.items()))

  def save_reduce(self, func, args, state=None, listitems=None, dictitems=None,
                  state_setter=None, *, obj=None):
    # Like pickle's REDUCE, but `func` is a `_Global`.
    if isinstance(func, _Global):
      self.save(func)  # through the memo: each name is written once
      self.save(args)
      self.write(pickle.REDUCE)
      if obj is not None:
        self.memoize(obj)
      return
    super().save_reduce(func, args, state, listitems, dictitems, state_setter, obj=obj)


class _OrderedDictOut:

  def __init__(self, items: dict):
    self.items = items


class _TensorOut:

  def __init__(self, storage: _StorageRef):
    self.storage = storage


_Pickler.dispatch[_TensorOut] = lambda self, obj: self._save_tensor(obj)
_Pickler.dispatch[_OrderedDictOut] = lambda self, obj: self._save_ordered(obj)
_Pickler.dispatch[_Global] = lambda self, obj: self.save_global(obj)


def write(obj: Any, path: Union[str, os.PathLike], *, archive: Optional[str] = None) -> None:
  """Writes `obj` (dicts, OrderedDicts, lists, tuples, str, int, float, bool, None and numpy arrays
  as tensors) as a torch zip checkpoint. The archive folder is named after the file, as torch does.
  The file appears complete or not at all (written to a temporary name, then renamed)."""
  path = str(path)
  archive = archive or os.path.splitext(os.path.basename(path))[0] or 'archive'
  arrays: list[_StorageRef] = []

  def prepare(o):
    if isinstance(o, np.ndarray):
      a = np.asarray(o, order='C')  # keeps 0-d tensors 0-d
      if a.dtype.newbyteorder('<') not in _STORAGE_OF_DTYPE:
        raise TypeError(f'cannot write an array of dtype {a.dtype} as a torch tensor')
      ref = _StorageRef(str(len(arrays)), a.astype(a.dtype.newbyteorder('<'), copy=False))
      arrays.append(ref)
      return _TensorOut(ref)
    if isinstance(o, collections.OrderedDict):
      return _OrderedDictOut({k: prepare(v) for k, v in o.items()})
    if isinstance(o, dict):
      return {k: prepare(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
      return type(o)(prepare(v) for v in o)
    if o is None or isinstance(o, (str, int, float, bool)):
      return o
    raise TypeError(f'cannot write {type(o).__name__} into a torch checkpoint')

  prepared = prepare(obj)
  buf = io.BytesIO()
  _Pickler(buf, protocol=2).dump(prepared)
  tmp = path + '.partial'
  with zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_STORED) as zf:
    _write_aligned(zf, f'{archive}/data.pkl', buf.getvalue())
    _write_aligned(zf, f'{archive}/.format_version', b'1')
    _write_aligned(zf, f'{archive}/.storage_alignment', b'64')
    _write_aligned(zf, f'{archive}/byteorder', b'little')
    for ref in arrays:
      _write_aligned(zf, f'{archive}/data/{ref.key}', ref.array.tobytes())
    _write_aligned(zf, f'{archive}/version', b'3\n')
  os.replace(tmp, path)


def _write_aligned(zf: zipfile.ZipFile, name: str, data: bytes, alignment: int = 64) -> None:
  """A stored record whose data starts at a multiple of `alignment` (padding in the extra field,
  as torch writes it, so the storages can be memory-mapped)."""
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  header = 30 + len(name.encode('utf-8'))
  offset = zf.fp.tell()
  pad = (-(offset + header + 4)) % alignment
  info.extra = b'FB' + pad.to_bytes(2, 'little') + b'Z' * pad
  zf.writestr(info, data)
