"""The autoregressive baseline (models/ar.py): parameter paths, causal attention, the exact NLL of
the evaluator, jit == no-jit, C + 1 head outputs of which C are returned."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prime_jax import evaluate, losses, sample
from prime_jax.diffusion import schedules
from prime_jax.diffusion.subtokens import Codec
from prime_jax.metrics import throughput
from prime_jax.models import ar
from prime_jax.models.ar import AR
from prime_jax.models.layers import HeadParam

C, D, N, S = 300, 32, 2, 2  # classes, width, heads, layers
B, L = 3, 10
TINY = dict(vocab_size=C, dim=D, num_heads=N, num_layers=S)


def _model(seed: int = 0, **overrides) -> AR:
  """A tiny AR with every parameter moved off its initial value (the head starts at zero)."""
  model = AR(**{**TINY, **overrides}, rngs=nnx.Rngs(seed))
  leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
  nnx.update(model, jax.tree.unflatten(treedef, _add_noise(leaves, jax.random.key(seed + 100))))
  return model


@jax.jit
def _add_noise(leaves, key):
  # One normal draw sliced per leaf: a threefry per leaf would dominate the test's time on CPU.
  noise = 0.3 * jax.random.normal(key, (sum(x.size for x in leaves),))
  offsets = np.cumsum([0] + [x.size for x in leaves])
  return [x + noise[a:b].reshape(x.shape) for x, a, b in zip(leaves, offsets, offsets[1:])]


def _tokens(seed: int = 1) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (B, L), 0, C)


def test_parameter_paths_shapes_and_logical_axes():
  model = AR(**TINY, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  specs = nnx.get_partition_spec(state)
  flat = {'.'.join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
  spec_of = {'.'.join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(specs)}
  expected = {'embed.table': ((C + 1, D), ('vocab', 'embed')),
              'final.norm.scale': ((D,), ('embed',)),
              'final.head.kernel': ((D, C + 1), ('embed', 'vocab')),
              'final.head.bias': ((C + 1,), ('vocab',))}
  for i in range(S):
    expected.update({
        f'blocks.{i}.norm1.scale': ((D,), ('embed',)),
        f'blocks.{i}.qkv.kernel': ((D, 3, D), ('embed', 'qkv', 'heads')),
        f'blocks.{i}.attn_out.kernel': ((D, D), ('heads', 'embed')),
        f'blocks.{i}.norm2.scale': ((D,), ('embed',)),
        f'blocks.{i}.mlp_in.kernel': ((D, 4 * D), ('embed', 'mlp')),
        f'blocks.{i}.mlp_in.bias': ((4 * D,), ('mlp',)),
        f'blocks.{i}.mlp_out.kernel': ((4 * D, D), ('mlp', 'embed')),
        f'blocks.{i}.mlp_out.bias': ((D,), ('embed',))})
  assert {k: v.shape for k, v in flat.items()} == {k: s for k, (s, _) in expected.items()}
  for k, (_, names) in expected.items():
    assert tuple(spec_of[k]) == names, k
  assert {k for k, v in flat.items() if isinstance(v, HeadParam)} == {'final.head.kernel',
                                                                       'final.head.bias'}
  assert sum(v.size for v in flat.values()) == ar.param_counts(**TINY)['total']
  # The reference's start: a zero head, unit LayerNorm scales.
  assert not np.any(flat['final.head.kernel'][...]) and not np.any(flat['final.head.bias'][...])
  assert np.all(flat['blocks.0.norm1.scale'][...] == 1)


def test_head_has_c_plus_one_outputs_and_the_call_returns_the_first_c():
  model = _model()
  x = _tokens()
  logits = model(x)
  assert logits.shape == (B, L, C) and logits.dtype == jnp.float32
  h = model.features(x)
  full = h @ model.final.head.kernel[...] + model.final.head.bias[...]
  assert full.shape == (B, L, C + 1)
  np.testing.assert_allclose(logits, full[..., :C], rtol=1e-5, atol=1e-5)
  # The authors' log-probs (column C set to -1000, log-softmax over C + 1) are the log-softmax
  # over the first C logits.
  theirs = jax.nn.log_softmax(full.at[..., C].set(-1000.0), axis=-1)[..., :C]
  np.testing.assert_allclose(theirs, jax.nn.log_softmax(logits, axis=-1), atol=1e-5)


@pytest.mark.parametrize('slope', [0.0, 1.0])
def test_attention_is_causal(slope):
  model = _model(distance_bias_slope=slope)
  x = _tokens()
  base = np.asarray(model(x))
  for i in (0, 4, L - 1):
    changed = x.at[:, i].set((x[:, i] + 1) % C)
    out = np.asarray(model(changed))
    np.testing.assert_array_equal(out[:, :i], base[:, :i])  # earlier positions never see token i
    assert np.all(np.abs(out[:, i:] - base[:, i:]).max(axis=(0, 2)) > 1e-4)  # every later one does


def test_jit_equals_no_jit_and_dropout_is_keyed():
  model = _model(dropout=0.3)
  x = _tokens()
  run = nnx.jit(AR.__call__, static_argnames=('deterministic',))
  np.testing.assert_allclose(run(model, x), model(x), rtol=1e-5, atol=1e-5)
  key = jax.random.key(3)
  train_eager = model(x, deterministic=False, rngs=key)
  np.testing.assert_allclose(run(model, x, deterministic=False, rngs=key), train_eager,
                             rtol=1e-5, atol=1e-5)
  assert np.abs(train_eager - model(x)).max() > 1e-3  # dropout acts in training only
  with pytest.raises(ValueError, match='rngs'):
    model(x, deterministic=False)


def test_evaluator_sums_are_the_exact_next_token_nll():
  """eval_sums for an autoregressive task: per example the sum of -log p(x_{i+1} | x_{<=i}) over
  its L - 1 predicted positions and L - 1 tokens; a padding row counts 0 of both."""
  model = _model(dropout=0.0)
  graphdef, params = nnx.split(model)
  task = losses.Task(codec=Codec(C, 1), schedule=schedules.get('loglinear'), carry_over=True,
                     objective='nelbo', sampling_eps=1e-3, antithetic=True, autoregressive=True)
  x = np.asarray(_tokens(), np.int32)
  batch = {'tokens': jnp.asarray(x), 'mask': jnp.asarray([True, True, False]),
           'index': jnp.arange(B, dtype=jnp.int32)}
  sums = jax.jit(lambda p, b: evaluate.eval_sums(p, b, graphdef=graphdef, task=task, num_t=4,
                                                  seed=0))(params, batch)
  logits = np.asarray(model(jnp.asarray(x[:, :-1])), np.float64)  # position i predicts x[i + 1]
  top = logits.max(-1, keepdims=True)
  log_p = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  nll_B = -np.take_along_axis(log_p, x[:, 1:, None], axis=-1)[..., 0].sum(axis=1)
  np.testing.assert_allclose(sums['nelbo_B'], nll_B * [1, 1, 0], rtol=2e-5)
  np.testing.assert_allclose(sums['paper_B'], sums['nelbo_B'])
  np.testing.assert_array_equal(sums['tokens_B'], [L - 1, L - 1, 0])
  # The training loss is the same NLL per predicted token (this model has no dropout).
  loss, means = losses.training_loss(params, graphdef, jnp.asarray(x), jax.random.key(0), task)
  np.testing.assert_allclose(float(loss), nll_B.sum() / (B * (L - 1)), rtol=2e-5)
  assert float(means['paper']) == float(means['nelbo']) == float(loss)


def test_greedy_sampling_follows_the_model():
  """nucleus_p near 0 keeps only the top class: each drawn token is the argmax of the model's
  prediction from the tokens before it, and positions before `start` are kept."""
  model = _model()
  graphdef, params = nnx.split(model)
  start_tokens = _tokens(5)
  out = np.asarray(sample.autoregressive_sampler(graphdef, 3, nucleus_p=1e-6)(
      jax.random.key(0), params, start_tokens))
  np.testing.assert_array_equal(out[:, :3], np.asarray(start_tokens)[:, :3])
  pred = np.asarray(jnp.argmax(model(jnp.asarray(out)), axis=-1))
  np.testing.assert_array_equal(out[:, 3:], pred[:, 2:-1])


def test_refusals_and_flops():
  with pytest.raises(ValueError, match='scan_layers'):
    AR(**TINY, scan_layers=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='num_heads'):
    AR(**{**TINY, 'num_heads': 3}, rngs=nnx.Rngs(0))
  abstract = nnx.eval_shape(lambda: AR(**TINY, rngs=nnx.Rngs(0)))
  n = ar.param_counts(**TINY)['per_token']
  assert throughput.train_flops_per_token(abstract, (L,)) == 6.0 * n + 12.0 * S * D * L
