"""Generative perplexity and unigram entropy of generated text (method.md §7.3, MDLM's protocol).

    scorer = load_scorer('smollm2')                 # offline default (GGUF from the asset cache)
    scorer = load_scorer('gpt2', '/path/gpt2-large')  # the paper's scorer, from a local HF folder
    generative_perplexity(texts, scorer)  # {'gen_ppl', 'nll', 'tokens', 'entropy_bits', ...}

Protocol (MDLM `compute_generative_perplexity` / `eval_retokenize`, as copied by MDM-Prime):
  1. Retokenize the decoded texts with the *scorer's* tokenizer. Control tokens written literally in
     the text (the GPT-2 decoder writes id 50256 as "<|endoftext|>") become their special ids, as HF
     tokenizers do. No BOS/EOS is added.
  2. Truncate each row to `max_length` and right-pad every row to the longest row of the whole set
     (HF `padding=True, truncation=True`), padding with the EOS id (`pad_token = eos_token`); the
     attention mask hides the padding keys.
  3. Next-token NLL at positions 1..L-1. A target counts if it is not EOS, or if it is the FIRST
     EOS of its row (counting from position 0: a row that starts with EOS never counts a later one).
     Consequences inherited from MDLM, kept on purpose: a row shorter than the longest row has its
     first padding EOS counted (the scorer is charged for predicting "end of text" there), while the
     longest rows and truncated rows are not.
  4. gen PPL = exp(sum of counted NLLs / number of counted targets): a token-weighted mean.
  Unigram entropy: for each padded row, the entropy (bits) of its id histogram, padding ids
  included, averaged over rows (MDM-Prime `compute_entropy` over the same padded `eval_retokenize`
  output).
Two deliberate differences, neither changing the value: MDLM drops the last partial batch
(`num_batches = N // batch_size`), here every sample is scored (the last batch is padded with rows
that count nothing); and batches are padded to one fixed (batch_size, L') shape, L' the padded
length rounded up to a multiple of 16, so one compile serves the whole call (right padding does not
change any counted NLL: attention is causal).

Scorers: 'gpt2' (any HF GPT-2 checkpoint; EOS = "<|endoftext|>" 50256, max length n_positions) and
'smollm2' (SmolLM2-135M-Instruct Q4_1 GGUF; EOS = "<|endoftext|>" id 0, the document separator of
its pre-training data; the GGUF's own eos_token_id 2 is the chat turn end "<|im_end|>", which plain
documents never contain; max length 1024, MDLM's `eval_context_size`). SmolLM2 numbers are an
offline, relative metric: never compare them with GPT-2-large generative perplexities.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

SCORERS = ('smollm2', 'gpt2')
_GPT2_EOT = '<|endoftext|>'
_LENGTH_BUCKET = 16


class Scorer:
  """A causal LM with its tokenizer, ready for `generative_perplexity`.

  Attributes: name (the label every reported number must carry), eos_id, max_length (default
  truncation length), context_length (hard limit of the model), vocab_size.
  """

  def __init__(self, *, name: str, eos_id: int, max_length: int, context_length: int,
               vocab_size: int, encode_batch: Callable[[list[str]], list[list[int]]],
               nll_fn: Callable[..., jax.Array], params: Any,
               decode: Optional[Callable[[Sequence[int]], str]] = None, tokenizer: Any = None):
    self.name = name
    self.eos_id = int(eos_id)
    self.max_length = int(max_length)
    self.context_length = int(context_length)
    self.vocab_size = int(vocab_size)
    self.params = params
    self._encode_batch = encode_batch
    self._decode = decode
    self.tokenizer = tokenizer  # SmolLM2: its GGUFTokenizer (GPT-2: None, see data.tokenizer)
    self._nll = jax.jit(nll_fn)

  def __repr__(self) -> str:
    return f'Scorer({self.name!r}, eos_id={self.eos_id}, max_length={self.max_length})'

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    """Scorer token ids of each text (control tokens in the text recognised; no BOS/EOS added)."""
    return self._encode_batch(list(texts))

  def decode(self, ids: Sequence[int]) -> str:
    """Text of scorer ids (for inspection; bytes that do not form UTF-8 become U+FFFD)."""
    if self._decode is None:
      raise NotImplementedError(f'{self.name} has no decoder')
    return self._decode([int(i) for i in ids])

  def nll(self, ids_BxL, mask_BxL) -> jax.Array:
    """Per-token next-token NLL (B, L-1) in nats, jitted; `mask_BxL` = 1 on real tokens."""
    ids = jnp.asarray(ids_BxL, jnp.int32)
    if ids.shape[1] > self.context_length:
      raise ValueError(f'{self.name}: length {ids.shape[1]} > context {self.context_length}')
    return self._nll(self.params, ids, jnp.asarray(mask_BxL, bool))


# ----------------------------------------------------------------------------- scorers


def _gpt2_encode_batch(texts: list[str]) -> list[list[int]]:
  """GPT-2 ids; a literal "<|endoftext|>" becomes 50256 (HF's default special-token handling)."""
  # pylint: disable=import-outside-toplevel
  from prime_jax.data.tokenizer import EOS_ID, get_tokenizer

  pieces = [t.split(_GPT2_EOT) for t in texts]
  flat = iter(get_tokenizer().encode_batch([p for ps in pieces for p in ps]))
  out = []
  for ps in pieces:
    ids: list[int] = []
    for j in range(len(ps)):
      if j:
        ids.append(EOS_ID)
      ids.extend(next(flat))
    out.append(ids)
  return out


def _load_gpt2(path: Optional[str]) -> Scorer:
  # pylint: disable=import-outside-toplevel
  from prime_jax.data.tokenizer import EOS_ID, VOCAB_SIZE, decode
  from prime_jax.metrics import gpt2  # pylint: disable=import-outside-toplevel

  if not path:
    raise ValueError(
        "load_scorer('gpt2') needs path=<local folder with a Hugging Face GPT-2 checkpoint: "
        'config.json + model.safetensors> (MDLM scores with gpt2-large). No package registry ships '
        'GPT-2 weights (docs/assets.md): download them where the hub is reachable, e.g. '
        '`huggingface-cli download openai-community/gpt2-large config.json model.safetensors '
        '--local-dir DIR`, and '
        "set --config.sample.scorer_path=DIR, or use the offline scorer 'smollm2'.")
  cfg, params = gpt2.load_gpt2(path)
  if cfg.vocab_size < VOCAB_SIZE:
    raise ValueError(f'{path}: vocab_size {cfg.vocab_size} < {VOCAB_SIZE}; the GPT-2 scorer needs '
                     'the full GPT-2 vocabulary.')
  label = os.path.basename(os.path.normpath(path))
  return Scorer(name=f'{label} (GPT-2 {cfg.n_layer}x{cfg.n_embd}, HF safetensors)', eos_id=EOS_ID,
                max_length=cfg.n_positions, context_length=cfg.n_positions,
                vocab_size=cfg.vocab_size, encode_batch=_gpt2_encode_batch,
                nll_fn=functools.partial(gpt2.nll, cfg), params=params, decode=decode)


def _load_smollm2(path: Optional[str]) -> Scorer:
  from prime_jax.data import assets  # pylint: disable=import-outside-toplevel
  from prime_jax.metrics import llama_gguf  # pylint: disable=import-outside-toplevel

  path = os.fspath(path or assets.path('smollm2'))  # names the fetch command when absent
  cfg, params, tok = llama_gguf.load_gguf(path)
  eos = tok.special_tokens.get('<|endoftext|>', tok.eos_id)
  return Scorer(name=llama_gguf.describe(path), eos_id=eos,
                max_length=min(1024, cfg.context_length), context_length=cfg.context_length,
                vocab_size=cfg.vocab_size, encode_batch=tok.encode_batch,
                nll_fn=functools.partial(llama_gguf.nll, cfg), params=params, decode=tok.decode,
                tokenizer=tok)


def load_scorer(name: str, path: Optional[str] = None) -> Scorer:
  """'smollm2' (offline; `path` overrides the cached GGUF) or 'gpt2' (`path` = local HF folder)."""
  if name == 'smollm2':
    return _load_smollm2(path)
  if name == 'gpt2':
    return _load_gpt2(path)
  raise ValueError(f'Unknown scorer {name!r}; choose one of {", ".join(SCORERS)}.')


# ----------------------------------------------------------------------------- protocol


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int,
             max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """Truncate to `max_length`, right-pad with `pad_id` to the longest row: (ids, attention mask)."""
  rows = [list(r)[:max_length] for r in rows]
  L = max(2, max(len(r) for r in rows))  # at least one next-token target per row
  ids = np.full((len(rows), L), pad_id, np.int32)
  mask = np.zeros((len(rows), L), bool)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
    mask[i, :len(r)] = True
  return ids, mask


def counted_targets(ids_NxL: np.ndarray, eos_id: int) -> np.ndarray:
  """(N, L-1) bool: target ids[:, t+1] counts if it is not EOS or is the row's first EOS."""
  is_eos = np.asarray(ids_NxL) == eos_id
  first_eos = np.cumsum(is_eos, axis=-1) == 1  # True from the first EOS up to the second (MDLM)
  return (first_eos | ~is_eos)[:, 1:]


def unigram_entropy_bits(ids_NxL: np.ndarray) -> np.ndarray:
  """(N,) entropy in bits of each row's token histogram (every position, padding included)."""
  out = np.empty(len(ids_NxL))
  for i, row in enumerate(np.asarray(ids_NxL)):
    _, counts = np.unique(row, return_counts=True)
    p = counts / counts.sum()
    out[i] = -(p * np.log2(p)).sum()
  return out


def generative_perplexity(texts: Sequence[str], scorer: Scorer, *, batch_size: int = 8,
                          max_length: Optional[int] = None,
                          progress: bool = False) -> dict[str, Any]:
  """Gen PPL of `texts` under `scorer` (protocol in the module doc).

  `max_length` defaults to `scorer.max_length`; MDLM truncates at the diffusion model's sequence
  length, so pass that to reproduce its setting exactly. Returns gen_ppl, nll (mean nats per counted
  token), tokens (counted targets), entropy_bits (mean per sample), scorer (label), num_samples,
  max_length and padded_length.
  """
  texts = list(texts)
  if not texts:
    raise ValueError('generative_perplexity needs at least one text')
  max_length = int(max_length or scorer.max_length)
  if not 2 <= max_length <= scorer.context_length:
    raise ValueError(f'max_length {max_length} must be in [2, {scorer.context_length}] for '
                     f'{scorer.name}')
  ids, mask = pad_rows(scorer.tokenize(texts), scorer.eos_id, max_length)
  if ids.max() >= scorer.vocab_size:
    raise ValueError(f'{scorer.name}: token id {ids.max()} outside its vocabulary '
                     f'({scorer.vocab_size}); the tokenizer and the weights do not match.')
  counted = counted_targets(ids, scorer.eos_id)
  entropy = unigram_entropy_bits(ids)

  # One fixed batch shape for the whole call: extra rows/columns are padding that counts nothing.
  N, L = ids.shape
  batch_size = max(1, min(batch_size, N))  # as MDLM: min(perplexity_batch_size, N)
  Lc = min(-(-L // _LENGTH_BUCKET) * _LENGTH_BUCKET, scorer.context_length)
  Np = -(-N // batch_size) * batch_size
  ids_c = np.full((Np, Lc), scorer.eos_id, np.int32)
  mask_c = np.zeros((Np, Lc), bool)
  counted_c = np.zeros((Np, Lc - 1), bool)
  ids_c[:N, :L], mask_c[:N, :L], counted_c[:N, :L - 1] = ids, mask, counted

  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  sums = []
  for b in tqdm(range(0, Np, batch_size), desc=f'gen PPL ({scorer.name})', disable=not progress,
                leave=False):
    nll = scorer.nll(ids_c[b:b + batch_size], mask_c[b:b + batch_size])  # async dispatch
    sums.append(jnp.sum(jnp.where(counted_c[b:b + batch_size], nll, 0.0), axis=-1))
  per_row = np.concatenate([np.asarray(s, np.float64) for s in sums])
  tokens = int(counted.sum())
  mean_nll = float(per_row.sum() / max(tokens, 1))
  return {'gen_ppl': math.exp(mean_nll), 'nll': mean_nll, 'tokens': tokens,
          'entropy_bits': float(entropy.mean()), 'scorer': scorer.name, 'num_samples': N,
          'max_length': max_length, 'padded_length': L}
