"""GPT-2 BPE through tiktoken, built offline from the fetched `gpt2.tiktoken` ranks (method.md §10).

tiktoken's own `get_encoding('gpt2')` downloads its files at first use, which the offline machines
cannot do; we build the identical `tiktoken.Encoding` from the cached rank file instead. C = 50257
and `<|endoftext|>` (50256) is both BOS and EOS, as in MDLM's wrapped data.

Text is always encoded as ordinary text: a literal "<|endoftext|>" inside a document is split into
ordinary tokens rather than becoming the special id, so documents cannot forge separators.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import numpy as np

from prime_jax.data import assets

VOCAB_SIZE = 50257
EOS_ID = 50256
BOS_ID = EOS_ID
_ENDOFTEXT = '<|endoftext|>'
_RANKS_SHA256 = assets.ASSETS['tokenizer'].file_sha256


class Tokenizer:
  """GPT-2 tokenizer; cheap to share (the Encoding is immutable and thread-safe)."""

  def __init__(self, ranks_path: Optional[os.PathLike] = None):
    import tiktoken  # pylint: disable=import-outside-toplevel
    from tiktoken.load import load_tiktoken_bpe  # pylint: disable=import-outside-toplevel
    from tiktoken_ext import openai_public  # pylint: disable=import-outside-toplevel

    ranks_path = os.fspath(ranks_path or assets.path('tokenizer'))
    ranks = load_tiktoken_bpe(ranks_path, expected_hash=_RANKS_SHA256)
    self._enc = tiktoken.Encoding(
        name='gpt2_offline',
        pat_str=openai_public.r50k_pat_str,  # the r50k/gpt2 split regex, read, not retyped
        mergeable_ranks=ranks,
        special_tokens={_ENDOFTEXT: EOS_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )

  @property
  def vocab_size(self) -> int:
    return VOCAB_SIZE

  @property
  def eos_id(self) -> int:
    return EOS_ID

  @property
  def bos_id(self) -> int:
    return BOS_ID

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without special tokens."""
    return self._enc.encode_ordinary(text)

  def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
    """`encode` over many texts; tiktoken releases the GIL, so threads help."""
    return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids` (invalid UTF-8 from cut-off byte tokens becomes U+FFFD)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    check_ids(ids, VOCAB_SIZE)
    return self._enc.decode(ids.tolist(), errors='replace')


def check_ids(ids: np.ndarray, vocab_size: int, *, where: str = 'token ids') -> None:
  """Raise if any id is outside [0, vocab_size): silent clamping would corrupt the data."""
  ids = np.asarray(ids)
  if ids.size == 0:
    return
  lo, hi = int(ids.min()), int(ids.max())
  if hi >= vocab_size or lo < 0:
    bad = hi if hi >= vocab_size else lo
    raise ValueError(
        f'{where} contain id {bad}, outside the vocabulary [0, {vocab_size}). The data was '
        f'produced with a different tokenizer or is corrupt; re-create it with the GPT-2 '
        f'tokenizer (C = {vocab_size}) instead of clamping.')


@functools.lru_cache(maxsize=4)
def _cached(ranks_path: str) -> Tokenizer:
  return Tokenizer(ranks_path)


def get_tokenizer() -> Tokenizer:
  """The shared GPT-2 tokenizer from the asset cache (built once per process and cache path)."""
  return _cached(os.fspath(assets.path('tokenizer')))


def encode(text: str) -> list[int]:
  """GPT-2 ids of `text` (no special tokens) with the shared tokenizer."""
  return get_tokenizer().encode(text)


def encode_batch(texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
  return get_tokenizer().encode_batch(texts, num_threads=num_threads)


def decode(ids: Sequence[int] | np.ndarray) -> str:
  return get_tokenizer().decode(ids)
