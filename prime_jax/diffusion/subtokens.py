"""The sub-tokenizer f_ell: token ids <-> ell base-b digits (method.md §1, 12.2).

Dimension key:
  B: batch            S: token grid (L,) for text, (H, W, channels) for images
  K: sub-tokens per token (ell)      C: token classes (vocab_size)
  N: codes, b**K (N >= C; codes >= C are invalid and never produced by `encode`)

A token x is mapped to a code (x itself, or perm[x] with index shuffling) and the code is written in
base b, most significant digit first. The mask sub-token is m = b, so the input vocabulary of a
model has b + 1 symbols.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import jax.numpy as jnp
import numpy as np

_INT32_MAX = 2**31 - 1


def smallest_base(vocab_size: int, ell: int) -> int:
  """Smallest integer b >= 2 with b**ell >= vocab_size, computed without floating-point error."""
  b = max(2, int(round(vocab_size ** (1.0 / ell))))
  while b > 2 and (b - 1) ** ell >= vocab_size:
    b -= 1
  while b**ell < vocab_size:
    b += 1
  return b


class Codec:
  """Base-b sub-token codec with optional index shuffling (MDM-Prime-v2).

  Args:
    vocab_size: C, number of token classes.
    ell: K, sub-tokens per token.
    shuffle_seed: if given, tokens are permuted by a permutation of [0, C) drawn from this seed
      before encoding (and the permutation is inverted after decoding).
    permutation: an explicit int array instead of a seed: a permutation of [0, n), C <= n <= b**K
      (e.g. the authors' perm_32768 for C = 32000, whose tail is the identity). Token x gets code
      permutation[x]. Use `Codec.from_permutation_file` for a raw little-endian int64 file.

  The codec is a plain, hashable Python object holding numpy tables, so it can be closed over or
  passed as a static argument to `jax.jit`.
  """

  def __init__(self, vocab_size: int, ell: int, shuffle_seed: Optional[int] = None,
               permutation: Optional[np.ndarray] = None):
    vocab_size, ell = int(vocab_size), int(ell)
    if vocab_size < 2:
      raise ValueError(f'vocab_size must be >= 2, got {vocab_size}.')
    if ell < 1:
      raise ValueError(f'ell (sub-tokens per token) must be >= 1, got {ell}.')
    if shuffle_seed is not None and permutation is not None:
      raise ValueError('Pass either shuffle_seed or permutation, not both.')
    self.vocab_size = vocab_size
    self.ell = ell
    self.base = smallest_base(vocab_size, ell)
    self.num_codes = self.base**ell
    if self.num_codes > _INT32_MAX:
      raise ValueError(
          f'b**ell = {self.base}**{ell} = {self.num_codes} codes overflow int32; use a larger ell '
          f'(at most ceil(log2 C) = {(vocab_size - 1).bit_length()}) so that codes fit in 31 bits.')
    self.mask_id = self.base
    self.shuffle_seed = shuffle_seed

    if shuffle_seed is not None:
      permutation = np.random.default_rng(int(shuffle_seed)).permutation(vocab_size)
    if permutation is not None:
      permutation = np.asarray(permutation).astype(np.int64).reshape(-1)
      n = permutation.shape[0]
      if not vocab_size <= n <= self.num_codes:
        raise ValueError(f'A permutation must have length in [C, b**ell] = [{vocab_size}, '
                         f'{self.num_codes}], got {n}.')
      if not np.array_equal(np.sort(permutation), np.arange(n)):
        raise ValueError(f'The array of length {n} is not a permutation of range({n}).')
      code_of_token = permutation[:vocab_size]
      token_of_code = np.arange(self.num_codes, dtype=np.int64)  # codes >= n map to themselves
      token_of_code[permutation] = np.arange(n)
      self._code_of_token = code_of_token.astype(np.int32)
      self._token_of_code = token_of_code.astype(np.int32)
    else:
      self._code_of_token = None
      self._token_of_code = None

    self.powers = np.array([self.base**(ell - 1 - j) for j in range(ell)], dtype=np.int64)
    codes = self.codes
    self.digits = ((codes[:, None].astype(np.int64) // self.powers) % self.base).astype(np.int32)
    self._fingerprint = hashlib.sha256(
        repr((vocab_size, ell)).encode()
        + (b'' if self._code_of_token is None else self._code_of_token.tobytes())).hexdigest()

  # -- constructors -----------------------------------------------------------------------------

  @classmethod
  def binary(cls, vocab_size: int, **kwargs) -> 'Codec':
    """The MDM-Prime-v2 binary codec: b = 2, ell = ceil(log2 C)."""
    return cls(vocab_size, max(1, (int(vocab_size) - 1).bit_length()), **kwargs)

  @classmethod
  def from_permutation_file(cls, path: str, vocab_size: int, ell: int) -> 'Codec':
    """Reads a permutation stored as raw little-endian int64 (`*/data/0` of the authors' .pt)."""
    return cls(vocab_size, ell, permutation=np.fromfile(path, dtype='<i8'))

  # -- properties ---------------------------------------------------------------------------------

  @property
  def shuffled(self) -> bool:
    return self._code_of_token is not None

  @property
  def codes(self) -> np.ndarray:
    """(C,) code of every token: the token id itself unless shuffled."""
    if self._code_of_token is None:
      return np.arange(self.vocab_size, dtype=np.int32)
    return self._code_of_token

  @property
  def token_of_code(self) -> np.ndarray:
    """(N,) inverse map; entries >= C mark invalid codes."""
    if self._token_of_code is None:
      return np.arange(self.num_codes, dtype=np.int32)
    return self._token_of_code

  @property
  def num_invalid(self) -> int:
    """Number of codes in [0, b**ell) that no token maps to."""
    return self.num_codes - self.vocab_size

  # -- the codec ----------------------------------------------------------------------------------

  def encode(self, x: jnp.ndarray) -> jnp.ndarray:
    """(B, *S) token ids -> (B, *S, K) digits, most significant first."""
    x = jnp.asarray(x).astype(jnp.int32)
    code = x if self._code_of_token is None else jnp.asarray(self._code_of_token)[x]
    powers = jnp.asarray(self.powers.astype(np.int32))
    return (code[..., None] // powers) % self.base

  def decode(self, y: jnp.ndarray) -> jnp.ndarray:
    """(B, *S, K) digits -> (B, *S) ids. Invalid codes decode to ids >= C; masks are not allowed."""
    y = jnp.asarray(y).astype(jnp.int32)
    code = jnp.sum(y * jnp.asarray(self.powers.astype(np.int32)), axis=-1)
    if self._token_of_code is None:
      return code
    return jnp.asarray(self._token_of_code)[code]

  def check(self, x) -> np.ndarray:
    """Host-side check: raises ValueError unless every id lies in [0, C). Returns x as numpy."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
      raise ValueError(f'Token ids must be integers, got dtype {x.dtype}.')
    bad = (x < 0) | (x >= self.vocab_size)
    if bad.any():
      idx = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(
          f'{int(bad.sum())} token id(s) outside [0, {self.vocab_size}), e.g. {int(x[idx])} at '
          f'index {idx}. The tokenizer and the codec disagree on the vocabulary size: set '
          'vocab_size to the tokenizer\'s vocabulary (GPT-2: 50257) or fix the data; ids are '
          'never clamped.')
    return x

  # -- identity -----------------------------------------------------------------------------------

  def __eq__(self, other) -> bool:
    return isinstance(other, Codec) and self._fingerprint == other._fingerprint

  def __hash__(self) -> int:
    return hash(self._fingerprint)

  def __repr__(self) -> str:
    shuffle = ', shuffled' if self.shuffled else ''
    return (f'Codec(C={self.vocab_size}, ell={self.ell}, base={self.base}, codes={self.num_codes}'
            f'{shuffle})')
