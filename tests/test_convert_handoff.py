"""convert_stablehlo takes the serialized module over from a one-item list
(freed once parsed) and converts it exactly as the bytes themselves."""

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
