"""Pallas kernels in interpret mode (CPU) against their XLA twins."""

import numpy as np
import jax.numpy as jnp
import ml_dtypes
import pytest

from qlite import kernels


def _data(m, k, n, seed=0, wbits=8):
  rng = np.random.default_rng(seed)
  hi = 127 if wbits == 8 else 7
  xq = rng.integers(-127, 128, (m, k)).astype(np.int8)
  wq = rng.integers(-hi, hi + 1, (k, n)).astype(np.int8)
  xs = rng.uniform(0.01, 0.1, (m, 1)).astype(np.float32)
  ws = rng.uniform(0.01, 0.1, (1, n)).astype(np.float32)
  return xq, wq, xs, ws


@pytest.mark.parametrize("m,k,n", [(2, 512, 256), (64, 256, 384), (8, 96, 40)])
def test_w8a8_bit_exact(m, k, n):
  xq, wq, xs, ws = _data(m, k, n)
  ref = kernels.w8a8_matmul(xq, wq, xs, ws, impl="xla")
  got = kernels.w8a8_matmul(xq, wq, xs, ws, impl="interpret", block_m=32,
                            block_n=128, block_k=128)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  # Integer accumulation itself is exact: unit scales give int32 sums.
  one_m, one_n = np.ones((m, 1), np.float32), np.ones((1, n), np.float32)
  acc = kernels.w8a8_matmul(xq, wq, one_m, one_n, impl="interpret",
                            block_m=32, block_n=128, block_k=64)
  np.testing.assert_array_equal(
      np.asarray(acc), (xq.astype(np.int64) @ wq.astype(np.int64)))


@pytest.mark.parametrize("wdtype", ["int8", "int4"])
@pytest.mark.parametrize("tiles", [1, 4])
def test_weight_only_matches_xla(wdtype, tiles):
  m, k, n = 4, 512, 256
  _, wq, _, _ = _data(m, k, n, seed=1, wbits=8 if wdtype == "int8" else 4)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((m, k)).astype(np.float32)
  ws = rng.uniform(0.01, 0.1, (tiles, n)).astype(np.float32)
  w = jnp.asarray(wq).astype(jnp.int4) if wdtype == "int4" else \
      jnp.asarray(wq)
  ref = kernels.weight_only_matmul(x, w, ws, impl="xla")
  got = kernels.weight_only_matmul(x, w, ws, impl="interpret", block_n=128)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5,
                             atol=2e-5)
  deq = (wq.astype(np.float32).reshape(tiles, k // tiles, n)
         * ws[:, None, :]).reshape(k, n)
  np.testing.assert_allclose(np.asarray(got), x @ deq, rtol=1e-4, atol=1e-4)


def test_dispatch_on_cpu_is_xla():
  assert kernels.dispatch() in ("xla", "pallas")
  import jax
  if jax.default_backend() == "cpu":
    assert kernels.dispatch() == "xla"
  with pytest.raises(ValueError):
    kernels.dispatch("cuda")
