"""``qlite zoo``: convert every zoo model and report full-integer coverage
and SQNR of LiteRT int8 against the float JAX model."""

from __future__ import annotations

import dataclasses
import time
import warnings

import numpy as np

from qlite.litert.inspect import inspect_tflite
from qlite.litert.runtime import TFLiteRunner
from qlite.errors import QliteError
from qlite.metrics import sqnr_db
from qlite.litert.inspect import float_islands
from qlite.litert.pipeline import calibrate, export_tflite
from qlite.rules import QuantizationRule


@dataclasses.dataclass
class ZooRow:
  name: str
  full_integer: bool
  sqnr_db: float
  ops: dict
  float_ops: list
  seconds: float
  error: str = ""


def evaluate_model(zm, rules=None, *, eval_batches: int = 4) -> ZooRow:
  """Calibrates, exports (strict=False) and runs one zoo model; returns its
  row. SQNR is over ``eval_batches`` calibration batches, row by row at
  batch 1."""
  rules = rules or [QuantizationRule(module_path=r".*", weight_qtype="int8",
                                     act_qtype="int8")]
  t0 = time.perf_counter()
  try:
    stats = calibrate(zm.model, rules, zm.batches, variables=zm.variables,
                      progress=False)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      blob = export_tflite(zm.model, rules, stats, zm.example_args,
                           variables=zm.variables, strict=False)
  except QliteError as e:
    return ZooRow(zm.name, False, float("nan"), {}, [], time.perf_counter() - t0,
                  f"{type(e).__name__}: {e}")
  seconds = time.perf_counter() - t0
  info = inspect_tflite(blob)
  runner = TFLiteRunner(blob)
  refs, lites = [], []
  for batch in zm.batches[:eval_batches]:
    args = batch if isinstance(batch, tuple) else (batch,)
    n = np.shape(args[0])[0]
    for i in range(n):
      row = tuple(np.asarray(a)[i:i + 1] for a in args)
      refs.append(np.asarray(zm.apply(*row)))
      lites.append(runner.run(*row)[0])
  return ZooRow(zm.name, info.full_integer, sqnr_db(np.stack(refs),
                                                    np.stack(lites)),
                info.op_histogram, float_islands(info), seconds)


def format_rows(rows) -> str:
  """An aligned text table of zoo rows."""
  lines = [f"{'model':24s} {'full-int':8s} {'SQNR dB':>8s} {'export s':>8s}  ops"]
  for r in rows:
    ops = ", ".join(f"{k}x{v}" for k, v in sorted(r.ops.items()))
    lines.append(f"{r.name:24s} {'yes' if r.full_integer else 'NO':8s} "
                 f"{r.sqnr_db:8.1f} {r.seconds:8.1f}  {ops}")
    for f in r.float_ops:
      lines.append(f"{'':24s}   float: {f}")
    if r.error:
      lines.append(f"{'':24s}   error: {r.error[:300]}")
  return "\n".join(lines)


def main(names=None) -> list:
  """Evaluates the named zoo models (all by default); prints the table."""
  from qlite.zoo import registry
  rows = []
  for name in names or registry.names():
    rows.append(evaluate_model(registry.get(name)))
    print(format_rows(rows[-1:]).splitlines()[1:] and
          "\n".join(format_rows(rows[-1:]).splitlines()[1:]), flush=True)
  print()
  print(format_rows(rows))
  return rows
