"""The provider's packed weight layout ([N, K], int4 two a byte) gives the
same results as the QArray it came from, with and without the compiled CPU
kernels, and round-trips back to the QArray."""

import numpy as np
import jax.numpy as jnp
import pytest

from qlite import xla
from qlite.core import quantize
from qlite.kernels import cpu as cpu_kernels
from qlite.xla import matmul

DN = (((1,), (0,)), ((), ()))


@pytest.mark.parametrize("w", ["int8", "int4"])
@pytest.mark.parametrize("tile", [None, 64])
@pytest.mark.parametrize("mode", ["weight_only", "drq", "srq"])
@pytest.mark.parametrize("m", [1, 3, 40])
def test_packed_matches_qarray(w, tile, mode, m):
  rng = np.random.default_rng(0)
  k, n = 256, 96
  wf = rng.standard_normal((k, n)).astype(np.float32)
  x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
  qw = quantize(wf, w, channel_axes=(1,), narrow_range=True,
                tile_sizes={0: tile} if tile else None)
  pw = matmul.pack_weight(qw, DN, 2, 1)
  assert isinstance(pw, matmul.PackedWeight)
  back = pw.to_qarray()
  np.testing.assert_array_equal(np.asarray(back.qvalue, np.int8),
                                np.asarray(qw.qvalue, np.int8))
  np.testing.assert_array_equal(np.asarray(back.scale), np.asarray(qw.scale))
  kw = dict(mode=mode, act_qtype=None if mode == "weight_only" else "int8",
            act_scale=(0.05, 3, "int8") if mode == "srq" else None)
  y_q = np.asarray(xla.quantized_dot(x, qw, DN, 1, **kw))
  y_p = np.asarray(xla.quantized_dot(x, pw, DN, 1, **kw))
  max_m = cpu_kernels.MAX_M
  try:                                  # the XLA fallback of the packed form
    cpu_kernels.MAX_M = 0
    y_x = np.asarray(xla.quantized_dot(x, pw, DN, 1, **kw))
  finally:
    cpu_kernels.MAX_M = max_m
  if mode == "weight_only":
    # The kernel route quantizes the activation to int16, XLA's to two int8
    # digits: both are the float product with the dequantized weight to
    # within ~1e-4 of its scale (the weight's own error is ~1e-2).
    ref = np.asarray(x) @ np.asarray(qw.dequantize(jnp.float32))
    tol = 2e-4 * np.abs(ref).max()
    for y in (y_q, y_p, y_x):
      np.testing.assert_allclose(y, ref, rtol=0, atol=tol)
    return
  # Integer accumulation is exact on every path; the float epilogue may
  # fuse differently.
  np.testing.assert_allclose(y_p, y_q, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y_x, y_q, rtol=1e-5, atol=1e-5)


def test_int4_not_packable_stays_qarray():
  wf = np.random.default_rng(1).standard_normal((96, 32)).astype(np.float32)
  qw = quantize(wf, "int4", channel_axes=(1,), narrow_range=True)
  assert matmul.pack_weight(qw, DN, 2, 1) is qw          # K=96: not x64
  qf = quantize(wf, "fp8_e4m3", channel_axes=(1,))
  assert matmul.pack_weight(qf, DN, 2, 1) is qf          # dequant path
