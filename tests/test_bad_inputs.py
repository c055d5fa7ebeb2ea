"""Every bad input gets a named qlite error (type + culprit in the message),
and nothing half-written is left behind."""

import os
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlite
import qlite.metrics


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(nn.relu(nn.Dense(8)(x)))


class Tanh(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(jnp.tanh(nn.Dense(8)(x)))


class Scaled(nn.Module):
  factor: object = 2.0

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(x) * self.factor


class Embed(nn.Module):
  @nn.compact
  def __call__(self, ids):
    return nn.Dense(4)(nn.Embed(10, 8)(ids))


X = np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 6)
R = [qlite.QuantizationRule()]


@pytest.fixture(scope="module")
def mlp():
  m = MLP()
  v = m.init(jax.random.key(0), X)
  stats = qlite.calibrate(m, R, [X, X * 0.5], variables=v, progress=False)
  blob = qlite.export_tflite(m, R, stats, X, variables=v)
  return m, v, stats, blob


def test_unknown_qtype_string():
  with pytest.raises(qlite.QTypeError, match="'int9'.*int8"):
    qlite.QuantizationRule(weight_qtype="int9")


def test_qtype_litert_cannot_run(mlp):
  m, v, stats, _ = mlp
  rules = [qlite.QuantizationRule(act_qtype="fp8_e4m3")]
  with pytest.raises(qlite.QTypeError, match=r"rules\[0\].*fp8_e4m3.*int8"):
    qlite.export_tflite(m, rules, stats, X, variables=v)


def test_rule_regex_does_not_compile():
  with pytest.raises(qlite.RuleError, match=r"'\(\('.*does not compile"):
    qlite.QuantizationRule(module_path="((")


def test_rule_unknown_calibration_method():
  with pytest.raises(qlite.RuleError, match="'avg'.*minmax"):
    qlite.QuantizationRule(act_calibration_method="avg")


def test_rule_fixed_method_needs_range():
  with pytest.raises(qlite.RuleError, match="act_fixed_range"):
    qlite.QuantizationRule(act_calibration_method="fixed")


def test_rules_that_match_nothing_warn_and_are_listed(mlp):
  m, v, _, _ = mlp
  rules = [qlite.QuantizationRule(module_path="Nope.*"), *R]
  provider = qlite.annotate.CalibrationProvider(rules)
  qm = qlite.quantize_model(m, provider, X, variables=v)
  qm.apply(v, X)
  assert [i for i, _ in provider.unmatched_rules()] == [0]
  with pytest.warns(UserWarning, match=r"rules\[0\].*'Nope\.\*'.*matched no op"):
    qlite.calibrate(m, rules, [X], variables=v, progress=False)


def test_export_without_stats_for_a_layer_names_it(mlp):
  m, v, stats, _ = mlp
  partial = qlite.QuantStats({k: stats[k] for k in stats.keys()
                              if k != "Dense_1/dot_general"}, dict(stats.meta))
  with pytest.raises(qlite.CalibrationError,
                     match=r"`Dense_1/dot_general`.*module `Dense_1`"):
    qlite.export_tflite(m, R, partial, X, variables=v)


def test_stats_from_a_different_model(mlp):
  _, _, stats, _ = mlp
  other = Tanh()
  vo = other.init(jax.random.key(0), X)
  with pytest.raises(qlite.CalibrationError, match="linen:MLP.*linen:Tanh"):
    qlite.export_tflite(other, R, stats, X, variables=vo)


def test_empty_calibration_iterable(mlp):
  m, v, _, _ = mlp
  with pytest.raises(qlite.CalibrationError, match="empty"):
    qlite.calibrate(m, R, [], variables=v, progress=False)
  with pytest.raises(qlite.CalibrationError, match="empty"):
    qlite.calibrate(m, R, iter(()), variables=v, progress=False)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_in_calibration_data(mlp, bad):
  m, v, _, _ = mlp
  x = X.copy()
  x[1, 2] = bad
  with pytest.raises(qlite.CalibrationError, match="batch 1.*NaN or Inf"):
    qlite.calibrate(m, R, [X, x], variables=v, progress=False)


def test_batches_with_differing_shapes(mlp):
  m, v, _, _ = mlp
  with pytest.raises(qlite.CalibrationError,
                     match=r"batch 1.*\(3, 6\).*\(2, 6\)"):
    qlite.calibrate(m, R, [X, np.ones((3, 6), np.float32)], variables=v,
                    progress=False)


