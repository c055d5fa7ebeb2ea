"""VNNI GEMM panels packed once (issue 19): qlite.kernels.cpu.pack_u8_panels
+ int8_gemm_panels are exact, the packed weight carries them for int8
activation dots only, and a quantized dot reading them gives the same
result as the per-call packing and XLA routes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlite import xla
from qlite.core import quantize
from qlite.kernels import cpu as cpu_kernels
from qlite.xla import matmul

pytestmark = pytest.mark.skipif(
    not (cpu_kernels.available() and cpu_kernels.panels_supported()),
    reason="needs the qlite CPU kernels on an AVX-512 VNNI CPU")

DN = (((1,), (0,)), ((), ()))


def _ref(a, w, t):
  m, k = a.shape
  n = w.shape[0]
  return (a.astype(np.int64).reshape(m, 1, t, k // t)
          * w.astype(np.int64).reshape(1, n, t, k // t)).sum(-1).transpose(
              0, 2, 1)


@pytest.mark.parametrize("m,k,n,t,int4", [
    (17, 96, 70, 1, False), (40, 256, 130, 4, False), (33, 512, 100, 2, True),
    (64, 128, 64, 1, False), (1, 64, 5, 1, True), (130, 192, 129, 3, False)])
def test_gemm_on_packed_panels_is_exact(m, k, n, t, int4):
  rng = np.random.default_rng(m + k + n)
  hi = 7 if int4 else 127
  w = rng.integers(-hi - 1, hi + 1, (n, k)).astype(np.int8)
  w[0, : k // t] = -hi - 1                      # extremes: -128 x -128
  a = rng.integers(-128, 128, (m, k)).astype(np.int8)
  a[0, : k // t] = -128
  wp = cpu_kernels.pack_int4_nk(w) if int4 else jnp.asarray(w)
  panels = cpu_kernels.pack_u8_panels(wp, int4)
  assert panels.shape == ((n + 63) // 64, 64 * k)
  before = cpu_kernels.isa_counts()["gemm"]
  got = jax.jit(lambda a, p: cpu_kernels.int8_gemm_panels(a, p, n, t))(
      a, panels)
  np.testing.assert_array_equal(np.asarray(got), _ref(a, w, t))
  assert cpu_kernels.isa_counts()["gemm"] == before + 1


def test_panels_only_for_int8_activation_dots():
  rng = np.random.default_rng(1)
  qw = quantize(rng.standard_normal((256, 96)).astype(np.float32), "int8",
                channel_axes=(1,), narrow_range=True)
  with cpu_kernels.use_isa("vnni"):
    assert matmul.pack_weight(qw, DN, 2, 1).panels is None
    pw = matmul.pack_weight(qw, DN, 2, 1, act_int8=True)
  assert pw.panels is not None and pw.panels.shape == (1, 2, 64 * 256)
  with cpu_kernels.use_isa("avx2"):          # another family: no panels
    assert matmul.pack_weight(qw, DN, 2, 1, act_int8=True).panels is None
  # the pytree carries them; to_qarray is unchanged by them
  leaves, tree = jax.tree.flatten(pw)
  back = jax.tree.unflatten(tree, leaves)
  assert back.panels is not None and back.tiles == pw.tiles
  np.testing.assert_array_equal(np.asarray(back.to_qarray().qvalue),
                                np.asarray(qw.qvalue))


@pytest.mark.parametrize("mode", ["drq", "srq"])
@pytest.mark.parametrize("tile", [None, 64])
def test_quantized_dot_on_panels_matches_other_routes(mode, tile,
                                                     monkeypatch):
  # the panel route for every row count from GEMM_MIN_ROWS_INT8 (whatever
  # the measured limit is today)
  monkeypatch.setitem(cpu_kernels.KERNEL_MAX_ROWS["vnni"], ("int8", "panels"),
                      cpu_kernels.MAX_M)
  rng = np.random.default_rng(2)
  k, n, m = 256, 130, 40
  qw = quantize(rng.standard_normal((k, n)).astype(np.float32), "int8",
                channel_axes=(1,), narrow_range=True,
                tile_sizes={0: tile} if tile else None)
  x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
  kw = dict(mode=mode, act_qtype="int8",
            act_scale=(0.05, 3, "int8") if mode == "srq" else None)
  with cpu_kernels.use_isa("vnni"):
    pw = matmul.pack_weight(qw, DN, 2, 1, act_int8=True)
    assert pw.panels is not None
    before = cpu_kernels.isa_counts()["gemm"]
    y_p = np.asarray(jax.jit(lambda x, w: xla.quantized_dot(
        x, w, DN, 1, **kw))(x, pw))
    assert cpu_kernels.isa_counts()["gemm"] == before + 1  # the panel route
  with cpu_kernels.use_isa("off"):
    y_x = np.asarray(jax.jit(lambda x, w: xla.quantized_dot(
        x, w, DN, 1, **kw))(x, pw))
  y_q = np.asarray(xla.quantized_dot(x, qw, DN, 1, **kw))
  np.testing.assert_allclose(y_p, y_x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y_p, y_q, rtol=1e-5, atol=1e-5)


def test_panel_route_follows_its_limit():
  """Above the measured panel limit a DRQ dot leaves the GEMM form."""
  lim = cpu_kernels.KERNEL_MAX_ROWS["vnni"][("int8", "panels")]
  rng = np.random.default_rng(3)
  k, n = 128, 64
  qw = quantize(rng.standard_normal((k, n)).astype(np.float32), "int8",
                channel_axes=(1,), narrow_range=True)
  with cpu_kernels.use_isa("vnni"):
    pw = matmul.pack_weight(qw, DN, 2, 1, act_int8=True)
    for m, want in ((cpu_kernels.GEMM_MIN_ROWS_INT8, 1), (lim + 1, 0)):
      if m < cpu_kernels.GEMM_MIN_ROWS_INT8 or (want and m > lim):
        continue
      x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
      before = cpu_kernels.isa_counts()["gemm"]
      jax.block_until_ready(jax.jit(lambda x, w: xla.quantized_dot(
          x, w, DN, 1, mode="drq", act_qtype="int8"))(x, pw))
      assert cpu_kernels.isa_counts()["gemm"] - before == want, (m, lim)
