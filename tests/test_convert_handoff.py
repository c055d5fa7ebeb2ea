"""Memory handoffs of the conversion: convert_stablehlo takes the serialized
module over from a one-item list (freed once parsed), and large constants
leave the jax.export'ed module as arguments and return as converter-side
constants; the .tflite bytes are the same either way."""

import jax
import jax.numpy as jnp
import numpy as np

from qlite.convert import litert


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
  from qlite.convert.runtime import TFLiteRunner
  got = TFLiteRunner(hoisted).run(x)[0]
  np.testing.assert_allclose(got, fn(x)[0], rtol=1e-5, atol=1e-6)
