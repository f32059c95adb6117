"""Models: sub-token embedding and the DiT trunk (method.md §8.1, 13.18, 13.19)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import sotu
from prime_jax import build, optim
from prime_jax.diffusion.subtokens import Codec
from prime_jax.models import dit, layers
from prime_jax.models.dit import DiT
from prime_jax.models.embed import SubtokenEmbed

GPT2 = 50257
# A tiny Prime config: C = 300, ell = 2 -> b = 18, 19 input symbols.
TINY = dict(vocab_size=300, base=18, ell=2, dim=64, num_heads=4, num_layers=2, cond_dim=32)
B, L = 2, 12
# Jitted forward: fast on CPU, and proves the model traces under jit (graphdef static).
_run = nnx.jit(DiT.__call__, static_argnames=('deterministic',))


def _tiny(**overrides) -> DiT:
  return DiT(**{**TINY, **overrides}, rngs=nnx.Rngs(0))


def _tokens(seed: int = 1, ell: int = 2, base: int = 18) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (B, L, ell), 0, base + 1)  # mask id included


@jax.jit
def _add_noise(leaves: list[jax.Array], key: jax.Array, scale: float) -> list[jax.Array]:
  # One normal draw sliced per leaf: a threefry per leaf would dominate compile time on CPU.
  noise = jax.random.normal(key, (sum(x.size for x in leaves),))
  offsets = np.cumsum([0] + [x.size for x in leaves])
  return [x + scale * noise[a:b].reshape(x.shape) for x, a, b in zip(leaves, offsets, offsets[1:])]


def _perturb(model: nnx.Module, seed: int = 7, scale: float = 0.1) -> None:
  """Adds noise to every parameter so the zero-initialised layers produce non-trivial outputs."""
  leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
  nnx.update(model, jax.tree.unflatten(treedef, _add_noise(leaves, jax.random.key(seed), scale)))


def _copy_weights(src: DiT, dst: DiT) -> None:
  """Copies src into dst, stacking per-layer blocks when dst is scanned."""
  pure = nnx.to_pure_dict(nnx.state(src, nnx.Param))
  if dst.scan_layers and not src.scan_layers:
    layers = [pure['blocks'][i] for i in range(src.num_layers)]
    pure['blocks'] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  state = nnx.state(dst, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(dst, state)


def _params(model: nnx.Module) -> list[tuple[tuple, nnx.Variable]]:
  return list(nnx.to_flat_state(nnx.state(model, nnx.Param)))


# ------------------------------------------------------------------------------------------------
# Parameter counts (abstract: nothing materialised)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('name, ell, expected', [
    ('small', 2, 131_115_089), ('small', 3, 131_038_033), ('small', 4, 131_031_377),
    ('small', 6, 131_029_329), ('small', 8, 131_028_785), ('small', 1, 169_627_218),
    ('medium', 4, 373_015_889), ('medium', 1, 424_477_010)])
def test_parameter_counts(name, ell, expected):
  kwargs = dict(vocab_size=GPT2, base=Codec(GPT2, ell).base, ell=ell, **dit.preset(name))
  model = nnx.eval_shape(lambda: DiT(**kwargs, rngs=nnx.Rngs(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model))) == expected
  assert dit.param_counts(**kwargs)['total'] == expected
  embedding = (kwargs['base'] + 1) * (kwargs['dim'] // ell)
  assert model.embed.table.shape == (kwargs['base'] + 1, kwargs['dim'] // ell)
  assert dit.param_counts(**kwargs)['embedding'] == embedding


def test_scanned_count_equals_unscanned():
  kwargs = dict(vocab_size=GPT2, base=15, ell=4, **dit.preset('small'))
  counts = [sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(
      lambda s=s: DiT(**kwargs, scan_layers=s, rngs=nnx.Rngs(0)))))) for s in (False, True)]
  assert counts == [131_031_377] * 2


@pytest.mark.parametrize('ell', [3, 6])
def test_medium_refuses_indivisible_ell(ell):
  with pytest.raises(ValueError, match=f'dim=1024 is not divisible by ell={ell}'):
    nnx.eval_shape(lambda: DiT(vocab_size=GPT2, base=Codec(GPT2, ell).base, ell=ell,
                               **dit.preset('medium'), rngs=nnx.Rngs(0)))


def test_bad_configs_fail_loudly():
  with pytest.raises(ValueError, match='cannot represent'):
    _tiny(base=10)  # 10**2 < 300
  with pytest.raises(ValueError, match='heads'):
    _tiny(num_heads=5)
  with pytest.raises(ValueError, match='Unknown DiT preset'):
    dit.preset('huge')


def test_flops_per_token():
  kwargs = dict(vocab_size=GPT2, base=225, ell=2, **dit.preset('small'))
  d, layers, seq = 768, 12, 1024
  per_token = layers * (2 * d + 4 * d * d + 8 * d * d + 5 * d) + d + (d + 1) * GPT2
  expected = 6 * per_token + 12 * layers * d * seq
  assert dit.flops_per_token(seq, **kwargs) == expected
  model = nnx.eval_shape(lambda: DiT(**kwargs, rngs=nnx.Rngs(0)))
  assert model.flops_per_token(seq) == expected


# ------------------------------------------------------------------------------------------------
# Embedding
# ------------------------------------------------------------------------------------------------


def test_subtoken_embedding_concatenates_digits_in_order():
  embed = SubtokenEmbed(num_symbols=5, ell=3, dim=12, rngs=nnx.Rngs(0))
  table = np.asarray(embed.table[...])
  assert table.shape == (5, 4) and np.abs(table).max() <= 0.5  # U(+-1/sqrt(4))
  y = jax.random.randint(jax.random.key(0), (2, 6, 3), 0, 5)
  out = np.asarray(embed(y))
  assert out.shape == (2, 6, 12)
  for j in range(3):
    np.testing.assert_array_equal(out[..., 4 * j:4 * (j + 1)], table[np.asarray(y[..., j])])
  with pytest.raises(ValueError, match='ell=3'):
    embed(y[..., :2])


def test_mdlm_embedding_has_mask_row():
  model = nnx.eval_shape(lambda: DiT(vocab_size=GPT2, base=GPT2, ell=1, **dit.preset('small'),
                                     rngs=nnx.Rngs(0)))
  assert model.embed.table.shape == (GPT2 + 1, 768)
  assert model.final.head.kernel.shape == (768, GPT2 + 1)


# ------------------------------------------------------------------------------------------------
# Initialisation (method.md §13.19), shapes, dtypes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('scan', [False, True])
def test_initialisation_is_identity_with_zero_logits(scan):
  model = _tiny(scan_layers=scan)
  for path, var in _params(model):
    value = np.asarray(var[...])
    if 'adaln' in path or 'head' in path:
      assert not value.any(), path
    elif path[-1] == 'scale':
      assert (value == 1).all(), path
  y = _tokens()
  logits = _run(model, y)
  assert logits.shape == (B, L, TINY['vocab_size']) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(logits), 0.0)

  ref = _tiny()  # unscanned twin: check every block is exactly the identity map
  x = jax.random.normal(jax.random.key(2), (B, L, TINY['dim']))
  c = jax.random.normal(jax.random.key(3), (B, TINY['cond_dim']))
  cos, sin = dit.rotary_cos_sin(L, TINY['dim'] // TINY['num_heads'])
  run_block = nnx.jit(lambda block, x: block(x, c, cos, sin, None, True))
  for block in ref.blocks:
    np.testing.assert_array_equal(np.asarray(run_block(block, x)), np.asarray(x))


@pytest.mark.parametrize('scan', [False, True])
def test_init_scales_break_the_zero_start(scan):
  """head_init_scale / adaln_init_scale draw those kernels from U(±s/sqrt(fan_in)): masked
  positions then differ and the trunk gets a gradient at step 0. Parameter shapes are unchanged."""
  zero, model = _tiny(scan_layers=scan), _tiny(scan_layers=scan, head_init_scale=0.5,
                                               adaln_init_scale=2.0)
  assert [p for p, _ in _params(zero)] == [p for p, _ in _params(model)]
  for path, var in _params(model):
    value = np.asarray(var[...])
    if 'head' in path and path[-1] == 'kernel':
      bound = 0.5 / np.sqrt(TINY['dim'])
      assert value.std() > 0.3 * bound and np.abs(value).max() <= bound, path
    elif 'head' in path:  # the bias stays zero (a unigram prior may be written into it)
      assert not value.any(), path
    elif 'adaln' in path:
      bound = 2.0 / np.sqrt(TINY['cond_dim'])
      assert value.std() > 0.3 * bound and np.abs(value).max() <= bound, path
  # Fully masked positions among visible ones: the zero-initialised model gives them all one
  # feature vector, the re-initialised one does not (its blocks mix in the context from the start).
  masked = jnp.arange(L) % 3 == 0
  y = jnp.where(masked[None, :, None], TINY['base'], _tokens() % TINY['base'])
  h_zero, h = (np.asarray(nnx.jit(lambda m: m.features(y))(m))[:, masked] for m in (zero, model))
  assert np.abs(h_zero - h_zero[:1, :1]).max() < 1e-5
  assert np.abs(h - h[:1, :1]).max() > 1e-2
  with pytest.raises(ValueError, match='init_scale'):
    _tiny(head_init_scale=-1.0)


@pytest.mark.parametrize('ell,base', [(2, 18), (1, 300)])
def test_head_weights_give_the_logits(ell, base):
  """model.head_weights() = (kernel (D, C), bias (C,)) over the C token classes (without MDLM's
  mask output), in the compute dtype: the model's logits are the features times the kernel plus
  the bias, and a unigram prior written with set_bias lands in that bias."""
  model = DiT(**{**TINY, 'ell': ell, 'base': base}, head_init_scale=1.0, rngs=nnx.Rngs(0))
  D, C = TINY['dim'], TINY['vocab_size']
  O = C + int(model.mask_logit_in_head)
  assert model.final.head.kernel.shape == (D, O) and model.final.head.bias.shape == (O,)
  model.final.set_bias(jnp.arange(C, dtype=jnp.float32))
  kernel, bias = model.head_weights()
  assert kernel.shape == (D, C) and bias.shape == (C,)
  assert kernel.dtype == bias.dtype == jnp.float32
  np.testing.assert_array_equal(kernel, np.asarray(model.final.head.kernel[...])[:, :C])
  np.testing.assert_array_equal(bias, np.arange(C))
  assert float(jnp.abs(kernel).max()) > 0  # drawn, not zero
  y = jax.random.randint(jax.random.key(0), (B, L, ell), 0, base + 1)
  h = nnx.jit(lambda m: m.features(y))(model)
  np.testing.assert_allclose(_run(model, y), jnp.einsum('bld,dc->blc', h, kernel) + bias,
                             rtol=1e-4, atol=1e-4)
  kernel16, bias16 = _tiny(dtype=jnp.bfloat16).head_weights()
  assert kernel16.dtype == bias16.dtype == jnp.bfloat16
  assert kernel16.shape == (D, C) and bias16.shape == (C,)


@pytest.mark.parametrize('scan', [False, True])
def test_output_head_is_declared_as_head_param(scan):
  """The DiT declares its output head with the parameter type models.layers.HeadParam: exactly
  final.head.kernel and final.head.bias, nothing else (the optimizer's head group is this type,
  never a parameter name)."""
  model = _tiny(scan_layers=scan)
  typed = {path for path, var in _params(model) if isinstance(var, layers.HeadParam)}
  assert typed == {('final', 'head', 'kernel'), ('final', 'head', 'bias')}
  head_state = nnx.to_flat_state(nnx.state(model, layers.HeadParam))
  assert {path for path, _ in head_state} == typed
  assert issubclass(layers.HeadParam, nnx.Param)  # still trained, sharded and saved as a Param
  labels = nnx.to_flat_state(optim.head_labels(nnx.state(model, nnx.Param)))
  assert {path for path, label in labels if label == 'head'} == typed
  assert {label for _, label in labels} == {'head', 'trunk'}
  # Re-initialising the head kernel keeps its type.
  drawn = _tiny(scan_layers=scan, head_init_scale=0.5)
  assert {path for path, var in _params(drawn) if isinstance(var, layers.HeadParam)} == typed


def test_config_fields_reach_the_model():
  """build.experiment(cfg).make_model builds the DiT of the config: model.init.head_scale and
  model.init.adaln_scale draw the head and adaLN kernels (0 leaves them zero), the other fields
  set its shape."""
  cfg = sotu.get_config()
  assert 'head_init_scale' not in cfg.model and 'adaln_init_scale' not in cfg.model
  assert 'head_bias_init' not in cfg.model
  cfg.model.num_layers = 1
  cfg.model.init.head_scale = 0.5
  cfg.model.init.adaln_scale = 2.0
  exp = build.experiment(cfg)
  model = exp.make_model(rngs=nnx.Rngs(0))
  D, E = cfg.model.dim, cfg.model.cond_dim
  assert isinstance(model, DiT) and model.vocab_size == exp.codec.vocab_size
  assert model.ell == exp.codec.ell == cfg.diffusion.ell and len(model.blocks) == 1
  assert model.final.head.kernel.shape == (D, exp.codec.vocab_size)
  kernel = np.asarray(model.final.head.kernel[...])
  bound = 0.5 / np.sqrt(D)
  assert kernel.std() > 0.3 * bound and np.abs(kernel).max() <= bound
  assert not np.asarray(model.final.head.bias[...]).any()
  adaln = np.asarray(model.final.adaln.kernel[...])
  bound = 2.0 / np.sqrt(E)
  assert adaln.std() > 0.3 * bound and np.abs(adaln).max() <= bound
  cfg.model.init.head_scale = 0.0
  cfg.model.init.adaln_scale = 0.0
  zero = build.experiment(cfg).make_model(rngs=nnx.Rngs(0))
  assert not np.asarray(zero.final.head.kernel[...]).any()
  assert not np.asarray(zero.final.adaln.kernel[...]).any()
  cfg.model.init.head_bias = 'zeros'
  with pytest.raises(ValueError, match='model.init.head_bias'):
    build.experiment(cfg)


def test_mask_logit_in_head():
  mdlm = DiT(**{**TINY, 'ell': 1, 'base': 300}, rngs=nnx.Rngs(0))
  assert mdlm.mask_logit_in_head and mdlm.final.head.kernel.shape[-1] == 301
  y = jax.random.randint(jax.random.key(0), (B, L, 1), 0, 301)
  assert _run(mdlm, y).shape == (B, L, 300)
  assert _tiny().final.head.kernel.shape[-1] == 300
  assert _tiny(mask_logit_in_head=True).final.head.kernel.shape[-1] == 301


def test_bf16_compute_matches_fp32():
  fp32 = _tiny()
  _perturb(fp32)
  bf16 = _tiny(dtype=jnp.bfloat16)
  _copy_weights(fp32, bf16)
  assert all(v.dtype == jnp.float32 for _, v in _params(bf16))
  y = _tokens()
  ref, out = _run(fp32, y), _run(bf16, y)
  assert out.dtype == jnp.float32
  scale = float(jnp.abs(ref).max())
  assert scale > 0.1
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=0.03 * scale)
  assert not np.array_equal(np.asarray(out), np.asarray(ref))  # bf16 really was used


def test_time_conditioning():
  sigma_a, sigma_b = jnp.array([0.0, 1.0]), jnp.array([3.0, 0.5])
  off = _tiny()
  _perturb(off)
  y = _tokens()
  out_a = np.asarray(_run(off, y, sigma_a))
  np.testing.assert_array_equal(out_a, np.asarray(_run(off, y, sigma_b)))
  np.testing.assert_array_equal(out_a, np.asarray(_run(off, y)))
  on = _tiny(time_conditioning=True)
  _perturb(on)
  assert not np.allclose(np.asarray(_run(on, y, sigma_a)), np.asarray(_run(on, y, sigma_b)))
  with pytest.raises(ValueError, match='sigma'):
    on(y)
  feats = dit.timestep_features(jnp.zeros((2,)))
  np.testing.assert_array_equal(np.asarray(feats), np.concatenate([np.ones((2, 128)),
                                                                   np.zeros((2, 128))], -1))


# ------------------------------------------------------------------------------------------------
# Dropout, scan, remat
# ------------------------------------------------------------------------------------------------


def test_dropout_randomness_is_explicit():
  model = _tiny()
  _perturb(model)
  y = _tokens()
  eval_a, eval_b = _run(model, y), _run(model, y, deterministic=True)
  np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
  k1, k2 = jax.random.key(10), jax.random.key(11)
  train_1, train_1b, train_2 = (_run(model, y, deterministic=False, rngs=k) for k in (k1, k1, k2))
  np.testing.assert_array_equal(np.asarray(train_1), np.asarray(train_1b))
  assert not np.allclose(np.asarray(train_1), np.asarray(train_2))
  assert not np.allclose(np.asarray(train_1), np.asarray(eval_a))
  assert _run(model, y, deterministic=False, rngs=nnx.Rngs(dropout=3)).shape == (B, L, 300)
  with pytest.raises(ValueError, match='rngs'):
    model(y, deterministic=False)
  no_dropout = _tiny(dropout=0.0)
  _copy_weights(model, no_dropout)
  np.testing.assert_array_equal(np.asarray(_run(no_dropout, y, deterministic=False)),
                                np.asarray(eval_a))


def test_scan_matches_unscanned():
  loop = _tiny()
  _perturb(loop)
  scanned = _tiny(scan_layers=True)
  _copy_weights(loop, scanned)
  y, key = _tokens(), jax.random.key(5)
  np.testing.assert_allclose(np.asarray(_run(scanned, y)), np.asarray(_run(loop, y)),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(_run(scanned, y, deterministic=False, rngs=key)),
                             np.asarray(_run(loop, y, deterministic=False, rngs=key)),
                             rtol=1e-5, atol=1e-5)


def _loss_and_grads(model: DiT, y: jax.Array, key: jax.Array):
  """The pure train-step pattern: split once, merge inside the jitted function."""
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def loss_fn(params, y, key):
    m = nnx.merge(graphdef, params)
    logits = m(y, deterministic=False, rngs=jax.random.fold_in(key, 3))
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

  loss, grads = jax.value_and_grad(loss_fn)(params, y, key)
  return loss, nnx.to_pure_dict(grads)


@pytest.mark.parametrize('scan,policy', [(False, 'full'), (True, 'full'), (False, 'dots'),
                                         (True, 'dots_no_batch')])
def test_remat_same_values_and_grads(scan, policy):
  plain = _tiny(scan_layers=scan)
  _perturb(plain)
  remat = _tiny(scan_layers=scan, remat=policy)
  nnx.update(remat, nnx.state(plain, nnx.Param))
  y, key = _tokens(), jax.random.key(4)
  loss_a, grads_a = _loss_and_grads(plain, y, key)
  loss_b, grads_b = _loss_and_grads(remat, y, key)
  np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               grads_a, grads_b)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads_a))
  assert float(jnp.abs(grads_a['embed']['table']).max()) > 0


def test_remat_policy_names_and_the_old_booleans():
  from prime_jax.models import layers
  assert layers.remat_name(True) == 'full' and layers.remat_name(False) == 'none'
  with pytest.raises(ValueError, match="model.remat='everything'.*'dots_no_batch'"):
    _tiny(remat='everything')(_tokens())


def test_remat_policies_keep_less_for_the_backward_pass():
  """What each policy saves shows in the residuals jax keeps between forward and backward:
  none >= dots >= dots_no_batch >= full, and full keeps strictly less than none."""
  _, params = nnx.split(_tiny(), nnx.Param)
  y = _tokens()

  def saved_bytes(policy):
    g, _ = nnx.split(_tiny(remat=policy), nnx.Param)
    f = lambda p: nnx.merge(g, p)(y).sum()
    _, vjp = jax.vjp(f, params)  # a pytree whose leaves are the saved residuals (and params)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(vjp) if hasattr(x, 'dtype'))

  sizes = {p: saved_bytes(p) for p in ('none', 'dots', 'dots_no_batch', 'full')}
  assert sizes['none'] >= sizes['dots'] >= sizes['dots_no_batch'] >= sizes['full'], sizes
  assert sizes['full'] < sizes['none'], sizes


def test_bfloat16_compute_is_close_to_float32():
  """bf16 compute with fp32 parameters: the loss and every gradient stay close to the fp32 ones
  (bf16 keeps ~3 significant digits), and the parameters and gradients stay float32."""
  fp32 = _tiny()
  _perturb(fp32)
  bf16 = _tiny(dtype=jnp.bfloat16)
  nnx.update(bf16, nnx.state(fp32, nnx.Param))
  y, key = _tokens(), jax.random.key(4)
  loss_a, grads_a = _loss_and_grads(fp32, y, key)
  loss_b, grads_b = _loss_and_grads(bf16, y, key)
  assert all(g.dtype == np.float32 for g in jax.tree.leaves(grads_b))
  np.testing.assert_allclose(float(loss_b), float(loss_a), rtol=2e-2)
  assert float(loss_b) != float(loss_a)  # the compute really ran in bf16
  flat_a = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads_a)])
  flat_b = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads_b)])
  cosine = flat_a @ flat_b / np.linalg.norm(flat_a) / np.linalg.norm(flat_b)
  assert cosine > 0.99, cosine
  np.testing.assert_allclose(np.linalg.norm(flat_b), np.linalg.norm(flat_a), rtol=5e-2)


# ------------------------------------------------------------------------------------------------
# Attention and rotary
# ------------------------------------------------------------------------------------------------


def test_attention_is_bidirectional():
  model = _tiny()
  _perturb(model)
  y = _tokens()
  base = np.asarray(_run(model, y))
  later = np.asarray(_run(model, y.at[:, -1, 0].set((y[:, -1, 0] + 1) % 19)))
  earlier = np.asarray(_run(model, y.at[:, 0, 1].set((y[:, 0, 1] + 1) % 19)))
  assert not np.allclose(base[:, 0], later[:, 0])  # a later token reaches the first position
  assert not np.allclose(base[:, -1], earlier[:, -1])  # and an earlier one the last


@pytest.mark.parametrize('base', [10000.0, 30.0])
def test_rotary_depends_on_relative_position_only(base):
  head_dim, n = 16, 10
  cos, sin = dit.rotary_cos_sin(n, head_dim, base)
  q, k = jax.random.normal(jax.random.key(0), (2, head_dim))
  q_rot = dit.apply_rotary(jnp.broadcast_to(q, (1, n, 1, head_dim)), cos, sin)[0, :, 0]
  k_rot = dit.apply_rotary(jnp.broadcast_to(k, (1, n, 1, head_dim)), cos, sin)[0, :, 0]
  scores = np.asarray(q_rot @ k_rot.T)
  for offset in range(-n + 1, n):
    diag = np.diagonal(scores, offset)
    np.testing.assert_allclose(diag, diag[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(q_rot, axis=-1), np.linalg.norm(q), rtol=1e-5)
  # Rotate-half layout: the pair (i, i + H/2) rotates by p * base**(-2i/H); i = 0 rotates by p.
  for i in (0, 1, head_dim // 2 - 1):
    e_i = jnp.zeros((1, n, 1, head_dim)).at[..., i].set(1.0)
    rot = np.asarray(dit.apply_rotary(e_i, cos, sin))[0, :, 0]
    angle = np.arange(n) * base**(-2 * i / head_dim)
    np.testing.assert_allclose(rot[:, i], np.cos(angle), atol=1e-6)
    np.testing.assert_allclose(rot[:, i + head_dim // 2], np.sin(angle), atol=1e-6)


def test_rope_base_reaches_the_attention():
  """model.rope_base sets the DiT's rotary frequencies: same parameters, other logits; the
  reference's 10000 is the default and a base <= 1 is refused."""
  ref, low, explicit = _tiny(), _tiny(rope_base=30.0), _tiny(rope_base=10000.0)
  _perturb(ref)  # zero-initialised blocks would ignore the attention altogether
  _copy_weights(ref, low)
  _copy_weights(ref, explicit)
  y = _tokens()
  a, b, c = (np.asarray(nnx.jit(lambda m: m(y))(m)) for m in (ref, low, explicit))
  assert np.abs(a - b).max() > 1e-3
  np.testing.assert_array_equal(a, c)
  with pytest.raises(ValueError, match='rope_base'):
    _tiny(rope_base=1.0)


