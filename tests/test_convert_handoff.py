"""Memory handoffs of the conversion: convert_stablehlo takes the serialized
module over from a one-item list (freed once parsed), and large constants
leave the jax.export'ed module as arguments and return as converter-side
constants; the .tflite bytes are the same either way."""

import jax
import jax.numpy as jnp
import numpy as np

from qlite.litert import convert as litert


def test_list_handoff_empties_the_list_and_gives_the_same_tflite():
  w = np.arange(12, dtype=np.float32).reshape(3, 4) / 7.0

  def fn(x):
    return (jnp.tanh(x @ w),)

  avals = [jax.ShapeDtypeStruct((2, 3), jnp.float32)]
  module = litert.stablehlo_bytecode(fn, avals)
  direct = litert.convert_stablehlo(module, ["x"], ["y"], quantized=False)
  holder = [module]
  handed = litert.convert_stablehlo(holder, ["x"], ["y"], quantized=False)
  assert holder == []
  assert handed == direct and direct[4:8] == b"TFL3"


def _dense_fn():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((256, 128)).astype(np.float32)   # 128 KiB
  b = rng.standard_normal((128,)).astype(np.float32)       # 512 B: stays

  def fn(x):
    return (jnp.tanh(x @ w + b),)
  return fn, w


def test_large_constants_travel_as_arguments_and_come_back_as_constants(
    monkeypatch):
  fn, w = _dense_fn()
  avals = [jax.ShapeDtypeStruct((2, 256), jnp.float32)]
  fn2, weights = litert._hoist_weights(fn, avals)
  assert len(weights) == 1 and weights[0].shape == w.shape
  np.testing.assert_array_equal(weights[0], w)
  x = np.ones((2, 256), np.float32)
  np.testing.assert_allclose(fn2(x, weights[0])[0], fn(x)[0], rtol=1e-6)
  # the exported module no longer carries the weight bytes
  small = litert.stablehlo_bytecode(
      fn2, avals + [jax.ShapeDtypeStruct(w.shape, w.dtype)])
  assert len(small) < w.nbytes // 8 < len(litert.stablehlo_bytecode(fn, avals))
  hoisted = litert.convert_function(fn, avals, quantized=False)
  monkeypatch.setattr(litert, "WEIGHT_ARG_MIN_BYTES", 1 << 62)
  assert litert.convert_function(fn, avals, quantized=False) == hoisted
  from qlite.litert.runtime import TFLiteRunner
  got = TFLiteRunner(hoisted).run(x)[0]
  np.testing.assert_allclose(got, fn(x)[0], rtol=1e-5, atol=1e-6)


def test_large_model_calibration_feeds_weights_as_inputs(monkeypatch):
  """Above CALIBRATION_WEIGHTS_AS_INPUTS_BYTES the calibration .tflite takes
  the weights as inputs (the converter never holds them); the statistics
  are those of the weights-as-constants model."""
  import qlite
  from qlite.litert import pipeline
  from qlite.zoo import registry
  zm = registry.get("transformer/linen")
  rules = [qlite.QuantizationRule()]

  def stats():
    return qlite.calibrate(zm.model, rules, zm.batches[:2],
                           variables=zm.variables, progress=False)
  base = stats()
  seen = {}
  real = litert.convert_function_weights_as_inputs

  def spy(*a, **k):
    blob, weights = real(*a, **k)
    seen["blob"], seen["weights"] = len(blob), sum(w.nbytes for w in weights)
    return blob, weights
  monkeypatch.setattr(litert, "convert_function_weights_as_inputs", spy)
  monkeypatch.setattr(pipeline, "CALIBRATION_WEIGHTS_AS_INPUTS_BYTES", 0)
  fed = stats()
  n_params = sum(np.asarray(p).nbytes for p in
                 jax.tree_util.tree_leaves(zm.variables))
  assert seen["weights"] > 0.9 * n_params        # the weights went as inputs
  assert seen["blob"] < seen["weights"]
  assert sorted(fed.keys()) == sorted(base.keys()) and len(base) > 50
  for key in base.keys():
    for stat in ("min", "max"):
      np.testing.assert_allclose(fed[key][stat], base[key][stat], rtol=1e-4,
                                 atol=1e-5, err_msg=f"{key} {stat}")


def test_fixed_inputs_are_checked():
  import pytest
  from qlite.litert.runtime import TFLiteRunner
  from qlite.errors import QliteError
  fn, w = _dense_fn()
  avals = [jax.ShapeDtypeStruct((2, 256), jnp.float32)]
  blob, weights = litert.convert_function_weights_as_inputs(
      fn, avals, num_outputs=1)
  runner = TFLiteRunner(blob)
  with pytest.raises(QliteError, match="shape"):
    runner.set_fixed_inputs([np.zeros((3, 3), np.float32)])
  runner.set_fixed_inputs(weights)
  x = np.ones((2, 256), np.float32)
  np.testing.assert_allclose(runner.run(x)[0], fn(x)[0], rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(QliteError, match="takes 1 inputs, got 2"):
    runner.run(x, x)
