"""The authors' image checkpoint (a fixture written by their own code) in and out: logit and
embedding parity with raw and EMA weights, the EMA/raw choice, refusals of configs that cannot hold
the file, export round trips through our writer and torch's reader, the stored training options."""

import collections
import functools
import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from prime_jax import build, torchfile
from prime_jax.convert import common, image
from prime_jax.diffusion import subtokens
from prime_jax.models import unet
from tests.conftest import SHARED

FIXTURES = SHARED / 'fixtures' / 'official'
PTH = str(FIXTURES / 'image_prime_l2.pth')
# The fixture's sizes: 2 colours, 8 x 8, widths 32, one res block per level, attention at the 4 x 4
# level and in the middle, 16-channel heads, GroupNorm(32), ell = 2 (base 16, mask id 16).
SIZES = dict(image_channels=2, model_channels=32, channel_mult=(1, 1), num_res_blocks=1,
             attention_resolutions=(2,), head_channels=16, dropout=0.4, norm_groups=32)


def make_model(ell=2, **overrides):
  codec = subtokens.Codec(256, ell)
  return functools.partial(unet.UNet, base=codec.base, ell=ell, **dict(SIZES, **overrides))


@functools.lru_cache(maxsize=None)
def abstract(ell=2, **overrides):
  """(graphdef, abstract params) of the UNet at these sizes (nothing allocated)."""
  graphdef, params, _ = build.abstract_params(make_model(ell, **overrides))
  return graphdef, params


@functools.partial(jax.jit, static_argnames=('graphdef',))
def _apply(graphdef, params, y):
  model = nnx.merge(graphdef, params)
  return model(y), model.input_features(y)


@functools.lru_cache(maxsize=None)
def npz():
  z = np.load(str(FIXTURES / 'image_prime_l2.npz'))
  return {k: z[k] for k in z.files}


