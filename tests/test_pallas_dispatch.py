"""PtqProvider's Pallas dispatch (qlite/xla/pallas.py), exercised on CPU in
Pallas interpret mode (QLITE_PALLAS=interpret): every eligible dot runs the
kernel, and its outputs equal the XLA path's within float rounding."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

import qlite
from qlite import xla
from qlite.core import quantize
from qlite.errors import QliteError
from qlite.kernels import matmul as kmm
from qlite.xla import matmul as xmm
from qlite.xla import pallas as pallas_lib


class MLP(nn.Module):
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(256, dtype=self.dtype)(x))
    return nn.Dense(128, dtype=self.dtype)(x)


@pytest.fixture(scope="module")
def mlp():
  model = MLP()
  x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
  return model, model.init(jax.random.key(0), x), x


def _rules(w="int8", a=None, static=True, tile=None):
  return [qlite.QuantizationRule(module_path=".*", weight_qtype=w,
                                 act_qtype=a, act_static_scale=static,
                                 weight_tile_size=tile)]


def _run(model, variables, x, rules, stats=None):
  """Outputs and the number of weights prepared for Pallas."""
  qm = xla.quantize_model(model, xla.PtqProvider(rules, stats),
                          variables=variables)
  graph, state = qm.traced((x,))
  flat = qm.provider.prepare_flat_params(
      graph, state, jax.tree.leaves(variables))
  n = sum(isinstance(p, pallas_lib.PallasWeight) for p in flat)
  return np.asarray(qm.apply(variables, x), np.float32), n


def _xla_reference(monkeypatch, *args):
  """The XLA path (QLITE_PALLAS=off; XLA's own int8 dot, not the CPU
  kernel, whose int16 weight-only activations round differently)."""
  with monkeypatch.context() as mp:
    mp.setenv("QLITE_PALLAS", "off")
    mp.setattr(xmm, "_kernel_ok", lambda *a: False)
    return _run(*args)


CASES = {   # name: rules kwargs
    "w8 weight-only": dict(w="int8"),
    "w4 weight-only tiles 256": dict(w="int4", tile=256),
    "w8a8 drq": dict(w="int8", a="int8", static=False),
    "w8a8 drq tiles 128": dict(w="int8", a="int8", static=False, tile=128),
    "w4a8 drq": dict(w="int4", a="int8", static=False),
    "w8a8 srq": dict(w="int8", a="int8", static=True),
}


SLOW_CASES = {"w4 weight-only tiles 256"}


@pytest.mark.parametrize("case", [
    pytest.param(k, marks=pytest.mark.slow) if k in SLOW_CASES else k
    for k in CASES])
def test_interpret_equals_xla_path(monkeypatch, mlp, case):
  model, variables, x = mlp
  kw = CASES[case]
  rules = _rules(**kw)
  stats = None
  if kw.get("static") and kw.get("a"):
    stats = qlite.calibrate(model, rules, [x, 0.5 * x], variables=variables,
                            progress=False)
  ref, n_ref = _xla_reference(monkeypatch, model, variables, x, rules, stats)
  monkeypatch.setenv("QLITE_PALLAS", "interpret")
  got, n = _run(model, variables, x, rules, stats)
  assert n_ref == 0
  assert n == 2                          # every Dense ran on the kernel
  scale = np.abs(ref).max()
  assert scale > 0.1
  if kw.get("a") and not kw.get("tile"):
    # int8 activations: the same int32 sums and float rescale, bit-exact
    np.testing.assert_array_equal(got, ref)
  elif kw.get("a"):        # per-tile float sums in another order
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * scale)
  else:
    # float activations as two int8 digits (~16 bits): the kernel and XLA
    # compute the same digits up to XLA's fusion of the residual (a last
    # digit off by one), 1e-4 of the output's range; int8 weight rounding
    # alone is ~1e-2.
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("wq", [pytest.param("int8", marks=pytest.mark.slow),
                                "int4"])
def test_bf16_activations_use_the_in_kernel_dequant(monkeypatch, wq):
  """bf16 / f16 activations run the weight-only kernel (the weight
  dequantized per block to bf16, exact for int8 / int4 values; float32
  accumulation); it equals its XLA twin and the XLA path."""
  monkeypatch.setenv("QLITE_PALLAS", "interpret")
  rng = np.random.default_rng(4)
  dn = (((1,), (0,)), ((), ()))
  w = rng.standard_normal((512, 256)).astype(np.float32)
  x = jnp.asarray(rng.standard_normal((8, 512)), jnp.bfloat16)
  qw = quantize(w, wq, channel_axes=(1,), narrow_range=True)
  p = pallas_lib.plan(qw, dn, x.shape, x.dtype, 1, "weight_only", None)
  assert (p.kernel, p.packed) == ("weight_only", wq == "int4")
  pw = pallas_lib.pack(qw, dn, 2, 1, p)
  got = jax.jit(lambda x: pallas_lib.quantized_dot(
      x, pw, dn, 1, mode="weight_only", out_dtype=jnp.float32))(x)
  twin = kmm.weight_only_matmul_xla(x, pw.data, pw.wscale, packed=p.packed,
                                    group=p.block_k)
  scale = float(np.abs(np.asarray(twin)).max())
  np.testing.assert_allclose(np.asarray(got), np.asarray(twin), rtol=0,
                             atol=1e-6 * scale)
  # the XLA path (two int8 digits of the bf16 activation): ~16 bits
  ref = xmm.quantized_dot(x, qw, dn, 1, mode="weight_only",
                          out_dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0,
                             atol=1e-4 * scale)


def test_two_contracting_dims_merge_into_k(monkeypatch):
  """An attention output projection: x [B, L, H, Dh] . w [H, Dh, D]."""
  monkeypatch.setenv("QLITE_PALLAS", "interpret")
  rng = np.random.default_rng(6)
  w = rng.standard_normal((2, 128, 256)).astype(np.float32)
  x = rng.standard_normal((2, 3, 2, 128)).astype(np.float32)
  dn = (((2, 3), (0, 1)), ((), ()))
  qw = quantize(w, "int4", channel_axes=(2,), narrow_range=True)
  p = pallas_lib.plan(qw, dn, x.shape, x.dtype, 1, "drq", "int8")
  assert p is not None and p.packed
  pw = pallas_lib.pack(qw, dn, x.ndim, 1, p)
  assert pw.data.shape == (128, 256)             # K = 2 * 128, packed
  np.testing.assert_array_equal(
      np.asarray(pw.to_qarray().qvalue).astype(np.int8),
      np.asarray(qw.qvalue).astype(np.int8))
  got = pallas_lib.quantized_dot(jnp.asarray(x), pw, dn, 1, mode="drq",
                                 act_qtype="int8")
  ref = xmm.quantized_dot(jnp.asarray(x), qw, dn, 1, mode="drq",
                          act_qtype="int8")
  assert got.shape == (2, 3, 256)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


@pytest.mark.parametrize("mode", [
    pytest.param("weight_only", marks=pytest.mark.slow), "drq"])
def test_weight_first_dot_with_free_activation_dims(monkeypatch, mode):
  """weight_operand=0 and an activation with two free dims: the canonical
  [M, K] x [K, N] form and the output layout are restored."""
  monkeypatch.setenv("QLITE_PALLAS", "interpret")
  rng = np.random.default_rng(1)
  w = rng.standard_normal((128, 256)).astype(np.float32)      # [N, K]
  x = rng.standard_normal((3, 5, 256)).astype(np.float32)     # [.., .., K]
  dn = (((1,), (2,)), ((), ()))          # contract w's 1 with x's 2
  qw = quantize(w, "int8", channel_axes=(0,), narrow_range=True)
  act = "int8" if mode == "drq" else None
  p = pallas_lib.plan(qw, dn, x.shape, x.dtype, 0, mode, act)
  assert p is not None and p.kernel == "w8a8" and not p.packed
  pw = pallas_lib.pack(qw, dn, x.ndim, 0, p)
  np.testing.assert_array_equal(np.asarray(pw.to_qarray().qvalue),
                                np.asarray(qw.qvalue))
  got = jax.jit(lambda x: pallas_lib.quantized_dot(
      x, pw, dn, 0, mode=mode, act_qtype=act))(x)
  ref = xmm.quantized_dot(jnp.asarray(x), qw, dn, 0, mode=mode,
                          act_qtype=act)
  assert got.shape == ref.shape == (128, 3, 5)
  if mode == "drq":
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  else:                                  # two int8 digits: see above
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0,
                               atol=1e-4 * float(np.abs(ref).max()))


def test_int4_pack_round_trip_and_ineligible_shapes(monkeypatch):
  monkeypatch.setenv("QLITE_PALLAS", "interpret")
  rng = np.random.default_rng(2)
  dn = (((1,), (0,)), ((), ()))
  w = rng.standard_normal((512, 256)).astype(np.float32)
  qw = quantize(w, "int4", channel_axes=(1,), tile_sizes={0: 256},
                narrow_range=True)
  p = pallas_lib.plan(qw, dn, (4, 512), np.float32, 1, "weight_only", None)
  assert (p.block_k, p.packed, p.kernel) == (256, True, "w8a8")
  pw = pallas_lib.pack(qw, dn, 2, 1, p)
  assert pw.data.shape == (256, 256) and pw.wscale.shape == (2, 256)
  back = pw.to_qarray()
  np.testing.assert_array_equal(np.asarray(back.qvalue).astype(np.int8),
                                np.asarray(qw.qvalue).astype(np.int8))
  np.testing.assert_array_equal(np.asarray(back.scale), np.asarray(qw.scale))
  # N not a multiple of 128, K tile not a power of two, dot batch dims,
  # asymmetric weights, fp8: XLA.
  for shape, kw in [((512, 96), {}), ((384, 256), {"tile_sizes": {0: 192}})]:
    q = quantize(rng.standard_normal(shape).astype(np.float32), "int8",
                 channel_axes=(1,), narrow_range=True, **kw)
    assert pallas_lib.plan(q, dn, (4, shape[0]), np.float32, 1, "drq",
                           "int8") is None
  qb = quantize(rng.standard_normal((2, 256, 128)).astype(np.float32),
                "int8", channel_axes=(0, 2), narrow_range=True)
  assert pallas_lib.plan(qb, (((2,), (1,)), ((0,), (0,))), (2, 4, 256),
                         np.float32, 1, "drq", "int8") is None
  qa = quantize(w, "int8", channel_axes=(1,), method="minmax")
  assert pallas_lib.plan(qa, dn, (4, 512), np.float32, 1, "weight_only",
                         None) is None
  qf = quantize(w, "float8_e4m3fn", channel_axes=(1,))
  assert pallas_lib.plan(qf, dn, (4, 512), np.float32, 1, "weight_only",
                         None) is None


def test_switch_and_auto_thresholds(monkeypatch):
  dn = (((1,), (0,)), ((), ()))
  w = np.random.default_rng(3).standard_normal((1024, 1024)).astype(
      np.float32)
  qw = quantize(w, "int8", channel_axes=(1,), narrow_range=True)

  def plan(m):
    return pallas_lib.plan(qw, dn, (m, 1024), np.float32, 1, "drq", "int8")

  monkeypatch.setenv("QLITE_PALLAS", "bogus")
  with pytest.raises(QliteError, match="QLITE_PALLAS='bogus'.*auto"):
    plan(8)
  monkeypatch.setenv("QLITE_PALLAS", "off")
  assert plan(8) is None
  monkeypatch.setenv("QLITE_PALLAS", "auto")
  if jax.default_backend() == "cpu":
    assert plan(8) is None and kmm.dispatch() == "xla"
  # auto on a GPU (faked here): the kernel for small M and big weights only
  monkeypatch.setattr(pallas_lib.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(pallas_lib, "probe", lambda *a: True)
  p = plan(8)
  assert p is not None and not p.interpret and p.block_m == 16
  assert plan(pallas_lib.THRESHOLDS["gpu"]["max_m"] + 1) is None
  monkeypatch.setenv("QLITE_PALLAS_MAX_M", "4096")
  assert plan(1000).block_m == 64
  monkeypatch.setenv("QLITE_PALLAS_MIN_WEIGHT", str(2 << 20))
  assert plan(8) is None
  monkeypatch.setenv("QLITE_PALLAS", "interpret")   # ignores thresholds
  assert plan(1000).interpret


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower_for_gpu_and_tpu(platform):
  """No accelerator here: lower every kernel form the provider uses for
  CUDA (Triton: power-of-two loads, int8 dots, shifts) and TPU (Mosaic)
  with jax.export, which runs the Pallas lowering rules of that backend."""
  pl_name = "gpu" if platform == "cuda" else "tpu"
  s = jax.ShapeDtypeStruct
  k, n = 1024, 256
  cases = []
  for m, packed, tiles, zp in [(1, False, 1, False), (16, True, 1, False),
                               (64, False, 4, True), (40, True, 4, False)]:
    tile = k // tiles if tiles > 1 else None
    bm, bn, bk = kmm.gpu_blocks(m, k, n, tile=tile, packed=packed,
                                min_block_m=16 if pl_name == "gpu" else 32)
    kw = dict(block_m=bm, block_n=bn, block_k=bk, impl="pallas",
              packed=packed, platform=pl_name)
    w = s((k // 2 if packed else k, n), jnp.int8)
    args = [s((m, k), jnp.int8), w, s((m, 1), jnp.float32),
            s((tiles, n), jnp.float32)]
    if zp:
      args.append(s((tiles, n), jnp.int32))
    cases.append((lambda *a, kw=kw: kmm.w8a8_matmul(*a, **kw), args))
    cases.append((lambda *a, kw=kw: kmm.weight_only_matmul(*a, **kw),
                  [s((m, k), jnp.bfloat16), w, s((tiles, n), jnp.float32)]))
  for f, args in cases:
    exp = jax.export.export(
        jax.jit(f), platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(
            "__gpu$xla.gpu.triton")])(*args)
    text = exp.mlir_module()
    assert ("xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") \
        in text


def test_auto_probes_each_kernel_once_and_falls_back(monkeypatch):
  """On a device, auto compiles and checks each kernel configuration once
  against XLA before using it; a failure (here: no GPU to compile for, then
  a kernel that is off by one) keeps the dot on XLA with a warning."""
  dn = (((1,), (0,)), ((), ()))
  w = np.random.default_rng(5).standard_normal((1024, 1024)).astype(
      np.float32)
  qw = quantize(w, "int8", channel_axes=(1,), narrow_range=True)
  monkeypatch.setenv("QLITE_PALLAS", "auto")
  monkeypatch.setattr(pallas_lib.jax, "default_backend", lambda: "gpu")

  def plan():
    return pallas_lib.plan(qw, dn, (8, 1024), np.float32, 1, "drq", "int8")

  pallas_lib.probe.cache_clear()
  with pytest.warns(RuntimeWarning, match=r"Pallas w8a8 kernel \(M=8, "
                    r"K=1024, N=1024, int8 weights\) failed its check on "
                    r"gpu: .*those dots run on XLA"):
    assert plan() is None          # pallas_call cannot compile for CPU
  real = kmm.w8a8_matmul

  def kernel(*a, impl, **kw):      # "compiles": runs in interpret mode
    y = real(*a, impl="interpret" if impl == "pallas" else impl, **kw)
    return y + (1.0 if impl == "pallas" and off_by_one else 0.0)

  monkeypatch.setattr(kmm, "w8a8_matmul", kernel)
  pallas_lib.probe.cache_clear()
  off_by_one = True
  with pytest.warns(RuntimeWarning, match=r"differs from XLA by .* of the "
                    r"range"):
    assert plan() is None
  pallas_lib.probe.cache_clear()
  off_by_one = False
  p = plan()
  assert p is not None and not p.interpret and pallas_lib.probe.cache_info(
      ).misses == 1
  assert plan() == p and pallas_lib.probe.cache_info().hits == 1
  pallas_lib.probe.cache_clear()
