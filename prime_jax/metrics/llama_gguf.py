"""Llama-architecture causal LM from a GGUF file (the offline SmolLM2-135M-Instruct scorer).

docs/assets.md: no registry ships GPT-2 large, so the offline generative-perplexity scorer is
SmolLM2-135M-Instruct as a llama.cpp GGUF (`assets.path('smollm2')`, Q4_1 weights, Q8_0 embedding).
The `gguf` package reads the file; every tensor is dequantized once to float32 numpy, and the model
runs in fp32 JAX. Hyperparameters come from the `llama.*` metadata, the tokenizer from
`tokenizer.ggml.*`. Perplexities from this model are a relative, offline metric, not comparable with
the paper's GPT-2-large numbers; callers must name the scorer next to every number.

Dimension key:
  B: batch  L: sequence length  D: embedding_length  H: query heads  G: key/value heads
  R: H // G (query heads per kv head)  K: head dim  F: feed_forward_length  V: vocab  N: layers

Rotary convention. llama.cpp's converter permutes the HF q/k projection rows so that rotary acts on
*adjacent pairs* (x[2i], x[2i+1]) with frequency base^(-2i/K) ("interleaved", LLAMA_ROPE_TYPE_NORM).
We apply exactly that to the GGUF weights. Using HF's half-split rotate-half on these weights
instead gives a wrong model (docs/assets.md: ~134 instead of ~39 perplexity on a plain English
sentence;
here 25.3 vs 38.3 on "The cat sat on the mat and looked out of the window at the birds in the
garden.").

Tokenizer. SmolLM2 is a GPT-2-style byte-level BPE (`tokenizer.ggml.model = gpt2`) with
pre-tokenizer `tokenizer.ggml.pre = smollm`. In llama.cpp that pre-type splits every digit first
(`\\p{N}`) and then applies the GPT-2 regex to the remaining pieces (the StarCoder-style HF
pre-tokenizer Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]). As a single
tiktoken regex that is `SMOLLM_PAT_STR` below: digits are single pieces, and a whitespace run
directly before a digit is one piece (in HF it ends a piece, where GPT-2's `\\s+(?!\\S)` takes all
of it). The merge ranks are the token ids themselves: the 17 control tokens come first, then the 235
single-byte tokens, then one token per merge in merge order, so lower id == higher merge priority
and a tiktoken `Encoding` with `mergeable_ranks = {bytes: id}` reproduces the BPE. 21 byte values
have no token (six C0 control characters and bytes that never occur in UTF-8, plus the lead bytes
F1/F2 of planes 4-11); they get ranks above the vocabulary so tiktoken can split them out, and are
then dropped, as an HF `tokenizers` BPE built from the same vocabulary (no unk token, no byte
fallback) drops them.

Checked once (tests/test_genppl.py repeats the tokenizer check on a few tricky strings): on 2,044
texts (SOTU and Moby-Dick excerpts, random strings mixing digits, whitespace runs, CJK, emoji,
control characters, literal special tokens; 277k tokens) the ids equal those of an HF `tokenizers`
BPE with the same vocabulary, merges and Sequence[Digits, ByteLevel] pre-tokenizer; the model's
per-token NLLs equal transformers' own GGUF loader (LlamaForCausalLM, which un-permutes q/k and uses
rotate-half) to 3e-4. Note that transformers' GGUF *tokenizer* conversion ignores
`tokenizer.ggml.pre` (plain ByteLevel, digits not split), so it differs from this one (and from
llama.cpp) on numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prime_jax.metrics.gpt2 import causal_attention, einsum, next_token_nll

Params = dict[str, Any]

# GPT-2's split regex with SmolLM2's individual-digit pre-split folded in (see the module doc).
SMOLLM_PAT_STR = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"""
                  r"""|\s+(?=\p{N})|\s+(?!\S)|\s+""")
# tokenizer.ggml.pre values whose llama.cpp regex is "\p{N}" followed by the GPT-2 regex.
_DIGIT_SPLIT_PRE = ('smollm', 'starcoder', 'refact', 'command-r', 'codeshell', 'exaone')
_TOKEN_CONTROL = 3  # llama.cpp token type of special/control tokens


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  n_layer: int
  dim: int
  n_head: int
  n_kv_head: int
  ffn_dim: int
  rope_dim: int
  rope_base: float
  norm_eps: float
  context_length: int
  name: str = 'llama'

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_head


