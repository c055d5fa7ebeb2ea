"""``qlite demo``: train a digits CNN, calibrate, export full-integer, verify."""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from qlite.litert.providers import ConversionProvider
from qlite.litert.inspect import inspect_tflite
from qlite.litert.runtime import TFLiteRunner
from qlite.metrics import sqnr_db
from qlite.quant.provider import quantize_model
from qlite.litert.pipeline import calibrate, export_float_tflite, export_tflite
from qlite.rules import QuantizationRule


def run_tflite_batched(blob: bytes, x: np.ndarray) -> np.ndarray:
  """Runs a batch-1 .tflite model over every row of ``x``."""
  runner = TFLiteRunner(blob)
  return np.concatenate([runner.run(x[i:i + 1])[0] for i in range(len(x))])


def main(out_dir: str = ".", *, steps: int = 300, calib_batches: int = 32,
         seed: int = 0) -> dict:
  """Runs the demo, prints its table, returns the figures."""
  from qlite.zoo import digits
  t0 = time.perf_counter()
  data = digits.load_digits(seed)
  model, variables = digits.train(data, steps=steps, seed=seed)
  t_train = time.perf_counter() - t0
  rules = [QuantizationRule(module_path=r".*", weight_qtype="int8",
                            act_qtype="int8", act_static_scale=True)]
  t1 = time.perf_counter()
  stats = calibrate(model, rules, data.batches(32, calib_batches),
                    variables=variables)
  t_cal = time.perf_counter() - t1
  os.makedirs(out_dir, exist_ok=True)       # --out-dir is created
  path = os.path.join(out_dir, "digits_int8.tflite")
  t2 = time.perf_counter()
  blob = export_tflite(model, rules, stats, data.x_test[:1],
                       variables=variables, path=path)
  t_exp = time.perf_counter() - t2
  float_blob = export_float_tflite(model, data.x_test[:1], variables)
  info = inspect_tflite(blob)

  x, y = data.x_test, data.y_test
  float_logits = np.asarray(model.apply(variables, x))
  fq = quantize_model(model, ConversionProvider(rules, stats),
                      variables=variables)
  fq_logits = np.asarray(fq.apply(variables, x))
  lite_logits = run_tflite_batched(blob, x)
  out_scale = float(info.tensor(info.ops[-1].inputs[0]).scale[0]) \
      if info.ops[-1].name == "DEQUANTIZE" else float("nan")
  acc = {k: digits.accuracy(v, y) for k, v in
         (("float JAX", float_logits), ("qlite fake-quant JAX", fq_logits),
          ("LiteRT int8", lite_logits))}
  res = {
      "accuracy": acc,
      "sqnr_litert_vs_float_db": sqnr_db(float_logits, lite_logits),
      "sqnr_fakequant_vs_float_db": sqnr_db(float_logits, fq_logits),
      "max_diff_litert_vs_fakequant_lsb":
          float(np.max(np.abs(lite_logits - fq_logits)) / out_scale),
      "float_bytes": len(float_blob), "int8_bytes": len(blob),
      "full_integer": info.full_integer, "ops": info.op_histogram,
      "path": path, "t_train": t_train, "t_calibrate": t_cal,
      "t_export": t_exp, "n_test": len(x),
  }
  print(format_table(res))
  return res


def format_table(r: dict) -> str:
  rows = [("model", f"Linen DigitsCNN, sklearn digits ({r['n_test']} test images)")]
  for k, v in r["accuracy"].items():
    rows.append((f"test accuracy: {k}", f"{v:.2f} %"))
  rows += [
      ("SQNR LiteRT int8 vs float", f"{r['sqnr_litert_vs_float_db']:.1f} dB"),
      ("SQNR fake-quant vs float", f"{r['sqnr_fakequant_vs_float_db']:.1f} dB"),
      ("max |LiteRT - fake-quant|",
       f"{r['max_diff_litert_vs_fakequant_lsb']:.2f} LSB of output scale"),
      ("file size float / int8",
       f"{r['float_bytes']:,} B / {r['int8_bytes']:,} B "
       f"({r['int8_bytes'] / r['float_bytes']:.2f}x)"),
      ("full integer", "yes" if r["full_integer"] else "NO"),
      ("LiteRT ops", ", ".join(f"{k}x{v}" for k, v in sorted(r["ops"].items()))),
      ("time train / calibrate / export",
       f"{r['t_train']:.1f} s / {r['t_calibrate']:.1f} s / {r['t_export']:.1f} s"),
      ("written", r["path"]),
  ]
  w = max(len(a) for a, _ in rows)
  line = "-" * (w + 3 + max(len(b) for _, b in rows))
  return "\n".join([line] + [f"{a.ljust(w)} | {b}" for a, b in rows] + [line])
