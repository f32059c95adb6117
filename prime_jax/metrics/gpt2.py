"""GPT-2 causal LM in plain JAX over a params pytree, loaded from a local Hugging Face folder.

This is the reference scorer of MDLM's generative perplexity (gpt2-large, method.md §7.3). The
weights are
not in any package registry (docs/assets.md), so there is no download here: point `load_gpt2` at a
folder
holding `config.json` and `model.safetensors` (any size: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or
the tiny random model the tests save with `transformers`).

Dimension key:
  B: batch  L: sequence length  D: n_embd  H: heads  K: head dim  F: 4 * n_embd  V: vocab
  N: layers (the per-layer weights are stacked on a leading N axis and run under `lax.scan`)

HF GPT-2 specifics kept here: `Conv1D` weights are stored (in, out), so `x @ W` needs no transpose;
`lm_head` is tied to `wte`; LayerNorm has a bias and eps `layer_norm_epsilon`; the MLP uses
"gelu_new" (tanh-approximate GELU); attention scores are scaled by 1/sqrt(K). All math is fp32
with `Precision.HIGHEST` dots (no TF32 / bf16 passes on accelerators).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]
_HIGHEST = jax.lax.Precision.HIGHEST
einsum = functools.partial(jnp.einsum, precision=_HIGHEST)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  layer_norm_epsilon: float = 1e-5

  @classmethod
  def from_json(cls, path: os.PathLike) -> 'GPT2Config':
    with open(path) as f:
      raw = json.load(f)
    act = raw.get('activation_function', 'gelu_new')
    if act not in ('gelu_new', 'gelu_pytorch_tanh'):
      raise ValueError(f'{path}: activation_function {act!r} is not supported (GPT-2 uses '
                       '"gelu_new", the tanh-approximate GELU).')
    if raw.get('scale_attn_by_inverse_layer_idx') or raw.get('reorder_and_upcast_attn'):
      raise ValueError(f'{path}: scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not '
                       'supported (they are off in every released GPT-2).')
    return cls(vocab_size=int(raw['vocab_size']),
               n_positions=int(raw.get('n_positions', raw.get('n_ctx', 1024))),
               n_embd=int(raw['n_embd']), n_layer=int(raw['n_layer']),
               n_head=int(raw['n_head']),
               layer_norm_epsilon=float(raw.get('layer_norm_epsilon', 1e-5)))


# ----------------------------------------------------------------------------- shared pieces


def causal_attention(q_BxLxGxRxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array,
                     mask_BxL: jax.Array) -> jax.Array:
  """Softmax attention, causal and masking padded keys; returns (B, L, G, R, K).

  Keys/values have G heads and each serves R query heads (grouped-query attention; GPT-2 has R=1).
  A masked score is the most negative finite float (as in HF), so a query whose every key is masked
  (an all-padding row) gets a uniform average instead of NaN; such rows are never counted.
  """
  L = q_BxLxGxRxK.shape[1]
  scale = 1.0 / np.sqrt(q_BxLxGxRxK.shape[-1])
  s_BxGxRxLxL = einsum('bqgrk,bsgk->bgrqs', q_BxLxGxRxK, k_BxLxGxK) * scale
  causal_LxL = jnp.tril(jnp.ones((L, L), bool))
  allowed_Bx1x1xLxL = causal_LxL[None, None, None] & mask_BxL.astype(bool)[:, None, None, None, :]
  s_BxGxRxLxL = jnp.where(allowed_Bx1x1xLxL, s_BxGxRxLxL, jnp.finfo(jnp.float32).min)
  p_BxGxRxLxL = jax.nn.softmax(s_BxGxRxLxL, axis=-1)
  return einsum('bgrqs,bsgk->bqgrk', p_BxGxRxLxL, v_BxLxGxK)


def next_token_nll(logits_BxLxV: jax.Array, ids_BxL: jax.Array) -> jax.Array:
  """-log p(ids[:, t+1] | ids[:, :t+1]) for t = 0..L-2, shape (B, L-1), fp32."""
  logits = logits_BxLxV[:, :-1].astype(jnp.float32)
  target = ids_BxL[:, 1:]
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
  return lse - picked


# ----------------------------------------------------------------------------- model


def _layer_norm(x: jax.Array, g: jax.Array, b: jax.Array, eps: float) -> jax.Array:
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * g + b


def _block(cfg: GPT2Config, x_BxLxD: jax.Array, p: Params, mask_BxL: jax.Array) -> jax.Array:
  B, L, D = x_BxLxD.shape
  H = cfg.n_head
  h = _layer_norm(x_BxLxD, p['ln_1_g'], p['ln_1_b'], cfg.layer_norm_epsilon)
  qkv_BxLx3D = einsum('bld,de->ble', h, p['attn_w']) + p['attn_b']
  q, k, v = (t.reshape(B, L, H, D // H) for t in jnp.split(qkv_BxLx3D, 3, axis=-1))
  a_BxLxHx1xK = causal_attention(q[:, :, :, None], k, v, mask_BxL)
  x_BxLxD = x_BxLxD + einsum('bld,de->ble', a_BxLxHx1xK.reshape(B, L, D), p['proj_w']) + p['proj_b']
  h = _layer_norm(x_BxLxD, p['ln_2_g'], p['ln_2_b'], cfg.layer_norm_epsilon)
  h_BxLxF = jax.nn.gelu(einsum('bld,df->blf', h, p['fc_w']) + p['fc_b'], approximate=True)
  return x_BxLxD + einsum('blf,fd->bld', h_BxLxF, p['mlp_proj_w']) + p['mlp_proj_b']


def forward(cfg: GPT2Config, params: Params, ids_BxL: jax.Array,
            mask_BxL: Optional[jax.Array] = None) -> jax.Array:
  """Logits (B, L, V). `mask_BxL` (1 = real token) hides padded keys; positions are 0..L-1."""
  B, L = ids_BxL.shape
  if L > cfg.n_positions:
    raise ValueError(f'sequence length {L} exceeds n_positions {cfg.n_positions}')
  if mask_BxL is None:
    mask_BxL = jnp.ones((B, L), bool)
  x = params['wte'][ids_BxL] + params['wpe'][:L][None]

  def step(x, p):
    return _block(cfg, x, p, mask_BxL), None

  x, _ = jax.lax.scan(step, x, params['blocks'])
  x = _layer_norm(x, params['ln_f_g'], params['ln_f_b'], cfg.layer_norm_epsilon)
  return einsum('bld,vd->blv', x, params['wte'])


def nll(cfg: GPT2Config, params: Params, ids_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
  """Per-token next-token NLL (B, L-1) in nats; jit with `cfg` bound (see `genppl.load_scorer`)."""
  return next_token_nll(forward(cfg, params, ids_BxL, mask_BxL), ids_BxL)


# ----------------------------------------------------------------------------- loading

# our stacked name -> HF name inside block i (h.{i}.<name>)
_BLOCK_KEYS = {
    'ln_1_g': 'ln_1.weight', 'ln_1_b': 'ln_1.bias',
    'attn_w': 'attn.c_attn.weight', 'attn_b': 'attn.c_attn.bias',
    'proj_w': 'attn.c_proj.weight', 'proj_b': 'attn.c_proj.bias',
    'ln_2_g': 'ln_2.weight', 'ln_2_b': 'ln_2.bias',
    'fc_w': 'mlp.c_fc.weight', 'fc_b': 'mlp.c_fc.bias',
    'mlp_proj_w': 'mlp.c_proj.weight', 'mlp_proj_b': 'mlp.c_proj.bias',
}


def load_gpt2(folder: os.PathLike) -> tuple[GPT2Config, Params]:
  """(config, params) from a local HF GPT-2 folder (`config.json` + `model.safetensors`)."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  folder = os.fspath(folder)
  cfg_path = os.path.join(folder, 'config.json')
  st_path = os.path.join(folder, 'model.safetensors')
  missing = [p for p in (cfg_path, st_path) if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(
        f'GPT-2 folder {folder!r} lacks {", ".join(os.path.basename(p) for p in missing)}. It must '
        'hold a Hugging Face GPT-2 checkpoint in safetensors form (e.g. `huggingface-cli download '
        'openai-community/gpt2-large config.json model.safetensors --local-dir DIR`, or '
        '`model.save_pretrained(DIR, safe_serialization=True)`).')
  cfg = GPT2Config.from_json(cfg_path)
  raw = load_file(st_path)
  # GPT2LMHeadModel prefixes "transformer."; a bare GPT2Model (the hub's gpt2 files) does not.
  sd = {k[len('transformer.'):] if k.startswith('transformer.') else k: v for k, v in raw.items()}

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in sd:
      raise KeyError(f'{st_path} has no tensor {name!r} (is this a GPT-2 checkpoint?)')
    a = np.asarray(sd[name], dtype=np.float32)
    if a.shape != shape:
      raise ValueError(f'{st_path}: {name} has shape {a.shape}, expected {shape} from config.json')
    return a

  D, V, F = cfg.n_embd, cfg.vocab_size, 4 * cfg.n_embd
  shapes = {'ln_1_g': (D,), 'ln_1_b': (D,), 'attn_w': (D, 3 * D), 'attn_b': (3 * D,),
            'proj_w': (D, D), 'proj_b': (D,), 'ln_2_g': (D,), 'ln_2_b': (D,),
            'fc_w': (D, F), 'fc_b': (F,), 'mlp_proj_w': (F, D), 'mlp_proj_b': (D,)}
  blocks = {ours: np.stack([get(f'h.{i}.{hf}', shapes[ours]) for i in range(cfg.n_layer)])
            for ours, hf in _BLOCK_KEYS.items()}
  wte = get('wte.weight', (V, D))
  head = sd.get('lm_head.weight')
  if head is not None and not np.array_equal(np.asarray(head, np.float32), wte):
    raise ValueError(f'{st_path}: lm_head.weight differs from wte; GPT-2 ties them.')
  params = {'wte': wte, 'wpe': get('wpe.weight', (cfg.n_positions, D)),
            'ln_f_g': get('ln_f.weight', (D,)), 'ln_f_b': get('ln_f.bias', (D,)),
            'blocks': blocks}
  return cfg, jax.tree.map(jnp.asarray, params)
