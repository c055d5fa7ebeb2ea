"""Calibration range methods side by side: LiteRT int8 SQNR vs float JAX on
held-out inputs for each ``method`` of ``qlite.calibrate``.

    python bench/calib_methods.py                  # the bench/odml.py models
    python bench/calib_methods.py --zoo            # the 16 zoo models

Bench models: the same 32 calibration batches and 64 held-out rows as
``bench/odml.py``. Zoo: calibration on the first 4 of each model's 8 batches,
SQNR on the other 4 (``qlite zoo`` itself evaluates on calibration data,
where min/max never clips). Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BENCH_MODELS = ["transformer", "digits_cnn", "mobilenet_v2", "resnet", "unet"]


def _export(model, batches, variables, example_args, method):
  import qlite
  rules = [qlite.QuantizationRule(module_path=r".*", weight_qtype="int8",
                                  act_qtype="int8", act_static_scale=True)]
  stats = qlite.calibrate(model, rules, batches, variables=variables,
                          method=method, progress=False)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return qlite.export_tflite(model, rules, stats, example_args,
                               variables=variables, strict=False)


def bench_rows(methods):
  import _models
  import odml
  from qlite.metrics import sqnr_db
  for name in BENCH_MODELS:
    case = _models.build(name)
    model = _models.flax_model(case)
    yield name, [sqnr_db(case.ref, odml.outputs(_export(
        model, case.calib, case.variables, case.example_args, m),
        case.eval_x)) for m in methods]


def zoo_rows(methods):
  from qlite.litert.runtime import TFLiteRunner
  from qlite.metrics import sqnr_db
  from qlite.zoo import registry
  for name in registry.names():
    zm = registry.get(name)
    calib, held = zm.batches[:4], zm.batches[4:]
    out = []
    for m in methods:
      runner = TFLiteRunner(_export(zm.model, calib, zm.variables,
                                    zm.example_args, m))
      refs, lites = [], []
      for b in held:
        args = b if isinstance(b, tuple) else (b,)
        for i in range(np.shape(args[0])[0]):
          row = tuple(np.asarray(a)[i:i + 1] for a in args)
          refs.append(np.asarray(zm.apply(*row)))
          lites.append(runner.run(*row)[0])
      out.append(sqnr_db(np.stack(refs), np.stack(lites)))
    yield name, out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--zoo", action="store_true")
  ap.add_argument("--methods", default="minmax,mse,quantile")
  args = ap.parse_args(argv)
  methods = args.methods.split(",")
  rows = []
  print("| model | " + " | ".join(f"{m} dB" for m in methods) + " |")
  print("|---|" + "---|" * len(methods))
  for name, vals in (zoo_rows if args.zoo else bench_rows)(methods):
    rows.append(vals)
    print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + " |",
          flush=True)
  a = np.asarray(rows)
  for j, m in enumerate(methods[1:], 1):
    d = a[:, j] - a[:, 0]
    print(f"{m} - {methods[0]}: mean {d.mean():+.2f} dB, min {d.min():+.2f}, "
          f"max {d.max():+.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
