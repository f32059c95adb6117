"""Codec (method.md §1, 12.2, 13.1-13.4, 13.20): values, round trips, shuffling, errors,
identity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prime_jax.diffusion.subtokens import Codec

SMALL_C = (2, 7, 16, 27, 100, 257)


def _small_codecs():
  for c in SMALL_C:
    for ell in range(1, (c - 1).bit_length() + 1):  # 1 .. ceil(log2 C)
      yield c, ell


def _digits_np(codes, base, ell):
  """Reference base-b digits, most significant first, in int64 numpy."""
  codes = np.asarray(codes, np.int64)
  return np.stack([(codes // base**(ell - 1 - j)) % base for j in range(ell)], -1)


def test_round_trip_exhaustive_and_base():
  for c, ell in _small_codecs():
    codec = Codec(c, ell)
    b = codec.base
    assert b**ell >= c and (b == 2 or (b - 1)**ell < c), (c, ell, b)
    assert codec.mask_id == b and codec.num_codes == b**ell and codec.num_invalid == b**ell - c
    # All of [0, C), padded to one length so that eager jax ops are compiled once per ell.
    x = np.arange(max(SMALL_C)) % c
    y = np.asarray(codec.encode(x))
    assert y.shape == x.shape + (ell,)
    np.testing.assert_array_equal(y, _digits_np(x, b, ell))
    assert y.min() >= 0 and y.max() < b  # never the mask id
    np.testing.assert_array_equal(np.asarray(codec.decode(y)), x)
    np.testing.assert_array_equal(codec.digits, y[:c])


@pytest.mark.parametrize('ell,base,num_invalid,last', [
    (1, 50257, 0, (50256,)),
    (2, 225, 368, (223, 81)),
    (3, 37, 396, (36, 26, 10)),
    (4, 15, 368, (14, 13, 5, 6)),
    (6, 7, 67392, (2, 6, 6, 3, 4, 3)),
    (8, 4, 15279, (3, 0, 1, 0, 1, 1, 0, 0)),
    (16, 2, 15279, tuple(int(ch) for ch in '1100010001010000')),
])
def test_gpt2_table(ell, base, num_invalid, last):
  codec = Codec(50257, ell)
  assert codec.base == base and codec.num_invalid == num_invalid
  x = np.arange(50257)
  y = np.asarray(codec.encode(x))
  assert tuple(y[-1].tolist()) == last and tuple(codec.digits[-1].tolist()) == last
  np.testing.assert_array_equal(y[0], np.zeros(ell))
  np.testing.assert_array_equal(np.asarray(codec.decode(y)), x)


@pytest.mark.parametrize('c,ell,base', [
    (256, 2, 16), (256, 3, 7), (256, 4, 4), (256, 8, 2), (32000, 15, 2), (512, 2, 23)])
def test_other_bases(c, ell, base):
  assert Codec(c, ell).base == base


def test_binary():
  assert (Codec.binary(50257).ell, Codec.binary(50257).base) == (16, 2)
  assert (Codec.binary(32000).ell, Codec.binary(32000).num_invalid) == (15, 768)
  assert Codec.binary(256).ell == 8


def test_any_leading_shape_and_jit():
  codec = Codec(100, 3)
  x = np.random.default_rng(0).integers(0, 100, (2, 3, 4))
  y = codec.encode(x)
  assert y.shape == (2, 3, 4, 3)
  np.testing.assert_array_equal(np.asarray(y), _digits_np(x, codec.base, 3))
  y_jit = jax.jit(codec.encode)(x)
  np.testing.assert_array_equal(np.asarray(y_jit), np.asarray(y))
  np.testing.assert_array_equal(np.asarray(jax.jit(codec.decode)(y_jit)), x)
  assert codec.encode(jnp.int32(42)).shape == (3,)


@pytest.mark.parametrize('c,ell', [(7, 2), (27, 3), (100, 4), (257, 9), (50257, 2)])
def test_shuffled_round_trip(c, ell):
  codec = Codec(c, ell, shuffle_seed=0)
  assert codec.shuffled and codec.base == Codec(c, ell).base
  x = np.arange(c)
  y = np.asarray(codec.encode(x))
  assert y.max() < codec.base
  np.testing.assert_array_equal(np.asarray(codec.decode(y)), x)
  np.testing.assert_array_equal(codec.digits, y)
  np.testing.assert_array_equal(y, _digits_np(codec.codes, codec.base, ell))
  assert np.array_equal(np.sort(codec.codes), x) and not np.array_equal(codec.codes, x)
  again = Codec(c, ell, shuffle_seed=0)
  np.testing.assert_array_equal(again.codes, codec.codes)
  assert again == codec and hash(again) == hash(codec)
  other = Codec(c, ell, shuffle_seed=1)
  assert not np.array_equal(other.codes, codec.codes) and other != codec


def _tail_identity_perm(seed=0):
  """Like the authors' perm_32768: permutes [0, 20) among themselves, identity on [20, 32)."""
  perm = np.arange(32)
  perm[:20] = np.random.default_rng(seed).permutation(20)
  return perm