def our_input(ids):
  """Their (B, C*K, H, W) planes (plane c*K + j = digit j of colour c) -> our (B, H, W, C, K)."""
  b, ck, h, w = ids.shape
  return ids.reshape(b, 2, ck // 2, h, w).transpose(0, 3, 4, 1, 2)


def load(weights, ell=2, **overrides):
  graphdef, params = abstract(ell, **overrides)
  with torchfile.TorchFile(PTH) as f:
    return graphdef, image.import_unet(f.root['model'], params, weights=weights, source='fixture')


def run(graphdef, params):
  """(logits as theirs (B, C, H, W, V), embedding as theirs (B, D0, H, W))."""
  logits, embed = _apply(graphdef, params, our_input(npz()['ids']))
  return np.asarray(logits).transpose(0, 3, 1, 2, 4), np.asarray(embed).transpose(0, 3, 1, 2)


@pytest.mark.parametrize('weights', ['raw', 'ema'])
def test_logits_and_embedding_match_the_authors(weights):
  logits, embed = run(*load(weights))
  ref = npz()[f'logits_{weights}']
  assert logits.shape == ref.shape == (2, 2, 8, 8, 256)
  assert np.abs(logits - ref).max() < 1e-4  # measured: 3.6e-6 (raw), 5.2e-6 (EMA); |logit| <= 3.1
  assert (logits.argmax(-1) == ref.argmax(-1)).all()
  np.testing.assert_array_equal(embed, npz()[f'embed_{weights}'])  # a table lookup: exact


def test_the_wrong_weights_are_caught():
  logits, _ = run(*load('raw'))
  assert np.abs(logits - npz()['logits_ema']).max() > 0.1  # measured: 3.5


def test_export_round_trips_bit_for_bit_and_reproduces_the_file(tmp_path):
  _, raw = load('raw')
  _, ema = load('ema')
  out = image.export_unet(raw, ema, num_updates=1)
  with torchfile.TorchFile(PTH) as f:
    theirs = torchfile.map_tensors(f.root['model'], lambda t: t.numpy())
  # Every entry of the fixture's `model`, in its order, with its dtype and values.
  assert list(out) == list(theirs) and len(out) == 1 + 2 * 109
  for key, value in theirs.items():
    assert out[key].dtype == value.dtype and out[key].shape == value.shape, key
    np.testing.assert_array_equal(out[key], value, err_msg=key)
  path = tmp_path / 'checkpoint-1.pth'
  torchfile.write({'model': out, 'epoch': 0}, path)
  _, params = abstract()
  with torchfile.TorchFile(path) as f:
    back = {w: image.import_unet(f.root['model'], params, weights=w) for w in ('raw', 'ema')}
  for want, got in ((raw, back['raw']), (ema, back['ema'])):
    want, got = common.by_path(want), common.by_path(got)
    assert list(want) == list(got)
    for k in want:
      assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
  # Dotted-path dicts (what the workdir export passes) give the same file; ema=None repeats raw.
  again = image.export_unet(common.by_path(raw), common.by_path(ema), num_updates=1)
  assert all(np.array_equal(again[k], out[k]) for k in out)
  only_raw = image.export_unet(raw, None, num_updates=7)
  assert int(only_raw['num_updates']) == 7 and only_raw['num_updates'].dtype == np.int64
  assert np.array_equal(only_raw['shadow_params.108'], out['model.unet.out.2.bias'])


def test_torch_reads_the_export_as_the_authors_wrote_it(tmp_path):
  _, raw = load('raw')
  _, ema = load('ema')
  path = tmp_path / 'checkpoint-1.pth'
  torchfile.write({'model': image.export_unet(raw, ema, num_updates=1)}, path)
  mine = torch.load(path, weights_only=True)['model']
  theirs = torch.load(PTH, map_location='cpu', weights_only=False)['model']  # args: a Namespace
  assert isinstance(mine, collections.OrderedDict) and list(mine) == list(theirs)
  for key, value in theirs.items():
    assert mine[key].dtype == value.dtype and mine[key].shape == value.shape, key
    assert torch.equal(mine[key], value), key


@pytest.mark.parametrize('ell,overrides,tensor,theirs,wanted', [
    # Twice the width: the table's rows are E / ell = 64 / 2 / 2 = 16 wide.
    (2, dict(model_channels=64), 'model.pixel_embedding.embedding_table.weight', (17, 8), (17, 16)),
    # ell = 4: base 4, a 5-row table of 32 / 2 / 4 = 4 features.
    (4, {}, 'model.pixel_embedding.embedding_table.weight', (17, 8), (5, 4)),
    # ell = 1 (MDM): 257 rows, and 2 x 257 output channels (the mask class).
    (1, {}, 'model.pixel_embedding.embedding_table.weight', (17, 8), (257, 16)),
])
def test_a_config_of_another_width_or_ell_names_the_tensor_and_both_shapes(ell, overrides, tensor,
                                                                           theirs, wanted):
  with pytest.raises(common.ConversionError) as e:
    load('ema', ell, **overrides)
  msg = str(e.value)
  assert tensor in msg and str(theirs) in msg and str(wanted) in msg, msg


def test_a_config_of_another_depth_or_layout_names_the_tensor():
  # Two res blocks per level: the file's input_blocks.3 is a residual block, ours a downsampler.
  with pytest.raises(common.ConversionError,
                     match=r'model\.unet\.input_blocks\.3\.0\.in_layers\.0\.weight has no place'):
    load('raw', num_res_blocks=2)
  # No attention at 4 x 4: the file's attention tensors have no place.
  with pytest.raises(common.ConversionError,
                     match=r'model\.unet\.input_blocks\.3\.1\.norm\.weight has no place'):
    load('raw', attention_resolutions=())
  # A different output head: the mask class (ell = 2 with mask_logit_in_head).
  with pytest.raises(common.ConversionError,
                     match=r'model\.unet\.out\.2\.weight has shape \(512, 32, 3, 3\).*'
                           r'\(514, 32, 3, 3\)'):
    load('raw', mask_logit_in_head=True)
  with pytest.raises(common.ConversionError, match='time-conditioned'):
    load('raw', time_conditioning=True)


def test_the_ema_pairing_is_checked():
  sd = torchfile.read(PTH)['model']  # every tensor read now
  _, params = abstract()
  no_ema = collections.OrderedDict((k, v) for k, v in sd.items() if not k.startswith('shadow'))
  image.import_unet(no_ema, params, weights='raw')  # raw weights need no EMA
  with pytest.raises(common.ConversionError, match='no EMA weights'):
    image.import_unet(no_ema, params, weights='ema')
  short = collections.OrderedDict(list(sd.items())[:-1])
  with pytest.raises(common.ConversionError, match='do not pair'):
    image.import_unet(short, params, weights='ema')
  with pytest.raises(common.ConversionError, match='not the whole checkpoint'):
    image.import_unet({'model': sd}, params)
  bare = collections.OrderedDict((k[len('model.'):], v) for k, v in sd.items()
                                 if k.startswith('model.'))
  with pytest.raises(common.ConversionError, match='use_ema'):
    image.import_unet(bare, params, weights='raw')
  with pytest.raises(ValueError, match='weights'):
    image.import_unet(sd, params, weights='shadow')


def test_mdm_ell1_with_the_mask_class_round_trips():
  """ell = 1 (MDM, the mask class in the head: 2 x 257 output channels) under the same names."""
  graphdef, params = abstract(1)
  model = nnx.merge(graphdef, jax.tree.map(
      lambda a: np.random.default_rng(a.size).standard_normal(a.shape).astype(a.dtype), params))
  raw = nnx.state(model, nnx.Param)
  out = image.export_unet(raw, raw, num_updates=3)
  assert out['model.pixel_embedding.embedding_table.weight'].shape == (257, 16)
  assert out['model.unet.out.2.weight'].shape == (2 * 257, 32, 3, 3)
  back = image.import_unet(out, params, weights='ema')
  for (k, a), (k2, b) in zip(common.leaves(raw), common.leaves(back)):
    assert k == k2 and np.array_equal(a, b), k


def test_the_paper_model_has_the_authors_names_and_shapes():
  """CIFAR-10 ell = 2 (docs/official.md), on abstract shapes: 430 tensors, 113,965,680
  parameters, downsamplers at input_blocks 6 and 12, attention in input_blocks 7-11, output_blocks
  6-11 and the middle, skip convs in every output block."""
  _, params, _ = build.abstract_params(functools.partial(
      unet.UNet, base=16, ell=2, image_channels=3, **unet.preset('paper')))
  keys = image.expected_keys(params)
  assert len(keys) == 430 and sum(int(np.prod(s)) for s in keys.values()) == 113_965_680
  u = 'model.unet.'
  assert list(keys)[:2] == ['model.pixel_embedding.embedding_table.weight',
                            u + 'input_blocks.1.0.in_layers.0.weight']
  assert keys['model.pixel_embedding.embedding_table.weight'] == (17, 48)
  assert keys[u + 'input_blocks.7.0.in_layers.2.weight'] == (384, 288, 3, 3)
  assert keys[u + 'input_blocks.7.0.skip_connection.weight'] == (384, 288, 1, 1)
  assert keys[u + 'input_blocks.7.1.qkv.weight'] == (1152, 384, 1)
  assert keys[u + 'middle_block.1.proj_out.weight'] == (384, 384, 1)
  assert keys[u + 'output_blocks.11.0.in_layers.2.weight'] == (384, 672, 3, 3)
  assert keys[u + 'output_blocks.12.0.skip_connection.weight'] == (288, 672, 1, 1)
  assert keys[u + 'out.2.weight'] == (768, 288, 3, 3)
  assert keys[u + 'input_blocks.1.0.emb_layers.embedding_table'] == (1, 576)
  blocks = lambda part: {int(k.split('.')[3]) for k in keys if k.startswith(u + part)}
  assert blocks('input_blocks.') == set(range(1, 18)) - {6, 12}
  attn = lambda part: {int(k.split('.')[3]) for k in keys
                       if k.startswith(u + part) and k.endswith('.1.qkv.weight')}
  assert attn('input_blocks.') == set(range(7, 12)) and attn('output_blocks.') == set(range(6, 12))
  assert {int(k.split('.')[3]) for k in keys if 'output_blocks' in k and 'skip' in k} == set(
      range(18))


def test_describe_gives_the_training_options():
  with torchfile.TorchFile(PTH) as f:
    got = image.describe(f.root['args'])
  json.dumps(got)  # plain types only
  assert got['target_length'] == 2 and got['base'] == 16 and got['vocab_size'] == 256
  assert got['carry_over'] is True and got['dataset'] == 'cifar10' and got['use_ema'] is True
  assert got['temperature_parameters'] == [-0.2, 2.0, 1.0] and got['nfe'] == 512
  assert got['use_corrector_step'] is True and got['corrector_parameters'] == [16.0, 2.0, 0.75]
  assert got['use_timestep_scheduler'] is True and got['timestep_parameters'] == [1.0, 1.7, 0.0]
  assert got['schedule_n'] == 3.0
  # torch's own Namespace gives the same dict; no args, none.
  assert image.describe(torch.load(PTH, map_location='cpu', weights_only=False)['args']) == got
  assert image.describe(None) == {}
