"""Stats that fit the model (issue 16): calibration records the parameter
layout and a digest of the weights; exporting another model or changed
weights with them is an error; degenerate calibrated ranges are named."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qlite

RULES = [qlite.QuantizationRule()]


class MLP(nn.Module):
  width: int = 8

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(nn.relu(nn.Dense(self.width)(x)))


def _batches(scale=1.0, n=3, shape=(4, 12)):
  rng = np.random.default_rng(0)
  return [(rng.normal(size=shape) * scale).astype(np.float32)
          for _ in range(n)]


@pytest.fixture(scope="module")
def calibrated():
  bs = _batches()
  m = MLP(8)
  v = m.init(jax.random.key(0), bs[0])
  return m, v, bs, qlite.calibrate(m, RULES, bs, variables=v, progress=False)


def test_stats_record_the_parameter_layout(calibrated):
  _, _, _, stats = calibrated
  assert stats.meta["params"]["params/Dense_1/kernel"] == [[12, 8], "float32"]
  assert len(stats.meta["params_sha1"]) == 40


def test_resized_layer_with_the_same_class_name_is_refused(calibrated):
  _, _, bs, stats = calibrated
  m = MLP(32)
  v = m.init(jax.random.key(0), bs[0])
  with pytest.raises(qlite.CalibrationError,
                     match=r"`params/Dense_1/kernel` is \(12, 32\) float32, "
                     r"calibrated with \(12, 8\)"):
    qlite.export_tflite(m, RULES, stats, bs[0][:1], variables=v)


def test_changed_weights_are_refused_unless_allowed(calibrated):
  m, v, bs, stats = calibrated
  v2 = jax.tree.map(lambda a: a * 1.1, v)
  with pytest.raises(qlite.CalibrationError, match="allow_changed_weights"):
    qlite.export_tflite(m, RULES, stats, bs[0][:1], variables=v2)
  blob = qlite.export_tflite(m, RULES, stats, bs[0][:1], variables=v2,
                             allow_changed_weights=True)
  assert qlite.inspect_tflite(blob).full_integer


def test_stats_survive_save_and_load_with_samples(calibrated, tmp_path):
  m, v, bs, stats = calibrated
  stats.save(tmp_path / "s.npz")
  back = qlite.QuantStats.load(tmp_path / "s.npz")
  assert back.meta == stats.meta
  assert len(back.samples) == 1 and back.samples[0].shape == (4, 12)
  np.testing.assert_array_equal(back.samples[0], bs[0][:4])
  with pytest.raises(qlite.CalibrationError, match="allow_changed_weights"):
    qlite.export_tflite(m, RULES, back, bs[0][:1],
                        variables=jax.tree.map(lambda a: a + 0.01, v))


def test_qat_stats_carry_no_layout_and_pass(calibrated):
  m, v, bs, _ = calibrated
  qat = qlite.quantize_model(m, qlite.QatProvider(RULES))
  qv = qat.init(jax.random.key(1), bs[0])
  _, upd = qat.apply(qv, bs[0], mutable=["quant_stats"])
  blob = qlite.export_tflite(m, RULES, upd["quant_stats"], bs[0][:1],
                             variables={"params": qv["params"]})
  assert qlite.inspect_tflite(blob).full_integer


class WithDropout(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(12, 8, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)

  def __call__(self, x):
    return self.drop(self.dense(x))


def test_nnx_model_holding_rngs_calibrates_and_exports():
  model = WithDropout(nnx.Rngs(0))
  model.eval()
  bs = _batches()
  stats = qlite.calibrate(model, RULES, bs, progress=False)
  model(bs[0])          # running the model must not count as new weights
  blob = qlite.export_tflite(model, RULES, stats, bs[0][:1])
  assert qlite.inspect_tflite(blob).full_integer


def test_tiny_inputs_are_named():
  bs = _batches(scale=1e-9)
  m = MLP(8)
  v = m.init(jax.random.key(0), bs[0])
  stats = qlite.calibrate(m, RULES, bs, variables=v, progress=False)
  with pytest.warns(UserWarning, match=r"`input0` .* spans only"):
    qlite.export_tflite(m, RULES, stats, bs[0][:1], variables=v)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_inputs_get_a_clear_error(dtype):
  import ml_dtypes
  dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
  m = MLP(8)
  bs = [b.astype(dt) for b in _batches()]
  v = m.init(jax.random.key(0), bs[0])
  with pytest.raises(qlite.QliteError, match=f"argument 0 is {dtype}.*float32"):
    qlite.calibrate(m, RULES, bs, variables=v, progress=False)


@pytest.mark.parametrize("batch, phrase", [
    ({"x": np.zeros((4, 12), np.float32)}, "dict"),
    ((np.zeros((4, 12), np.float32), True), "flag"),
], ids=["dict_batch", "bool_flag"])
def test_batches_that_are_not_positional_arrays_are_named(batch, phrase):
  m = MLP(8)
  v = m.init(jax.random.key(0), _batches()[0])
  with pytest.raises(qlite.CalibrationError, match=f"(?i)calibration batch 0.*{phrase}"):
    qlite.calibrate(m, RULES, [batch], variables=v, progress=False)
