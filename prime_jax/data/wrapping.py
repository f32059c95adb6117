"""Wrapping tokenized documents into fixed-length sequences (BOS, content, EOS), in groups.

Documents are joined with EOS and cut into rows of L - 2 content tokens between a BOS and an EOS.
Groups of DOCS_PER_GROUP documents are wrapped separately, so a corpus can be wrapped in pieces
(in parallel, or streamed) with the same result.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from prime_jax.data.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, check_ids

DOCS_PER_GROUP = 1000


def wrap_groups(docs: Iterable[Sequence[int]], seq_len: int, *,
                docs_per_group: Optional[int] = DOCS_PER_GROUP,
                vocab_size: int = VOCAB_SIZE) -> Iterator[np.ndarray]:
  """Yield the wrapped (n, L) uint16 sequences of each group of tokenized documents.

  `docs_per_group=None` treats the whole stream as one group (only the final remainder dropped).
  """
  if seq_len < 3:
    raise ValueError(f'seq_len={seq_len} leaves no room for content between BOS and EOS; use >= 3.')
  if vocab_size > 2**16:
    raise ValueError(f'vocab_size={vocab_size} does not fit the uint16 storage; widen the dtype.')
  group: list[np.ndarray] = []

  def flush() -> np.ndarray:
    stream = np.concatenate(group) if group else np.zeros((0,), np.int64)
    group.clear()
    check_ids(stream, vocab_size, where='tokenized documents')
    chunk = seq_len - 2
    n = stream.size // chunk
    out_NxL = np.empty((n, seq_len), np.uint16)
    out_NxL[:, 0] = BOS_ID
    out_NxL[:, -1] = EOS_ID
    out_NxL[:, 1:-1] = stream[:n * chunk].reshape(n, chunk)
    return out_NxL

  for doc in docs:
    group.append(np.asarray(doc, np.int64))
    group.append(np.array([EOS_ID], np.int64))
    if docs_per_group is not None and len(group) == 2 * docs_per_group:
      yield flush()
  if group:
    yield flush()


def wrap(docs: Iterable[Sequence[int]], seq_len: int, *,
         docs_per_group: Optional[int] = DOCS_PER_GROUP,
         vocab_size: int = VOCAB_SIZE) -> np.ndarray:
  """All wrapped sequences of `docs` as one (N, L) uint16 array."""
  parts = list(wrap_groups(docs, seq_len, docs_per_group=docs_per_group, vocab_size=vocab_size))
  return np.concatenate(parts) if parts else np.zeros((0, seq_len), np.uint16)
