"""The discrete UNet (method.md §8.2): paper parameter counts, shapes, the reference's init
(docs/official.md), embedding order, time."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prime_jax.diffusion import subtokens
from prime_jax.models import unet
from prime_jax.models.dit import DiT
from prime_jax.models.embed import SubtokenEmbed

# Widths 24 / 48: 3 colours x ell sub-token vectors of 8 / ell features for ell in {1, 2, 4}.
TINY = dict(model_channels=24, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
            head_channels=24, dropout=0.0, norm_groups=8)


def tiny(ell=2, channels=3, **kw):
  codec = subtokens.Codec(256, ell)
  return unet.UNet(base=codec.base, ell=ell, image_channels=channels, **dict(TINY, **kw),
                   rngs=nnx.Rngs(0)), codec


def random_y(codec, shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, codec.base + 1,
                                                          shape + (codec.ell,)))


def perturb(model, seed=1, scale=0.05):
  """Gives every parameter (zero-initialised ones included) a random nonzero value (host RNG:
  no per-shape eager compilation)."""
  rng = np.random.default_rng(seed)
  params = nnx.state(model, nnx.Param)
  new = jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape),
                                           x.dtype), params)
  nnx.update(model, new)
  return model


@functools.partial(jax.jit, static_argnames=('graphdef', 'deterministic'))
def _apply(graphdef, state, y, sigma, key, deterministic):
  return nnx.merge(graphdef, state)(y, sigma, deterministic=deterministic, rngs=key)


def call(model, y, sigma=None, *, deterministic=True, rngs=None):
  """model(y, ...) compiled once per model structure (eager NNX compiles op by op)."""
  graphdef, state = nnx.split(model)
  return _apply(graphdef, state, y, sigma, rngs, deterministic)


@pytest.mark.parametrize('ell,expected', [(1, 113_997_315), (2, 113_965_680), (4, 113_964_984)])
def test_paper_parameter_counts(ell, expected):
  """method.md §8.2, counted on abstract shapes (nothing allocated). ell = 1 is MDM (257-way
  output)."""
  codec = subtokens.Codec(256, ell)
  assert unet.count_params(base=codec.base, ell=ell, **unet.preset('paper')) == expected


def test_every_parameter_has_logical_axis_names():
  model, _ = tiny()
  params = nnx.state(model, nnx.Param)
  specs = jax.tree.leaves(nnx.get_partition_spec(params),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  leaves = jax.tree.leaves(params)
  assert len(specs) == len(leaves) > 20
  for spec, x in zip(specs, leaves):
    assert len(spec) == x.ndim and all(n in unet.LOGICAL_AXIS_NAMES for n in spec), spec


def test_shapes_dtype_and_uniform_logits_at_init():
  model, codec = tiny()
  y = random_y(codec, (2, 8, 8, 3))
  logits = call(model, y)
  assert logits.shape == (2, 8, 8, 3, 256) and logits.dtype == jnp.float32
  # The zero-initialised output conv makes every logit 0: a uniform 256-way prediction.
  np.testing.assert_array_equal(np.asarray(logits), 0.0)
  perturb(model)
  logits = np.asarray(call(model, y))
  assert np.isfinite(logits).all() and logits.std() > 0
  # bf16 compute still returns float32 logits.
  bf16, _ = tiny(dtype=jnp.bfloat16)
  assert call(perturb(bf16), y).dtype == jnp.float32


def test_mdm_head_has_a_mask_class_that_is_never_returned():
  model, codec = tiny(ell=1)
  assert codec.base == 256 and model.embed.table.shape == (257, 8)  # mask row included
  assert model.out_conv.kernel.shape[-1] == 3 * 257
  perturb(model)
  assert call(model, random_y(codec, (1, 4, 4, 3))).shape == (1, 4, 4, 3, 256)


def _param_paths(model):
  """(dotted path, numpy value) of every parameter."""
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for path, x in jax.tree_util.tree_leaves_with_path(pure):
    yield '.'.join(str(getattr(k, 'key', getattr(k, 'idx', None))) for k in path), np.asarray(x)


def _films(model):
  return [b.film[...] for b in [s.res for s in model.down if s is not None] + [model.mid.res,
                                model.mid_res] + [s.res for s in model.up]]


def test_initialisation_matches_the_reference():
  """The authors' initialisation (docs/official.md): N(0, 1) pixel table, U(+-sqrt(4 *
  model_channels)) constant FiLM, zero residual-output convs / attention projections / output
  conv, PyTorch defaults elsewhere."""
  model, _ = tiny(ell=1)  # a (257, 8) table: 2056 draws
  table = np.asarray(model.embed.table[...]).ravel()
  # N(0, 1): the sample std of n = 2056 normals has a standard error of 1/sqrt(2n) = 0.016, so 0.08
  # is 5 standard errors; the mean's is 1/sqrt(n) = 0.022. The old U(+-1/sqrt(8)) init has std
  # 0.20, and a unit-std uniform never exceeds sqrt(3): a normal sample of this size does (by 2.0
  # with probability 1 - 0.954**2056).
  assert table.size == 2056
  assert abs(table.std() - 1.0) < 0.08 and abs(table.mean()) < 0.11, (table.std(), table.mean())
  assert np.abs(table).max() > 2.0
  # FiLM: U(+-sqrt(4 * 24)) = +-9.80 over 2 * 312 = 624 entries. The largest |x| of n uniform draws
  # falls short of the bound by bound / (n + 1) = 0.016 on average: below 0.98 * bound with
  # probability 0.98**624 = 3e-6. The std of U(+-b) is b / sqrt(3) = 5.66, standard error
  # b / sqrt(15 n) = 0.10.
  bound = math.sqrt(4 * TINY['model_channels'])
  films = np.concatenate([np.asarray(f) for f in _films(model)])
  assert films.size == 624
  assert np.abs(films).max() <= bound and np.abs(films).max() > 0.98 * bound
  assert abs(films.std() - bound / math.sqrt(3)) < 0.5 and abs(films.mean()) < 1.2
  # Zero-initialised: every residual block's output conv, every attention output projection and
  # the output conv. Everything else is nonzero (kernels U(+-1/sqrt(fan_in))) or GroupNorm (1, 0).
  for path, x in _param_paths(model):
    zero = path.endswith(('out_conv.kernel', 'out_conv.bias', 'proj.kernel', 'proj.bias',
                          'norm.bias'))
    if path.endswith('norm.scale'):
      np.testing.assert_array_equal(x, 1.0, err_msg=path)
    elif zero:
      np.testing.assert_array_equal(x, 0.0, err_msg=path)
    else:
      assert np.all(x != 0), path
    if path.endswith(('conv.kernel', 'qkv.kernel', 'skip.kernel')) and not zero:
      fan_in = math.prod(x.shape[:-1]) if 'conv' in path else x.shape[0]
      assert np.abs(x).max() <= 1 / math.sqrt(fan_in), path


def test_dit_embedding_keeps_its_init():
  """The N(0, 1) table is the UNet's choice: SubtokenEmbed's default (the DiT's) is still the
  text reference's U(+-1/sqrt(E)), draw for draw."""
  emb = SubtokenEmbed(19, 2, 64, rngs=nnx.Rngs(0))
  want = jax.random.uniform(nnx.Rngs(0).params(), (19, 32), jnp.float32, -32**-0.5, 32**-0.5)
  np.testing.assert_array_equal(np.asarray(emb.table[...]), np.asarray(want))
  table = jax.jit(lambda: nnx.state(DiT(vocab_size=300, base=18, ell=2, dim=64, num_heads=4,
                                        num_layers=1, cond_dim=32, rngs=nnx.Rngs(0)),
                                    nnx.Param)['embed']['table'][...])()
  np.testing.assert_array_equal(np.asarray(table), np.asarray(want))


def test_embedding_is_concatenated_in_colour_digit_feature_order():
  model, codec = tiny(ell=2)  # 24 channels = 3 colours x 2 digits x 4 features
  perturb(model)
  y = random_y(codec, (1, 4, 4, 3))
  h = np.asarray(model.input_features(y))
  table = np.asarray(model.embed.table[...])
  assert table.shape == (codec.base + 1, 4) and h.shape == (1, 4, 4, 24)
  for c in range(3):
    for j in range(2):
      want = table[np.asarray(y[..., c, j])]
      np.testing.assert_array_equal(h[..., (2 * c + j) * 4:(2 * c + j + 1) * 4], want)


def test_logits_depend_on_their_own_pixel_and_colour():
  model, codec = tiny()
  perturb(model)
  y = random_y(codec, (1, 8, 8, 3))
  y2 = y.at[0, 3, 5, 1].set((y[0, 3, 5, 1] + 1) % (codec.base + 1))
  diff = np.abs(np.asarray(call(model, y2) - call(model, y))).max(axis=-1)[0]
  assert diff[3, 5].max() > 0  # the changed pixel's prediction moves
  assert (diff > 0).mean() > 0.5  # and, through convolutions and attention, most others too


def test_time_independent_by_default_and_time_conditioned_on_request():
  model, codec = tiny()
  perturb(model)
  y = random_y(codec, (2, 8, 8, 3))
  a = call(model, y, jnp.array([0.1, 0.9]))
  b = call(model, y, jnp.array([0.7, 0.2]))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(call(model, y)))
  timed, _ = tiny(time_conditioning=True)
  perturb(timed)
  a = call(timed, y, jnp.array([0.1, 0.9]))
  b = call(timed, y, jnp.array([0.7, 0.2]))
  assert np.abs(np.asarray(a - b)).max() > 1e-4
  with pytest.raises(ValueError, match='sigma'):
    call(timed, y)
  # The constant FiLM vector is 2 * D parameters per block (method.md §8.2), no time MLP.
  assert model.down[0].res.film.shape == (2 * 24,) and not hasattr(model, 'time_fc1')