def test_permutation_longer_than_vocab(tmp_path):
  perm = _tail_identity_perm()
  codec = Codec(20, 5, permutation=perm)  # b = 2, 32 codes
  assert codec.num_codes == 32
  x = np.arange(20)
  y = np.asarray(codec.encode(x))
  np.testing.assert_array_equal(y, _digits_np(perm[:20], 2, 5))
  np.testing.assert_array_equal(np.asarray(codec.decode(y)), x)
  np.testing.assert_array_equal(codec.digits, y)
  # Every code maps back; codes in the identity tail are invalid (decode to ids >= C).
  np.testing.assert_array_equal(codec.token_of_code[perm], np.arange(32))
  assert (codec.token_of_code[20:] >= 20).all()

  path = tmp_path / 'perm.bin'
  np.asarray(perm, dtype='<i8').tofile(path)
  loaded = Codec.from_permutation_file(str(path), 20, 5)
  np.testing.assert_array_equal(loaded.codes, perm[:20])
  assert loaded == codec


def test_full_code_permutation():
  """Megatron random_ratio=1.0: tokens scattered over all b**ell codes, including codes >= C."""
  perm = np.random.default_rng(1).permutation(32)
  codec = Codec(20, 5, permutation=perm)
  assert (perm[:20] >= 20).any()
  y = np.asarray(codec.encode(np.arange(20)))
  np.testing.assert_array_equal(y, _digits_np(perm[:20], 2, 5))
  np.testing.assert_array_equal(np.asarray(codec.decode(y)), np.arange(20))
  invalid = np.setdiff1d(np.arange(32), perm[:20])
  assert len(invalid) == codec.num_invalid == 12
  assert (codec.token_of_code[invalid] >= 20).all()
  all_codes = _digits_np(np.arange(32), 2, 5)
  assert (np.asarray(codec.decode(all_codes))[invalid] >= 20).all()


def test_invalid_permutations():
  with pytest.raises(ValueError, match='not a permutation'):
    Codec(20, 5, permutation=np.r_[0, np.arange(31)])
  with pytest.raises(ValueError, match='length'):
    Codec(20, 5, permutation=np.arange(19))
  with pytest.raises(ValueError, match='length'):
    Codec(20, 5, permutation=np.arange(33))
  with pytest.raises(ValueError):
    Codec(20, 5, shuffle_seed=0, permutation=np.arange(20))


def test_constructor_errors():
  with pytest.raises(ValueError, match='ell'):
    Codec(50257, 0)
  with pytest.raises(ValueError, match='vocab_size'):
    Codec(1, 2)
  with pytest.raises(ValueError, match='int32'):
    Codec(50257, 40)  # b = 2, 2**40 codes


def test_check():
  codec = Codec(100, 2)
  ok = np.array([[0, 99], [5, 7]])
  out = codec.check(ok)
  assert isinstance(out, np.ndarray)
  np.testing.assert_array_equal(out, ok)
  np.testing.assert_array_equal(codec.check(jnp.arange(100)), np.arange(100))
  with pytest.raises(ValueError, match='123'):
    codec.check(np.array([[1, 2], [123, 4]]))
  with pytest.raises(ValueError, match='-3'):
    codec.check([1, 2, -3])
  with pytest.raises(ValueError, match='100'):
    codec.check(np.array([100]))
  with pytest.raises(ValueError, match='integer'):
    codec.check(np.array([1.0, 2.0]))


def test_check_scalar():
  with pytest.raises(ValueError, match='outside'):
    Codec(100, 2).check(100)


def test_hash_eq_and_static_jit():
  a, b = Codec(100, 3), Codec(100, 3)
  assert a == b and hash(a) == hash(b) and a is not b
  assert a != Codec(100, 2) and a != Codec(101, 3) and a != Codec(100, 3, shuffle_seed=0)
  assert len({a, b, Codec(100, 2)}) == 2
  traces = []

  def f(x, codec):
    traces.append(codec)
    return codec.encode(x)

  f_jit = jax.jit(f, static_argnums=1)
  x = jnp.arange(10)
  np.testing.assert_array_equal(np.asarray(f_jit(x, a)), np.asarray(a.encode(x)))
  f_jit(x, b)  # equal codec: cache hit, no retrace
  assert len(traces) == 1
  f_jit(x, Codec(100, 2))
  assert len(traces) == 2
