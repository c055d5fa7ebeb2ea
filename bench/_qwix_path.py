"""The peer pipeline: qwix 0.1.8's ODML providers + litert-converter.

Calibration: ``qwix.OdmlQatProvider`` run over the calibration batches with
``mutable=['quant_stats']`` (qwix's default per-batch simple moving average of
min / max), the step jitted. Conversion: ``qwix.OdmlConversionProvider``
with the params and quant_stats, then ``jax.export`` -> litert-converter in
strict static QDQ mode (the same converter call qlite makes; the glue is
``qlite.litert.convert``'s, the only qlite code on this path).

Bench-only: imports qwix; qlite never imports this.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def rules():
  import qwix
  return [qwix.QuantizationRule(module_path=".*", weight_qtype="int8",
                                act_qtype="int8")]


def as_jax(variables):
  """qwix tags weights by identity; numpy weights are silently left float
  (a trap measured on this stack), so hand it jax arrays."""
  return jax.tree_util.tree_map(jnp.asarray, variables)


def calibrate(model, variables, batches, timings: dict):
  """Returns qwix ``quant_stats`` after one pass over ``batches``; fills
  ``timings`` with ``calib_first_s`` (trace + compile + 1 batch) and
  ``calib_rest_s``."""
  import qwix
  t0 = time.perf_counter()
  qat = qwix.quantize_model(model, qwix.OdmlQatProvider(rules()))
  step = jax.jit(lambda v, x: qat.apply(v, x, mutable=["quant_stats"]))
  v = dict(variables)
  for i, b in enumerate(batches):
    _, upd = step(v, b)
    jax.block_until_ready(upd)
    v = {**v, **upd}
    if i == 0:
      timings["calib_first_s"] = time.perf_counter() - t0
      t1 = time.perf_counter()
  timings["calib_rest_s"] = time.perf_counter() - t1
  return v["quant_stats"]


def export(model, variables, quant_stats, example_args, timings: dict) -> bytes:
  """Returns the ``.tflite`` bytes of qwix's ODML conversion model; fills
  ``timings`` with ``export_stablehlo_s`` and ``converter_s``."""
  import qwix
  from qlite.litert import convert as litert
  conv = qwix.quantize_model(model, qwix.OdmlConversionProvider(
      rules(), variables["params"], quant_stats))
  fn = lambda *xs: conv.apply(variables, *xs)
  avals = [jax.ShapeDtypeStruct(np.shape(a), np.float32)
           for a in example_args]
  t0 = time.perf_counter()
  text = litert.stablehlo_bytecode(fn, avals)
  t1 = time.perf_counter()
  n_out = len(jax.tree_util.tree_leaves(jax.eval_shape(fn, *avals)))
  blob = litert.convert_stablehlo(text, [f"input_{i}" for i in
                                         range(len(avals))],
                                  [f"output_{i}" for i in range(n_out)],
                                  quantized=True)
  timings["export_stablehlo_s"] = t1 - t0
  timings["converter_s"] = time.perf_counter() - t1
  return blob
