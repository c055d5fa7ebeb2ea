"""XLA PTQ backend: PtqProvider, quantize_params, orbax round trip, SRQ with
the ODML export's stats, numerics (SQNR) and parameter bytes."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

import qlite
from qlite import xla
from qlite.core import quantize
from qlite.metrics import sqnr_db
from qlite.zoo import registry


def _rules(w="int8", a=None, static=True, tile=None):
  return [qlite.QuantizationRule(module_path=".*", weight_qtype=w,
                                 act_qtype=a, act_static_scale=static,
                                 weight_tile_size=tile)]


class MLP(nn.Module):
  width: int = 512
  depth: int = 3

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = nn.relu(nn.Dense(self.width)(x))
    return nn.Dense(self.width)(x)


@pytest.fixture(scope="module")
def mlp():
  model = MLP()
  x = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
  return model, model.init(jax.random.key(0), x), x


@pytest.mark.parametrize("name", ["transformer/linen", "transformer/nnx"])
@pytest.mark.parametrize("w,a,static", [("int8", None, True),
                                        ("int8", "int8", False)])
def test_quantize_params_matches_provider(name, w, a, static):
  z = registry.get(name)
  x = z.batches[0]
  rules = _rules(w, a, static)
  qm = xla.quantize_model(z.model, xla.PtqProvider(rules), x,
                          variables=z.variables)
  params = qm.mf.params
  y_fp_params = np.asarray(qm.apply(params, x))
  abstract = xla.abstract_quantized_params(z.model, rules, x,
                                           variables=z.variables)
  qparams = xla.quantize_params(params, abstract)
  n_q = sum(isinstance(l, qlite.core.QArray) for l in
            jax.tree.leaves(qparams, is_leaf=lambda l: isinstance(
                l, qlite.core.QArray)))
  assert n_q == 14          # every Dense / DenseGeneral / Linear kernel
  np.testing.assert_array_equal(np.asarray(qm.apply(qparams, x)),
                                y_fp_params)
  # The default qlite.quantize_model path (float params) gives the same.
  base = qlite.quantize_model(z.model, xla.PtqProvider(rules), x,
                              variables=z.variables)
  y_base = base.apply(z.variables, x) if z.framework == "linen" else base(x)
  np.testing.assert_array_equal(np.asarray(y_base), y_fp_params)
  ref = np.asarray(z.apply(x))
  floor = {"int8": 33.0, "int4": 10.0}[w]
  assert sqnr_db(ref, y_fp_params) >= floor


def test_quantize_params_layer_by_layer(mlp):
  model, variables, x = mlp
  rules = _rules("int4")
  abstract = xla.abstract_quantized_params(model, rules, x,
                                           variables=variables)
  whole = xla.quantize_params(variables, abstract)
  layer = xla.quantize_params(variables["params"]["Dense_1"],
                              abstract["params"]["Dense_1"])
  np.testing.assert_array_equal(
      np.asarray(layer["kernel"].qvalue, np.int8),
      np.asarray(whole["params"]["Dense_1"]["kernel"].qvalue, np.int8))
  np.testing.assert_array_equal(layer["bias"],
                                variables["params"]["Dense_1"]["bias"])
  with pytest.raises(qlite.QliteError):
    xla.quantize_params(variables["params"]["Dense_0"],
                        abstract["params"]["Dense_1"]["bias"])


@pytest.mark.parametrize("w", ["int8", "int4"])
def test_orbax_round_trip(tmp_path, mlp, w):
  model, variables, x = mlp
  rules = _rules(w, "int8", False)
  abstract = xla.abstract_quantized_params(model, rules, x,
                                           variables=variables)
  qparams = xla.quantize_params(variables, abstract)
  xla.save_qparams(tmp_path / "ckpt", qparams)
  restored = xla.restore_qparams(tmp_path / "ckpt", abstract)
  k0 = restored["params"]["Dense_0"]["kernel"]
  assert isinstance(k0, qlite.core.QArray)
  assert np.dtype(k0.qvalue.dtype) == np.dtype(
      qlite.core.get_qtype(w).storage_dtype)
  qm = xla.quantize_model(model, xla.PtqProvider(rules), variables=variables)
  np.testing.assert_array_equal(np.asarray(qm.apply(restored, x)),
                                np.asarray(qm.apply(qparams, x)))


def test_param_bytes_on_real_pytrees(mlp, digits_trained):
  cnn, cnn_vars = digits_trained
  model, variables, x = mlp
  x_cnn = np.zeros((1, 8, 8, 1), np.float32)
  for m, v, xx in [(model, variables, x), (cnn, cnn_vars, x_cnn)]:
    fp = xla.param_bytes(v)
    for w, limit in [("int8", 0.26), ("int4", 0.14)]:
      ab = xla.abstract_quantized_params(m, _rules(w), xx, variables=v)
      ratio = xla.param_bytes(xla.quantize_params(v, ab)) / fp
      assert ratio <= limit, (type(m).__name__, w, ratio)


def test_int8_weight_only_sqnr(mlp):
  model, variables, x = mlp
  ref = np.asarray(model.apply(variables, x))
  y = xla.quantize_model(model, xla.PtqProvider(_rules("int8")),
                         variables=variables).apply(variables, x)
  assert sqnr_db(ref, y) >= 39.0
  # Single layer: the integer path equals dequantize-then-matmul to ~f32.
  w = variables["params"]["Dense_0"]["kernel"]
  qw = quantize(w, "int8", channel_axes=(1,), narrow_range=True)
  yl = xla.quantized_dot(jnp.asarray(x), qw, (((1,), (0,)), ((), ())), 1,
                         mode="weight_only")
  yd = x @ np.asarray(qw.dequantize())
  assert sqnr_db(yd, yl) >= 80.0        # two-digit activation split
  assert sqnr_db(x @ np.asarray(w), yl) >= 39.0


def test_int4_per_channel_sqnr(mlp, digits_data, digits_trained):
  # One Dense layer with Flax's default (truncated-normal) init: >= 20 dB.
  model, variables, x = mlp
  w = variables["params"]["Dense_0"]["kernel"]
  qw = quantize(w, "int4", channel_axes=(1,), narrow_range=True)
  y = xla.quantized_dot(jnp.asarray(x), qw, (((1,), (0,)), ((), ())), 1,
                        mode="weight_only")
  assert sqnr_db(x @ np.asarray(w), y) >= 20.0
  # Model output of the trained digits CNN (4 layers of gaussian-like
  # weights, absmax per channel: ~19 dB is the int4 math limit there).
  cnn, cnn_vars = digits_trained
  xd = digits_data.x_test[:64]
  ref = np.asarray(cnn.apply(cnn_vars, xd))
  yd = xla.quantize_model(cnn, xla.PtqProvider(_rules("int4")),
                          variables=cnn_vars).apply(cnn_vars, xd)
  assert sqnr_db(ref, yd) >= 18.0


def test_subchannel_int4_beats_per_channel_with_outlier_rows():
  rng = np.random.default_rng(1)
  k, n = 512, 256
  w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
  w[rng.choice(k, 8, replace=False)] *= 20.0      # outlier input rows
  x = rng.standard_normal((16, k)).astype(np.float32)
  ref = x @ w
  dn = (((1,), (0,)), ((), ()))
  per_channel = quantize(w, "int4", channel_axes=(1,), narrow_range=True)
  tiled = quantize(w, "int4", channel_axes=(1,), tile_sizes={0: 32},
                   narrow_range=True)
  s_pc = sqnr_db(ref, xla.quantized_dot(jnp.asarray(x), per_channel, dn, 1,
                                        mode="weight_only"))
  s_t = sqnr_db(ref, xla.quantized_dot(jnp.asarray(x), tiled, dn, 1,
                                       mode="weight_only"))
  assert s_t >= s_pc + 3.0, (s_pc, s_t)
  # The provider applies rule.weight_tile_size the same way.
  model = nn.Dense(n, use_bias=False)
  v = {"params": {"kernel": jnp.asarray(w)}}
  y_rule = xla.quantize_model(model, xla.PtqProvider(
      _rules("int4", tile=32)), variables=v).apply(v, x)
  assert sqnr_db(ref, y_rule) == pytest.approx(s_t, abs=0.01)


def test_srq_uses_the_odml_export_stats(digits_data, digits_trained,
                                        digits_export, int8_rules):
  """One calibration (qlite.calibrate) serves export_tflite and XLA SRQ."""
  model, variables = digits_trained
  stats, blob = digits_export          # the stats export_tflite consumed
  assert qlite.inspect_tflite(blob).full_integer
  x = digits_data.x_test[:64]
  ref = np.asarray(model.apply(variables, x))
  provider = xla.PtqProvider(int8_rules, stats)
  qm = xla.quantize_model(model, provider, x, variables=variables)
  y = np.asarray(qm.apply(variables, x))
  assert sqnr_db(ref, y) >= 30.0
  _, state = qm.traced((x,))
  srq = [op for op in state.ops.values() if op.mode == "srq"]
  assert len(srq) == 4
  for op in srq:      # every activation scale is one of the stats' records
    assert op.stats_key in stats
  # Same numerics as the ODML fake-quant model (same scales / weights).
  fq = qlite.quantize_model(model, qlite.annotate.ConversionProvider(
      int8_rules, stats), variables=variables)
  fake = np.asarray(fq.apply(variables, x))
  assert sqnr_db(fake, y) >= 30.0
  # Without stats SRQ cannot run: the error names the boundary key.
  with pytest.raises(qlite.CalibrationError, match="input0"):
    xla.quantize_model(model, xla.PtqProvider(int8_rules), x,
                       variables=variables)


@pytest.mark.parametrize("w", ["fp8_e4m3", "fp8_e5m2", "nf4", "int3"])
def test_other_qtypes(mlp, w):
  model, variables, x = mlp
  ref = np.asarray(model.apply(variables, x))
  y = xla.quantize_model(model, xla.PtqProvider(_rules(w)),
                         variables=variables).apply(variables, x)
  assert sqnr_db(ref, y) >= {"fp8_e4m3": 25, "fp8_e5m2": 18, "nf4": 13,
                             "int3": 6}[w]    # 4 layers, per-channel absmax


def test_drq_single_row_and_jit(mlp):
  model, variables, x = mlp
  qm = xla.quantize_model(model, xla.PtqProvider(_rules("int8", "int8",
                                                        False)),
                          variables=variables)
  y1 = np.asarray(qm.apply(variables, x[:1]))
  y8 = np.asarray(qm.apply(variables, x))
  # Per-row activation scales: row 0 does not depend on the other rows.
  np.testing.assert_allclose(y1[0], y8[0], rtol=1e-5, atol=1e-5)
  yj = jax.jit(qm.apply)(variables, x)
  np.testing.assert_allclose(np.asarray(yj), y8, rtol=1e-5, atol=1e-5)
  assert sqnr_db(np.asarray(model.apply(variables, x)), y8) >= 30.0
