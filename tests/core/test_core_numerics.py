"""Tests for qlite.core.numerics: scales, zero points, (fake) quantization."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlite.core import numerics
from qlite.core.numerics import (ZERO_RANGE_SCALE, dequantize_values,
                                 fake_quant, quantize_values,
                                 scale_zero_point)
from qlite.core.qtypes import NF4_LEVELS, get_qtype
from qlite.errors import QliteError, QTypeError


def test_asymmetric_int8_on_unit_interval():
  scale, zp = scale_zero_point(np.float32(0.0), np.float32(1.0), "int8",
                               symmetric=False, narrow_range=False)
  assert isinstance(scale, np.ndarray) and isinstance(zp, np.ndarray)
  assert scale.dtype == np.float32 and zp.dtype == np.int32
  np.testing.assert_allclose(scale, 1 / 255, rtol=1e-7)
  assert zp == -128
  x = np.linspace(0, 1, 256, dtype=np.float32)
  q = quantize_values(x, scale, zp, "int8")
  assert q.dtype == np.int8 and q.min() == -128 and q.max() == 127
  np.testing.assert_allclose(dequantize_values(q, scale, zp, "int8"), x,
                             atol=float(scale) / 2 + 1e-7)


def test_asymmetric_uint8_and_narrow():
  scale, zp = scale_zero_point(-1.0, 3.0, "uint8", symmetric=False,
                               narrow_range=False)
  np.testing.assert_allclose(scale, 4 / 255, rtol=1e-6)
  assert zp == round(1 / (4 / 255))  # 64
  scale, zp = scale_zero_point(-1.0, 3.0, "int8", symmetric=False,
                               narrow_range=True)
  np.testing.assert_allclose(scale, 4 / 254, rtol=1e-6)
  assert zp == round(-127 + 1 / (4 / 254))  # -63.5 -> -64 (half to even)


def test_range_is_extended_to_include_zero():
  scale, zp = scale_zero_point(2.0, 4.0, "int8", symmetric=False,
                               narrow_range=False)
  np.testing.assert_allclose(scale, 4 / 255, rtol=1e-6)
  assert zp == -128
  # 0 is exactly representable: quantizes to the zero point.
  assert quantize_values(0.0, scale, zp, "int8") == zp


def test_symmetric_signed_and_unsigned():
  scale, zp = scale_zero_point(-2.0, 1.0, "int8", symmetric=True,
                               narrow_range=True)
  np.testing.assert_allclose(scale, 2 / 127, rtol=1e-7)
  assert zp == 0
  scale, zp = scale_zero_point(-2.0, 1.0, "int4", symmetric=True,
                               narrow_range=False)
  np.testing.assert_allclose(scale, 2 / 7, rtol=1e-7)
  scale, zp = scale_zero_point(-2.0, 1.0, "uint8", symmetric=True,
                               narrow_range=False)
  np.testing.assert_allclose(scale, 2 / 127, rtol=1e-7)
  assert zp == 128


def test_float_and_nf4_scales():
  scale, zp = scale_zero_point(-896.0, 10.0, "fp8_e4m3", symmetric=False,
                               narrow_range=False)
  assert float(scale) == 2.0 and zp == 0
  scale, zp = scale_zero_point(-0.5, 3.0, "nf4", symmetric=True,
                               narrow_range=False)
  assert float(scale) == 3.0 and zp == 0


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("qtype", ["int8", "int4", "uint8", "fp8_e4m3", "nf4"])
def test_zero_range_finite_scale_exact_zero(qtype, symmetric):
  scale, zp = scale_zero_point(np.zeros(3, np.float32), np.zeros(3, np.float32),
                               qtype, symmetric=symmetric, narrow_range=False)
  assert np.all(np.isfinite(scale)) and np.all(scale == np.float32(ZERO_RANGE_SCALE))
  x = np.zeros(3, np.float32)
  q = quantize_values(x, scale, zp, qtype)
  np.testing.assert_array_equal(dequantize_values(q, scale, zp, qtype), 0.0)
  np.testing.assert_array_equal(fake_quant(x, scale, zp, qtype), 0.0)


def test_underflowing_scale_uses_epsilon():
  scale, _ = scale_zero_point(-1e-42, 1e-42, "int8", symmetric=True,
                              narrow_range=False)
  assert float(scale) == np.float32(ZERO_RANGE_SCALE)


def test_elementwise_and_jit_match_numpy():
  lo = np.array([-1.0, 0.0, -3.0, 0.0], np.float32)
  hi = np.array([1.0, 2.0, 0.5, 0.0], np.float32)
  for sym in (True, False):
    s_np, z_np = scale_zero_point(lo, hi, "int8", symmetric=sym, narrow_range=False)
    f = jax.jit(lambda a, b, sym=sym: scale_zero_point(
        a, b, "int8", symmetric=sym, narrow_range=False))
    s_j, z_j = f(jnp.asarray(lo), jnp.asarray(hi))
    assert isinstance(s_j, jax.Array) and s_j.shape == (4,)
    np.testing.assert_allclose(s_np, s_j, rtol=1e-7)
    np.testing.assert_array_equal(z_np, z_j)


def test_round_half_to_even_and_clip():
  x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 1000.0, -1000.0], np.float32)
  q = quantize_values(x, np.float32(1.0), None, "int8")
  np.testing.assert_array_equal(q, [0, 2, 2, 0, -2, 127, -128])
  q = quantize_values(x, np.float32(1.0), None, "int8", narrow_range=True)
  assert q[-1] == -127
  q = quantize_values(jnp.asarray(x), 1.0, None, "int4")
  assert q.dtype == jnp.int4
  np.testing.assert_array_equal(np.asarray(q, np.int32), [0, 2, 2, 0, -2, 7, -8])


def test_fp8_round_trip_close_and_saturating():
  rng = np.random.default_rng(0)
  x = rng.normal(size=4096).astype(np.float32)
  scale, _ = scale_zero_point(x.min(), x.max(), "fp8_e4m3", symmetric=True,
                              narrow_range=False)
  q = quantize_values(x, scale, None, "fp8_e4m3")
  assert q.dtype == ml_dtypes.float8_e4m3fn
  y = dequantize_values(q, scale, None, "fp8_e4m3")
  # e4m3 has 3 mantissa bits: relative error <= 2**-4 for normal values.
  normal = np.abs(x / scale) >= 2.0**-6
  assert np.all(np.abs(y - x)[normal] <= 2.0**-4 * np.abs(x)[normal] + 1e-7)
  # Out-of-range values saturate to +-448 * scale instead of becoming NaN.
  big = quantize_values(np.array([1e6, -1e6], np.float32), 1.0, None, "fp8_e4m3")
  np.testing.assert_array_equal(big.astype(np.float32), [448.0, -448.0])
  big = quantize_values(np.array([1e9], np.float32), 1.0, None, "fp8_e5m2")
  assert float(big.astype(np.float32)[0]) == 57344.0


def test_nf4_picks_nearest_level():
  x = np.array([-1.2, -1.0, -0.6, 0.01, 0.5, 0.99, 3.0], np.float32)
  q = quantize_values(x, np.float32(1.0), None, "nf4")
  assert q.dtype == np.uint8
  expected = np.argmin(np.abs(np.clip(x, -1, 1)[:, None] - NF4_LEVELS[None]), 1)
  np.testing.assert_array_equal(q, expected)
  np.testing.assert_array_equal(dequantize_values(q, 2.0, None, "nf4"),
                                2.0 * NF4_LEVELS[expected])


@pytest.mark.parametrize("qtype", ["int8", "int4", "fp8_e5m2", "nf4"])
def test_fake_quant_equals_dequantize_quantize(qtype):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(8, 16)).astype(np.float32)
  scale, zp = scale_zero_point(x.min(0, keepdims=True), x.max(0, keepdims=True),
                               qtype, symmetric=False, narrow_range=False)
  zp_arg = zp if get_qtype(qtype).kind == "int" else None
  expected = dequantize_values(quantize_values(x, scale, zp_arg, qtype),
                               scale, zp_arg, qtype)
  got = jax.jit(lambda a, s, z: fake_quant(a, s, z, qtype))(
      jnp.asarray(x), jnp.asarray(scale), jnp.asarray(zp))
  np.testing.assert_array_equal(np.asarray(got), expected)
  np.testing.assert_array_equal(fake_quant(x, scale, zp, qtype), expected)


def test_fake_quant_keeps_bf16_dtype_and_has_gradient():
  x = jnp.linspace(-1, 1, 7, dtype=jnp.bfloat16)
  assert fake_quant(x, 0.1, None, "int8").dtype == jnp.bfloat16
  g = jax.grad(lambda s: jnp.sum(fake_quant(jnp.ones(3), s, 0, "int8")))(0.1)
  assert np.isfinite(g)


def test_bad_qtype_and_axes():
  with pytest.raises(QTypeError):
    quantize_values(np.ones(2), 1.0, None, "int99")
  with pytest.raises(QliteError, match="out of range"):
    numerics.normalize_axes((2,), 2)
  assert numerics.normalize_axes((-1, 0), 3) == (0, 2)
  assert numerics.keepdims_shape((4, 5, 6), (-1,)) == (1, 1, 6)


@settings(max_examples=200, deadline=None)
@given(
    lo=st.floats(-1024.0, 0.0, width=32),
    width=st.floats(0.0009765625, 2048.0, width=32),
    qtype=st.sampled_from(["int8", "int4", "int3", "uint8", "int16"]),
    symmetric=st.booleans(),
    narrow=st.booleans(),
    xs=st.lists(st.floats(-4096.0, 4096.0, width=32), min_size=1, max_size=16),
)
def test_round_trip_within_half_step_of_clipped(lo, width, qtype, symmetric,
                                                narrow, xs):
  qt = get_qtype(qtype)
  hi = np.float32(lo + width)
  scale, zp = scale_zero_point(np.float32(lo), hi, qt, symmetric=symmetric,
                               narrow_range=narrow)
  s, z = float(scale), float(zp)
  x = np.asarray(xs, np.float32)
  y = dequantize_values(quantize_values(x, scale, zp, qt, narrow_range=narrow),
                        scale, zp, qt)
  lo_rep = (qt.narrow_qmin(narrow) - z) * s
  hi_rep = (qt.qmax - z) * s
  x_clipped = np.clip(x.astype(np.float64), lo_rep, hi_rep)
  tol = s / 2 + 1e-5 * s + 4e-7 * np.abs(x_clipped)
  assert np.all(np.abs(y - x_clipped) <= tol)
  # The calibrated range itself is representable (up to half a step).
  assert lo_rep <= min(lo, 0.0) + s / 2 + 1e-6 and hi_rep >= hi - s / 2 - 1e-6


def test_half_away_rounding_matches_litert_average_pool():
  """``rounding="half_away"``: code ``x / scale + zp`` rounded half away
  from zero (LiteRT's int8 AVERAGE_POOL_2D rounds code sum / count that
  way); ties survive float error; other values round as half-even does."""
  scale, zp = np.float32(0.25), -3
  codes = np.array([2.5, 3.5, -2.5, -3.5, 0.5, -0.5, 2.25, 2.75, 7.0],
                   np.float64)
  x = ((codes - zp) * scale).astype(np.float32)
  got = np.asarray(numerics.fake_quant(x, scale, zp, "int8",
                                       rounding="half_away")) / scale + zp
  np.testing.assert_array_equal(np.round(got), [3, 4, -3, -4, 1, -1, 2, 3, 7])
  # half-to-even rounds x / scale (= code - zp): with an odd zero point the
  # ties 3.5 and -3.5 go the other way
  even = np.asarray(numerics.fake_quant(x, scale, zp, "int8")) / scale + zp
  np.testing.assert_array_equal(np.round(even), [3, 3, -3, -3, 1, -1, 2, 3, 7])
  # a tie computed through float arithmetic (mean of four codes)
  q = np.array([3, 4, 5, 6], np.float32)
  avg = np.mean((q - zp) * scale, dtype=np.float32)        # code 4.5
  got = np.asarray(numerics.fake_quant(np.float32(avg), scale, zp, "int8",
                                       rounding="half_away")) / scale + zp
  assert round(float(got)) == 5
  with pytest.raises(QTypeError, match="rounding"):
    numerics.fake_quant(x, scale, zp, "int8", rounding="up")