def test_dropout_needs_a_key_and_is_deterministic_given_one():
  model, codec = tiny(dropout=0.5)
  perturb(model)
  y = random_y(codec, (1, 8, 8, 3))
  with pytest.raises(ValueError, match='rngs'):
    call(model, y, deterministic=False)
  a = call(model, y, deterministic=False, rngs=jax.random.key(0))
  b = call(model, y, deterministic=False, rngs=jax.random.key(0))
  c = call(model, y, deterministic=False, rngs=jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.abs(np.asarray(a - c)).max() > 0
  assert np.abs(np.asarray(a - call(model, y))).max() > 0


def test_jit_and_remat_agree_with_eager():
  model, codec = tiny()
  perturb(model)
  y = random_y(codec, (1, 4, 4, 3))
  want = np.asarray(model(y))
  graphdef, params = nnx.split(model)
  got = jax.jit(lambda p: nnx.merge(graphdef, p)(y))(params)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  remat, _ = tiny(remat=True)
  nnx.update(remat, nnx.state(model, nnx.Param))
  np.testing.assert_allclose(np.asarray(call(remat, y)), want, rtol=1e-5, atol=1e-5)


def test_impossible_configurations_are_clear_errors():
  with pytest.raises(ValueError, match='divisible by image_channels'):
    tiny(ell=3)  # 24 channels / 3 colours / 3 digits
  model, codec = tiny()
  with pytest.raises(ValueError, match='not divisible by 2'):
    call(model, random_y(codec, (1, 7, 7, 3)))
  with pytest.raises(ValueError, match=r'\(B, H, W, 3, 2\)'):
    call(model, random_y(codec, (1, 8, 8, 1)))
  with pytest.raises(ValueError, match='groups'):
    tiny(norm_groups=5)
  with pytest.raises(ValueError, match='head_channels'):
    tiny(head_channels=20)


def test_forward_flops_scale_with_resolution():
  model, _ = tiny(attention_resolutions=())
  f8, f16 = model.forward_flops(8, 8), model.forward_flops(16, 16)
  # Every term is per position except the middle block's attention, quadratic in T = H W / 4.
  mid_attn8 = 4.0 * 16 * 16 * 48  # 2 * T * T * D for QK^T and as much for AV, D = 48
  assert f16 - 16 * mid_attn8 == pytest.approx(4 * (f8 - mid_attn8))
  # The 3 x 3 output conv alone: 2 * positions * 9 * D0 * C * 256.
  assert f8 > 2 * 64 * 9 * 24 * 3 * 256
  assert math.isfinite(unet.UNet.forward_flops(model, 28, 28))