def test_batch_shape_incompatible_with_params_names_the_param(mlp):
  m, v, _, _ = mlp
  with pytest.raises(qlite.QliteError, match=r"kernel.*Dense_1"):
    qlite.calibrate(m, R, [np.ones((2, 7), np.float32)], variables=v,
                    progress=False)


def test_dynamic_batch_dimension(mlp):
  m, v, stats, _ = mlp
  spec = jax.ShapeDtypeStruct((None, 6), jnp.float32)
  with pytest.raises(qlite.QliteError, match=r"dynamic shape \(None, 6\)"):
    qlite.export_tflite(m, R, stats, spec, variables=v)


def test_model_closing_over_a_non_array_object():
  m = Scaled(factor="abc")
  v = Scaled().init(jax.random.key(0), X)
  with pytest.raises(qlite.QliteError, match="tracing linen:Scaled"):
    qlite.calibrate(m, R, [X], variables=v, progress=False)


def test_output_path_in_missing_directory(mlp, tmp_path):
  m, v, stats, _ = mlp
  target = tmp_path / "missing" / "m.tflite"
  with pytest.raises(qlite.QliteError, match="does not exist"):
    qlite.export_tflite(m, R, stats, X, variables=v, path=target)
  assert list(tmp_path.iterdir()) == []


def test_output_path_is_a_directory(mlp, tmp_path):
  m, v, stats, _ = mlp
  (tmp_path / "out").mkdir()
  with pytest.raises(qlite.QliteError, match="cannot write"):
    qlite.export_tflite(m, R, stats, X, variables=v, path=tmp_path / "out")
  assert [p.name for p in tmp_path.iterdir()] == ["out"]
  assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_output_path_not_writable(mlp, tmp_path):
  m, v, stats, _ = mlp
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o500)
  with pytest.raises(qlite.QliteError, match="cannot write"):
    qlite.export_tflite(m, R, stats, X, variables=v, path=ro / "m.tflite")
  assert list(ro.iterdir()) == []


def test_no_partial_file_when_conversion_fails(tmp_path):
  class Sine(nn.Module):
    @nn.compact
    def __call__(self, x):
      return jnp.sin(nn.Dense(4)(x))
  m = Sine()
  v = m.init(jax.random.key(0), X)
  stats = qlite.calibrate(m, R, [X], variables=v, progress=False)
  out = tmp_path / "m.tflite"
  with pytest.raises(qlite.UnsupportedOpError, match="SIN"):
    qlite.export_tflite(m, R, stats, X, variables=v, path=out)
  assert list(tmp_path.iterdir()) == []


def test_inspect_garbage_bytes():
  with pytest.raises(qlite.TFLiteFormatError, match="TFL3"):
    qlite.inspect_tflite(b"this is not a flatbuffer" * 4)


