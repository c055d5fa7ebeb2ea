"""Tests for qlite.core.qarray: QArray layout, accuracy (SQNR), storage size."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from qlite.core import QArray, dequantize, quantize
from qlite.errors import QliteError, QTypeError


def sqnr_db(x, y):
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  return 10 * np.log10(np.sum(x**2) / np.sum((x - y)**2))


@pytest.fixture(scope="module")
def gaussian():
  return np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)


def test_int8_per_channel_error_within_half_scale(gaussian):
  qa = quantize(gaussian, "int8", channel_axes=(1,))
  assert qa.qvalue.dtype == jnp.int8 and qa.qvalue.shape == (256, 256)
  assert qa.scale.shape == (1, 256) and qa.scale.dtype == jnp.float32
  assert qa.zero_point is None
  np.testing.assert_allclose(qa.scale[0], np.abs(gaussian).max(0) / 127, rtol=1e-6)
  err = np.abs(np.asarray(qa.dequantize()) - gaussian)
  assert np.all(err <= np.asarray(qa.scale) / 2 * (1 + 1e-5))


def test_int8_per_channel_sqnr(gaussian):
  # Theory: step = ~3 sigma / 127, noise step**2 / 12 -> ~43 dB.
  qa = quantize(gaussian, "int8", channel_axes=(1,))
  assert sqnr_db(gaussian, dequantize(qa)) >= 39.0


def test_int4_per_channel_sqnr(gaussian):
  # Absmax int4 on 256 gaussian values per channel: step = E[max|x|] / 7
  # ~= 3.0 sigma / 7, so SQNR ~= 10 log10(12 * 49 / 9) ~= 18 dB; over 20 seeds
  # this implementation measured 17.85..18.10 dB (mean 17.97). Hence 17.5.
  qa = quantize(gaussian, "int4", channel_axes=(-1,))
  assert qa.qvalue.dtype == jnp.int4
  assert sqnr_db(gaussian, qa.dequantize()) >= 17.5


def test_int4_subchannel_beats_per_channel_with_outlier_rows(gaussian):
  w = gaussian.copy()
  w[[3, 100, 200]] *= 20.0  # a few outlier rows along the contraction axis K.
  per_channel = quantize(w, "int4", channel_axes=(1,))
  tiled = quantize(w, "int4", channel_axes=(1,), tile_sizes={0: 32})
  assert tiled.scale.shape == (8, 256) and tiled.tiled_shape == (8, 32, 256)
  s_pc = sqnr_db(w, per_channel.dequantize())
  s_tiled = sqnr_db(w, tiled.dequantize())
  # Outlier rows dominate the signal energy; the gain is measured on the
  # non-outlier rows (5 of 8 tiles have no outlier) and overall.
  normal = np.setdiff1d(np.arange(256), [3, 100, 200])
  s_pc_rows = sqnr_db(w[normal], np.asarray(per_channel.dequantize())[normal])
  s_tiled_rows = sqnr_db(w[normal], np.asarray(tiled.dequantize())[normal])
  assert s_tiled > s_pc + 1.0
  assert s_tiled_rows > s_pc_rows + 6.0


def test_tiled_error_within_half_tile_scale(gaussian):
  qa = quantize(gaussian, "int8", tile_sizes={-1: 64})
  assert qa.scale.shape == (1, 4)
  scale, _ = qa.tiled_scale()
  err = np.abs(np.asarray(qa.dequantize()) - gaussian).reshape(256, 4, 64)
  assert np.all(err <= np.asarray(scale) / 2 * (1 + 1e-5))


def test_per_tensor_and_3d_channel_axes():
  x = np.random.default_rng(2).normal(size=(4, 6, 8)).astype(np.float32)
  qa = quantize(x, "int8")
  assert qa.scale.shape == (1, 1, 1)
  np.testing.assert_allclose(qa.scale, np.abs(x).max() / 127, rtol=1e-6)
  qa = quantize(x, "int8", channel_axes=(0, -1))
  assert qa.scale.shape == (4, 1, 8) and qa.channel_axes == (0, 2)
  assert sqnr_db(x, qa.dequantize()) > 38


def test_minmax_is_asymmetric_with_zero_point():
  x = np.linspace(0.0, 1.0, 256, dtype=np.float32).reshape(1, 256)
  qa = quantize(x, "int8", method="minmax")
  np.testing.assert_allclose(qa.scale, 1 / 255, rtol=1e-6)
  assert qa.zero_point.dtype == jnp.int32 and int(qa.zero_point[0, 0]) == -128
  np.testing.assert_allclose(qa.dequantize(), x, atol=1 / 510 + 1e-7)


@pytest.mark.parametrize("qtype,storage,min_db", [
    ("fp8_e4m3", ml_dtypes.float8_e4m3fn, 30.0),
    ("fp8_e5m2", ml_dtypes.float8_e5m2, 24.0),
    ("nf4", np.uint8, 19.5),
    ("int16", np.int16, 85.0),
    ("int2", np.int8, 1.0),
])
def test_other_qtypes(gaussian, qtype, storage, min_db):
  qa = quantize(gaussian, qtype, channel_axes=(1,))
  assert np.dtype(qa.qvalue.dtype) == np.dtype(storage)
  assert sqnr_db(gaussian, qa.dequantize()) >= min_db


def test_fp8_round_trip_close(gaussian):
  qa = quantize(gaussian, "fp8_e4m3")
  y = np.asarray(qa.dequantize())
  np.testing.assert_allclose(y, gaussian, rtol=2.0**-4, atol=float(qa.scale.max()) * 2.0**-9)


def test_zero_tensor_exact():
  for qtype in ("int8", "int4", "fp8_e4m3", "nf4"):
    for method in ("absmax", "minmax"):
      qa = quantize(np.zeros((3, 4), np.float32), qtype, channel_axes=(1,),
                    method=method)
      assert np.all(np.isfinite(qa.scale)) and np.all(np.asarray(qa.scale) > 0)
      np.testing.assert_array_equal(qa.dequantize(), 0.0)


def test_nbytes():
  w = np.random.default_rng(3).normal(size=(512, 512)).astype(np.float32)
  q4 = quantize(w, "int4", channel_axes=(1,))
  q8 = quantize(w, "int8", channel_axes=(1,))
  assert q4.nbytes == 512 * 512 // 2 + 512 * 4
  assert q8.nbytes == 512 * 512 + 512 * 4
  assert q4.nbytes <= 0.14 * w.nbytes
  assert q8.nbytes <= 0.26 * w.nbytes
  asym = quantize(w, "int8", channel_axes=(1,), method="minmax")
  assert asym.nbytes == 512 * 512 + 512 * 4 + 512 * 4


def test_pytree_and_jit(gaussian):
  f = jax.jit(lambda w: quantize(w, "int4", channel_axes=(1,), tile_sizes={0: 32}))
  qa = f(gaussian)
  assert isinstance(qa, QArray)
  leaves, treedef = jax.tree_util.tree_flatten(qa)
  assert len(leaves) == 2  # zero_point is None
  again = jax.tree_util.tree_unflatten(treedef, leaves)
  np.testing.assert_array_equal(again.dequantize(), qa.dequantize())
  eager = quantize(gaussian, "int4", channel_axes=(1,), tile_sizes={0: 32})
  np.testing.assert_array_equal(
      jax.jit(dequantize)(qa), eager.dequantize())
  assert qa.shape == (256, 256) and qa.dtype == np.float32
  assert "int4" in repr(qa)


def test_dtype_and_shape_of_bf16_input():
  x = jnp.ones((4, 8), jnp.bfloat16)
  qa = quantize(x, "int8")
  assert qa.dtype == jnp.bfloat16 and qa.shape == (4, 8)
  assert qa.dequantize().dtype == jnp.float32
  assert qa.dequantize(qa.dtype).dtype == jnp.bfloat16


def test_errors():
  x = np.ones((6, 10), np.float32)
  with pytest.raises(QliteError, match=r"axis 1 has length 10.*tile size 4"):
    quantize(x, "int8", tile_sizes={1: 4})
  with pytest.raises(QliteError, match="both a channel axis and a tiled axis"):
    quantize(x, "int8", channel_axes=(0,), tile_sizes={-2: 3})
  with pytest.raises(QliteError, match="out of range"):
    quantize(x, "int8", channel_axes=(2,))
  with pytest.raises(QliteError, match="range method"):
    quantize(x, "int8", method="mse")
  with pytest.raises(QTypeError):
    quantize(x, "int42")
  with pytest.raises(QliteError, match="expects a QArray"):
    dequantize(x)
