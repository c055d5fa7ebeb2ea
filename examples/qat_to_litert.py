"""QAT, then LiteRT: fine-tune through fake quantization and export the
result as a full-integer .tflite.

    python examples/qat_to_litert.py [--weight-qtype int4] [--epochs 3]

Runs examples/qat_digits.py (digits CNN: float training, PTQ at int4
weights / int8 activations, QAT fine-tuning with optax), then exports two
.tflite files: the PTQ model (calibrated statistics) and the QAT model (its
``quant_stats`` collection feeds ``export_tflite`` directly, no
re-calibration). Prints the LiteRT accuracy of both beside the JAX ones and
how far LiteRT is from the QAT fake-quant model (in output LSB).

int4 is the lowest weight precision LiteRT runs; on this small CNN int4 PTQ
already keeps the float accuracy, so QAT has nothing to recover here (the
int2 case in qat_digits.py shows the gain): the point is the hand-off, the
QAT model and its .tflite agree to 1 LSB.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qat_digits  # noqa: E402  (examples/qat_digits.py)

import qlite  # noqa: E402
from qlite.zoo import digits  # noqa: E402


def run_tflite(blob, x):
  runner = qlite.TFLiteRunner(blob)
  return np.concatenate([runner.run(x[i:i + 1])[0] for i in range(len(x))])


def main(weight_qtype: str = "int4", epochs: int = 3) -> dict:
  res = qat_digits.run(weight_qtype, epochs=epochs)
  model, rules, data, qvars = res["model"], res["rules"], res["data"], \
      res["qvars"]
  x, y = data.x_test, data.y_test

  # PTQ export: calibrated statistics, the float weights.
  variables = res["variables"]
  stats = qlite.calibrate(model, rules, data.batches(32, 32),
                          variables=variables, progress=False)
  ptq_blob = qlite.export_tflite(model, rules, stats, x[:1],
                                 variables=variables)
  # QAT export: the fine-tuned weights and the ranges QAT learned.
  qat_blob = qlite.export_tflite(model, rules, qvars["quant_stats"], x[:1],
                                 variables={"params": qvars["params"]})
  info = qlite.inspect_tflite(qat_blob)
  w = [t for t in info.tensors if t.is_constant and t.per_channel
       and t.dtype.startswith("INT") and t.dtype != "INT32"]
  print(f"\nQAT .tflite: full integer {info.full_integer}, {len(qat_blob):,} "
        f"bytes, weights {', '.join(sorted({t.dtype for t in w}))}")
  print("  " + info.summary().splitlines()[1])

  qat_model = qlite.quantize_model(model, qlite.QatProvider(rules))
  qat_jax = np.asarray(qat_model.apply(qvars, x))
  lite_ptq, lite_qat = run_tflite(ptq_blob, x), run_tflite(qat_blob, x)
  lsb = float(info.tensor(info.ops[-1].inputs[0]).scale[0])
  max_lsb = float(np.max(np.abs(lite_qat - qat_jax)) / lsb)
  acc = {"ptq_litert": digits.accuracy(lite_ptq, y),
         "qat_litert": digits.accuracy(lite_qat, y)}
  print(f"\n{len(y)} test images, {weight_qtype} weights / int8 activations:")
  print(f"  float JAX          {res['float']:6.2f} %")
  print(f"  PTQ fake-quant JAX {res['ptq']:6.2f} %   LiteRT "
        f"{acc['ptq_litert']:6.2f} %")
  print(f"  QAT fake-quant JAX {res['qat']:6.2f} %   LiteRT "
        f"{acc['qat_litert']:6.2f} %")
  print(f"  max |LiteRT - QAT fake-quant| = {max_lsb:.2f} LSB of the output "
        f"scale")
  return {**{k: res[k] for k in ("float", "ptq", "qat")}, **acc,
          "max_lsb": max_lsb, "full_integer": info.full_integer}


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--weight-qtype", default="int4")
  p.add_argument("--epochs", type=int, default=3)
  a = p.parse_args()
  main(a.weight_qtype, a.epochs)