def test_inspect_truncated_file(mlp, tmp_path):
  _, _, _, blob = mlp
  p = tmp_path / "cut.tflite"
  p.write_bytes(blob[: len(blob) // 2])
  with pytest.raises(qlite.TFLiteFormatError, match="truncated"):
    qlite.inspect_tflite(p)


def test_inspect_missing_path(tmp_path):
  with pytest.raises(qlite.TFLiteFormatError, match="no such file"):
    qlite.inspect_tflite(tmp_path / "nope.tflite")


def test_runner_with_tflite_from_another_model_names_shape(mlp):
  _, _, _, blob = mlp
  runner = qlite.TFLiteRunner(blob)
  with pytest.raises(qlite.QliteError, match=r"\(2, 6\).*\(2, 9\)"):
    runner.run(np.ones((2, 9), np.float32))


def test_corrupted_stats_file(tmp_path):
  p = tmp_path / "stats.npz"
  p.write_bytes(b"PK\x03\x04 definitely not a zip")
  with pytest.raises(qlite.CalibrationError, match="stats.npz"):
    qlite.QuantStats.load(p)


def test_int8_io_with_an_integer_input_model():
  m = Embed()
  ids = np.array([[1, 2, 3]], np.int32)
  v = m.init(jax.random.key(0), ids)
  stats = qlite.calibrate(m, R, [ids], variables=v, progress=False)
  with pytest.raises(qlite.QliteError, match="io_dtype='int8'.*int32"):
    qlite.export_tflite(m, R, stats, ids, variables=v, io_dtype="int8")


def test_bad_io_dtype(mlp):
  m, v, stats, _ = mlp
  with pytest.raises(qlite.QliteError, match="io_dtype.*'uint4'"):
    qlite.export_tflite(m, R, stats, X, variables=v, io_dtype="uint4")


def test_constant_zero_activation_does_not_divide_by_zero():
  class Zero(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4)(x * 0.0)
  m = Zero()
  v = m.init(jax.random.key(0), X)
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)
    stats = qlite.calibrate(m, R, [X], variables=v, progress=False)
    blob = qlite.export_tflite(m, R, stats, X, variables=v)
  info = qlite.inspect_tflite(blob)
  assert info.full_integer
  assert all(np.all(np.isfinite(t.scale)) and np.all(t.scale > 0)
             for t in info.tensors if t.scale is not None)
  out = qlite.TFLiteRunner(blob).run(X)[0]
  np.testing.assert_allclose(out, np.asarray(m.apply(v, X)), atol=0.02)


def test_extremely_large_activation_range():
  class Big(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4)(x * 1e6)
  m = Big()
  v = m.init(jax.random.key(0), X)
  stats = qlite.calibrate(m, R, [X], variables=v, progress=False)
  blob = qlite.export_tflite(m, R, stats, X, variables=v)
  ref = np.asarray(m.apply(v, X))
  out = qlite.TFLiteRunner(blob).run(X)[0]
  assert qlite.metrics.sqnr_db(ref, out) > 25.0


def test_not_a_flax_model():
  with pytest.raises(qlite.QliteError, match="flax.linen.Module"):
    qlite.calibrate(lambda x: x, R, [X])


def test_linen_model_without_variables():
  with pytest.raises(qlite.QliteError, match="pass variables"):
    qlite.calibrate(MLP(), R, [X], progress=False)


def test_rules_must_be_quantization_rules(mlp):
  m, v, _, _ = mlp
  with pytest.raises(qlite.RuleError, match=r"rules\[0\] is a dict"):
    qlite.calibrate(m, [{"module_path": ".*"}], [X], variables=v)


def test_every_error_is_a_value_error():
  for cls in (qlite.QTypeError, qlite.RuleError, qlite.CalibrationError,
              qlite.ConversionError, qlite.UnsupportedOpError,
              qlite.TFLiteFormatError):
    assert issubclass(cls, qlite.QliteError)
    assert issubclass(cls, ValueError)


def test_dead_relu_and_uniform_bias_convert_exactly():
  # Found by the fuzzer (seed 93): an all-zero activation got a 1e-8 scale,
  # the next layer's int32 bias (bias / (1e-8 * w_scale)) overflowed and
  # LiteRT's output was 74 LSB off. Reducing it showed a converter bug too:
  # a uniform nonzero bias is quantized with channel 0's scale only.
  class Dead(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Dense(3, bias_init=nn.initializers.constant(-100.0))(x))
      return nn.Dense(4, bias_init=nn.initializers.constant(0.5))(h)
  m = Dead()
  v = m.init(jax.random.key(0), X)
  stats = qlite.calibrate(m, R, [X], variables=v, progress=False)
  blob = qlite.export_tflite(m, R, stats, X, variables=v)
  out = qlite.TFLiteRunner(blob).run(X)[0]
  np.testing.assert_allclose(out, np.asarray(m.apply(v, X)), atol=0.01)


def test_single_element_weight_channels_are_not_treated_as_zero():
  # Found by the fuzzer (seed 27): Dense(1 -> 5) has one weight per output
  # channel (min == max); it must keep its exact per-channel scale.
  class OneIn(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(5)(jnp.mean(x, axis=1, keepdims=True))
  m = OneIn()
  v = m.init(jax.random.key(1), X)
  stats = qlite.calibrate(m, R, [X, -X], variables=v, progress=False)
  blob = qlite.export_tflite(m, R, stats, X, variables=v)
  ref = np.asarray(m.apply(v, X))
  out = qlite.TFLiteRunner(blob).run(X)[0]
  assert qlite.metrics.sqnr_db(ref, out) > 35.0
