"""Calibration methods side by side, on held-out data.

    python examples/calibration_methods.py [--methods minmax,mse,...]

The digits CNN is calibrated on 8 training batches with each registered
range method of ``qlite.core.calibration`` (plus one registered here, in
five lines), exported full-integer, and run by LiteRT on the 449 held-out
test images. Prints, per method, the SQNR of the LiteRT logits against the
float model, the top-1 agreement and accuracy, and the range it chose for
the first convolution's output.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np

import qlite
from qlite.core import calibration as C
from qlite.zoo import digits


def register_half_absmax():
  """A custom method: half the symmetric absmax range (clips on purpose).
  ``range_fn(record, ctx) -> (lo, hi)`` reads the aggregated statistics."""
  def half(record, ctx):
    lo, hi = C.aggregated_range(record, ctx.aggregation, ctx.name)
    r = max(abs(lo), abs(hi)) / 2
    return -r, r
  if "half_absmax" not in C.registry.names():
    C.register(C.CalibrationMethod("half_absmax", half))


def run_tflite(blob, x):
  runner = qlite.TFLiteRunner(blob)
  return np.concatenate([runner.run(x[i:i + 1])[0] for i in range(len(x))])


def main(methods: list[str] | None = None) -> dict:
  register_half_absmax()
  methods = methods or ["minmax", "absmax", "rms", "percentile", "mse",
                        "quantile", "half_absmax"]
  print(f"registered methods: {', '.join(C.registry.names())}")
  data = digits.load_digits(0)
  model, variables = digits.train(data, steps=300, seed=0)
  rules = [qlite.QuantizationRule(module_path=r".*", weight_qtype="int8",
                                  act_qtype="int8")]
  calib = data.batches(32, 8)                    # training rows only
  x, y = data.x_test, data.y_test                # held out
  ref = np.asarray(model.apply(variables, x))
  print(f"digits CNN: calibrate on {sum(len(b) for b in calib)} training "
        f"images, evaluate on {len(x)} held-out images "
        f"(float accuracy {digits.accuracy(ref, y):.2f} %)\n")
  head = (f"{'method':12s} {'SQNR dB':>8s} {'top-1 agree':>12s} "
          f"{'accuracy':>9s}  Conv_0 range")
  print(head)
  print("-" * len(head))
  results = {}
  for m in methods:
    stats = qlite.calibrate(model, rules, calib, variables=variables,
                            method=m, progress=False)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)  # clipping methods warn
      blob = qlite.export_tflite(model, rules, stats, x[:1],
                                 variables=variables)
    lite = run_tflite(blob, x)
    sqnr = qlite.metrics.sqnr_db(ref, lite)
    agree = float(np.mean(lite.argmax(-1) == ref.argmax(-1)) * 100)
    acc = digits.accuracy(lite, y)
    key = next(k for k in stats.keys() if k.startswith("Conv_0/"))
    lo, hi = (v + 0.0 for v in C.activation_range(stats.records[key], m))
    results[m] = {"sqnr_db": sqnr, "agree": agree, "accuracy": acc,
                  "range": (lo, hi)}
    print(f"{m:12s} {sqnr:8.1f} {agree:11.2f} % {acc:8.2f} %  "
          f"[{lo:.3g}, {hi:.3g}]")
  best = max(results, key=lambda k: results[k]["sqnr_db"])
  print(f"\nbest on held-out data: {best} "
        f"({results[best]['sqnr_db']:.1f} dB)")
  return results


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--methods", help="comma-separated (default: all built-in "
                 "ones and half_absmax)")
  a = p.parse_args()
  main(a.methods.split(",") if a.methods else None)