# ----------------------------------------------------------------------------- model


def _rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + eps) * w


def rope_interleaved(x_BxLx_xK: jax.Array, rope_dim: int, base: float) -> jax.Array:
  """llama.cpp "normal" rotary: rotate adjacent pairs (x[2i], x[2i+1]) of the first `rope_dim` dims.

  Works on any (B, L, ..., K); position = index along axis 1.
  """
  L, K = x_BxLx_xK.shape[1], x_BxLx_xK.shape[-1]
  inv_freq = base ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)  # (rope_dim/2,)
  ang_LxP = np.arange(L, dtype=np.float64)[:, None] * inv_freq[None]
  shape = (1, L) + (1,) * (x_BxLx_xK.ndim - 3) + (rope_dim // 2,)
  cos = jnp.asarray(np.cos(ang_LxP), jnp.float32).reshape(shape)
  sin = jnp.asarray(np.sin(ang_LxP), jnp.float32).reshape(shape)
  rot, rest = x_BxLx_xK[..., :rope_dim], x_BxLx_xK[..., rope_dim:]
  pairs = rot.reshape(*rot.shape[:-1], rope_dim // 2, 2)
  x0, x1 = pairs[..., 0], pairs[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).reshape(rot.shape)
  return jnp.concatenate([out, rest], axis=-1) if K > rope_dim else out


def _block(cfg: LlamaConfig, x_BxLxD: jax.Array, p: Params, mask_BxL: jax.Array) -> jax.Array:
  B, L, _ = x_BxLxD.shape
  G, K = cfg.n_kv_head, cfg.head_dim
  R = cfg.n_head // G
  h = _rms_norm(x_BxLxD, p['attn_norm'], cfg.norm_eps)
  # GGUF/HF GQA layout: query head j uses kv head j // R, so heads reshape as (G, R).
  q = einsum('bld,ed->ble', h, p['wq']).reshape(B, L, G, R, K)
  k = einsum('bld,ed->ble', h, p['wk']).reshape(B, L, G, K)
  v = einsum('bld,ed->ble', h, p['wv']).reshape(B, L, G, K)
  q = rope_interleaved(q, cfg.rope_dim, cfg.rope_base)
  k = rope_interleaved(k, cfg.rope_dim, cfg.rope_base)
  a = causal_attention(q, k, v, mask_BxL).reshape(B, L, G * R * K)
  x_BxLxD = x_BxLxD + einsum('ble,de->bld', a, p['wo'])
  h = _rms_norm(x_BxLxD, p['ffn_norm'], cfg.norm_eps)
  gate = jax.nn.silu(einsum('bld,fd->blf', h, p['w_gate']))
  up = einsum('bld,fd->blf', h, p['w_up'])
  return x_BxLxD + einsum('blf,df->bld', gate * up, p['w_down'])


def forward(cfg: LlamaConfig, params: Params, ids_BxL: jax.Array,
            mask_BxL: Optional[jax.Array] = None) -> jax.Array:
  """Logits (B, L, V); `mask_BxL` (1 = real token) hides padded keys; positions are 0..L-1."""
  B, L = ids_BxL.shape
  if mask_BxL is None:
    mask_BxL = jnp.ones((B, L), bool)
  x = params['embed'][ids_BxL]

  def step(x, p):
    return _block(cfg, x, p, mask_BxL), None

  x, _ = jax.lax.scan(step, x, params['blocks'])
  x = _rms_norm(x, params['final_norm'], cfg.norm_eps)
  head = params['embed'] if params.get('output') is None else params['output']  # (V, D)
  return einsum('bld,vd->blv', x, head)


def nll(cfg: LlamaConfig, params: Params, ids_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
  """Per-token next-token NLL (B, L-1) in nats."""
  return next_token_nll(forward(cfg, params, ids_BxL, mask_BxL), ids_BxL)


# ----------------------------------------------------------------------------- tokenizer


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
  """Inverse of GPT-2's bytes_to_unicode: the printable stand-in character of every byte."""
  bs = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
        + list(range(ord('®'), ord('ÿ') + 1)))
  cs = list(bs)
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {chr(c): b for b, c in zip(bs, cs)}


class GGUFTokenizer:
  """Byte-level BPE from a GGUF's `tokenizer.ggml.*` metadata, run by tiktoken (see module doc).

  `encode` recognises the control tokens written literally in the text (e.g. "<|endoftext|>"), as
  the HF tokenizer does by default, and never adds BOS/EOS (`tokenizer.ggml.add_bos_token` is
  false for SmolLM2).
  """

  def __init__(self, tokens: Sequence[str], token_types: Sequence[int], merges: Sequence[str],
               *, pre: str, bos_id: int, eos_id: int, name: str = 'gguf_bpe'):
    import tiktoken  # pylint: disable=import-outside-toplevel

    if pre not in _DIGIT_SPLIT_PRE:
      raise ValueError(f'tokenizer.ggml.pre = {pre!r} is not supported; this reader implements the '
                       f'digit-split GPT-2 regex of {", ".join(_DIGIT_SPLIT_PRE)}.')
    u2b = _unicode_to_byte()
    ranks: dict[bytes, int] = {}
    special: dict[str, int] = {}
    for i, (tok, typ) in enumerate(zip(tokens, token_types)):
      if typ == _TOKEN_CONTROL:
        special[tok] = i
      else:
        ranks[bytes(u2b[c] for c in tok)] = i
    self._check_ranks_follow_merges(tokens, merges)
    self.vocab_size = len(tokens)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    for k, b in enumerate(missing):  # tiktoken needs every byte; these ids are dropped later
      ranks[bytes([b])] = self.vocab_size + k
    self.unknown_bytes = bytes(missing)
    self.tokens, self.merges = list(tokens), list(merges)
    self._enc = tiktoken.Encoding(name=name, pat_str=SMOLLM_PAT_STR, mergeable_ranks=ranks,
                                  special_tokens=special)
    self.special_tokens = dict(special)
    self.bos_id, self.eos_id = bos_id, eos_id

  @staticmethod
  def _check_ranks_follow_merges(tokens: Sequence[str], merges: Sequence[str]) -> None:
    """Ranks-as-ids is valid only if merge i produces token id (first merge id) + i."""
    index = {t: i for i, t in enumerate(tokens)}
    first = len(tokens) - len(merges)
    for i, merge in enumerate(merges):
      a, b = merge.split(' ')
      if index.get(a + b) != first + i:
        raise ValueError('GGUF vocabulary is not in merge order; tiktoken ranks cannot be the '
                         f'token ids (merge {i} {merge!r} -> id {index.get(a + b)}).')

  def encode(self, text: str) -> list[int]:
    ids = self._enc.encode(text, allowed_special='all')
    return [i for i in ids if i < self.vocab_size]

  def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
    out = self._enc.encode_batch(list(texts), num_threads=num_threads, allowed_special='all')
    return [[i for i in ids if i < self.vocab_size] for ids in out]

  def decode(self, ids: Sequence[int]) -> str:
    return self._enc.decode([int(i) for i in ids], errors='replace')


# ----------------------------------------------------------------------------- loading


def _field(reader, key: str, default: Any = None) -> Any:
  f = reader.fields.get(key)
  if f is None:
    if default is None:
      raise KeyError(f'GGUF metadata has no {key!r}')
    return default
  return f.contents()


def _tensor(reader_tensors: dict, name: str) -> np.ndarray:
  """Dequantized float32 tensor in PyTorch (out, in) layout, i.e. GGUF dims reversed."""
  from gguf.quants import dequantize  # pylint: disable=import-outside-toplevel

  t = reader_tensors[name]
  return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
      tuple(int(d) for d in reversed(t.shape)))


def _reader(path: str):
  """A `gguf.GGUFReader` whose buffer is a plain ndarray view of its np.memmap.

  The reader slices its buffer ~250k times while parsing the 49k-token vocabulary and merges, and
  dequantizing slices it again per block row; every np.memmap slice pays a Python-level
  `__array_finalize__`. Viewing the same mapping as an ndarray (still backed by the file, no copy)
  cuts loading SmolLM2 from ~15 s to ~4 s on 2 CPU cores.
  """
  import gguf  # pylint: disable=import-outside-toplevel

  class _PlainViewReader(gguf.GGUFReader):

    @property
    def data(self) -> np.ndarray:
      return self._plain_data

    @data.setter
    def data(self, value: np.ndarray) -> None:
      self._plain_data = value.view(np.ndarray)

  return _PlainViewReader(path, 'r')


def load_gguf(path: os.PathLike) -> tuple[LlamaConfig, Params, GGUFTokenizer]:
  """(config, params, tokenizer) from a Llama-architecture GGUF file; weights as fp32 jnp arrays."""
  path = os.fspath(path)
  reader = _reader(path)
  arch = _field(reader, 'general.architecture')
  if arch != 'llama':
    raise ValueError(f'{path}: architecture {arch!r}, expected "llama"')
  tensors = {t.name: t for t in reader.tensors}
  tokens = _field(reader, 'tokenizer.ggml.tokens')
  dim = int(_field(reader, 'llama.embedding_length'))
  n_head = int(_field(reader, 'llama.attention.head_count'))
  cfg = LlamaConfig(
      vocab_size=len(tokens), n_layer=int(_field(reader, 'llama.block_count')), dim=dim,
      n_head=n_head, n_kv_head=int(_field(reader, 'llama.attention.head_count_kv', n_head)),
      ffn_dim=int(_field(reader, 'llama.feed_forward_length')),
      rope_dim=int(_field(reader, 'llama.rope.dimension_count', dim // n_head)),
      rope_base=float(_field(reader, 'llama.rope.freq_base', 10000.0)),
      norm_eps=float(_field(reader, 'llama.attention.layer_norm_rms_epsilon')),
      context_length=int(_field(reader, 'llama.context_length')),
      name=str(_field(reader, 'general.name', 'llama')))
  if 'llama.rope.scaling.type' in reader.fields:
    raise ValueError(f'{path}: rope scaling is not supported')
  tokenizer = GGUFTokenizer(
      tokens, _field(reader, 'tokenizer.ggml.token_type'), _field(reader, 'tokenizer.ggml.merges'),
      pre=str(_field(reader, 'tokenizer.ggml.pre', 'default')),
      bos_id=int(_field(reader, 'tokenizer.ggml.bos_token_id')),
      eos_id=int(_field(reader, 'tokenizer.ggml.eos_token_id')), name=cfg.name)

  linear = functools.partial(_tensor, tensors)  # (out, in), as in PyTorch; contracted on `in`
  per_layer = {
      'attn_norm': lambda i: _tensor(tensors, f'blk.{i}.attn_norm.weight'),
      'wq': lambda i: linear(f'blk.{i}.attn_q.weight'),
      'wk': lambda i: linear(f'blk.{i}.attn_k.weight'),
      'wv': lambda i: linear(f'blk.{i}.attn_v.weight'),
      'wo': lambda i: linear(f'blk.{i}.attn_output.weight'),
      'ffn_norm': lambda i: _tensor(tensors, f'blk.{i}.ffn_norm.weight'),
      'w_gate': lambda i: linear(f'blk.{i}.ffn_gate.weight'),
      'w_up': lambda i: linear(f'blk.{i}.ffn_up.weight'),
      'w_down': lambda i: linear(f'blk.{i}.ffn_down.weight'),
  }
  blocks = {k: jnp.asarray(np.stack([fn(i) for i in range(cfg.n_layer)]))
            for k, fn in per_layer.items()}
  embed = _tensor(tensors, 'token_embd.weight')
  if embed.shape != (cfg.vocab_size, cfg.dim):
    raise ValueError(f'{path}: token_embd has shape {embed.shape}, expected '
                     f'{(cfg.vocab_size, cfg.dim)}')
  kv = cfg.n_kv_head * cfg.head_dim
  if blocks['wk'].shape[1:] != (kv, cfg.dim) or blocks['wq'].shape[1:] != (cfg.dim, cfg.dim):
    raise ValueError(f'{path}: attention weights do not match the head counts in the metadata')
  params = {'embed': jnp.asarray(embed), 'blocks': blocks,
            'final_norm': jnp.asarray(_tensor(tensors, 'output_norm.weight')),
            'output': (jnp.asarray(_tensor(tensors, 'output.weight'))
                       if 'output.weight' in tensors else None)}
  return cfg, params, tokenizer


def describe(path: os.PathLike) -> str:
  """Scorer label from the file name, e.g. 'SmolLM2-135M-Instruct (Q4_1 GGUF)'."""
  stem = os.path.basename(os.fspath(path))
  m = re.match(r'(.+?)\.([A-Za-z0-9_]+)\.gguf$', stem)
  return f'{m.group(1)} ({m.group(2)} GGUF)' if m else stem