def test_distance_bias_is_symmetric_alibi():
  """Head n adds -slope * 2**(-8n/N) * |i - j| to its logits: ALiBi's slopes at slope =
  2**(-8/N)."""
  bias = np.asarray(dit.distance_bias(6, 4, 0.25))
  assert bias.shape == (1, 4, 6, 6)
  dist = np.abs(np.arange(6)[:, None] - np.arange(6)[None, :])
  for n, m in enumerate([0.25, 0.0625, 0.015625, 0.00390625]):  # ALiBi's four-head slopes
    np.testing.assert_allclose(bias[0, n], -m * dist, rtol=1e-6)


@pytest.mark.parametrize('scan', [False, True])
def test_distance_bias_reaches_the_attention(scan):
  """model.distance_bias_slope biases every block's attention (scanned or not): same parameters,
  other logits, and with a very steep bias each position sees only itself (a token changed
  elsewhere leaves it alone); a negative slope is refused."""
  ref = _tiny()
  _perturb(ref)  # zero-initialised blocks would ignore the attention altogether
  biased, steep = _tiny(distance_bias_slope=0.5, scan_layers=scan), _tiny(
      distance_bias_slope=1e4, scan_layers=scan)
  _copy_weights(ref, biased)
  _copy_weights(ref, steep)
  y = _tokens()
  y2 = y.at[:, -1, 0].set((y[:, -1, 0] + 1) % 19)
  a, b = np.asarray(_run(ref, y)), np.asarray(_run(biased, y))
  assert np.abs(a - b).max() > 1e-3
  s1, s2 = np.asarray(_run(steep, y)), np.asarray(_run(steep, y2))
  np.testing.assert_allclose(s1[:, :-1], s2[:, :-1], rtol=1e-5, atol=1e-5)
  assert np.abs(s1[:, -1] - s2[:, -1]).max() > 1e-3
  assert not np.allclose(a[:, 0], np.asarray(_run(ref, y2))[:, 0])  # unbiased: it does reach
  with pytest.raises(ValueError, match='distance_bias_slope'):
    _tiny(distance_bias_slope=-1.0)


# ------------------------------------------------------------------------------------------------
# Sharding metadata
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('scan', [False, True])
def test_every_parameter_has_logical_axes(scan):
  model = _tiny(scan_layers=scan)
  for path, var in _params(model):
    names = var.get_metadata().get('out_sharding')
    assert names is not None and len(names) == var.ndim, (path, names)
    assert set(names) <= set(dit.LOGICAL_AXIS_NAMES), (path, names)
    assert len(set(names)) == len(names), (path, names)  # one mesh axis may serve one array axis
    assert (names[0] == 'layers') == (scan and path[0] == 'blocks'), (path, names)
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  assert tuple(specs['final']['head']['kernel'].get_value()) == ('embed', 'vocab')
