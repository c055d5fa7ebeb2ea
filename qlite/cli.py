"""The ``qlite`` command: demo | export | inspect | compare."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from qlite.errors import QliteError


def load_entry(entry: str):
  """Imports ``package.module:function`` and calls it; returns
  ``(model, variables, batches)``.

  Raises:
    QliteError: bad entry string, import failure, or a wrong return value.
  """
  if ":" not in entry:
    raise QliteError(f"ENTRY must look like 'package.module:function', got "
                     f"{entry!r}")
  mod_name, fn_name = entry.split(":", 1)
  sys.path.insert(0, os.getcwd())
  try:
    mod = importlib.import_module(mod_name)
  except ImportError as e:
    raise QliteError(f"cannot import {mod_name!r} (from ENTRY {entry!r}): "
                     f"{e}") from None
  fn = getattr(mod, fn_name, None)
  if fn is None or not callable(fn):
    raise QliteError(f"{mod_name!r} has no function {fn_name!r}")
  result = fn()
  if not isinstance(result, tuple) or len(result) != 3:
    raise QliteError(f"{entry} must return (model, variables, batches); "
                     f"got {type(result).__name__}")
  return result


def _cmd_demo(args):
  from qlite import demo
  demo.main(args.out_dir, steps=args.steps)


def calibrated_entry(entry: str, calib_batches: int, stats_path=None):
  """Loads ENTRY and calibrates int8-everywhere rules on its first
  ``calib_batches`` batches (or loads ``stats_path``); returns
  ``(model, variables, batches, rules, stats)``.

  Raises:
    QliteError: bad entry, no batches, calibration failure, bad stats file.
  """
  import qlite
  model, variables, batches = load_entry(entry)
  batches = list(batches)
  if not batches:
    raise QliteError(f"{entry} returned no calibration batches")
  rules = [qlite.QuantizationRule(module_path=r".*", weight_qtype="int8",
                                  act_qtype="int8")]
  if stats_path is not None:
    stats = qlite.QuantStats.load(stats_path)
  else:
    stats = qlite.calibrate(model, rules, batches[:calib_batches],
                            variables=variables)
  return model, variables, batches, rules, stats


def _cmd_export(args):
  import qlite
  model, variables, batches, rules, stats = calibrated_entry(
      args.entry, args.calib_batches)
  first = batches[0]
  example = tuple(x[:1] for x in first) if isinstance(first, (tuple, list)) \
      else first[:1]
  blob = qlite.export_tflite(model, rules, stats, example, variables=variables,
                             path=args.out, io_dtype=args.io_dtype,
                             strict=not args.allow_float)
  print(qlite.inspect_tflite(blob).summary())
  print(f"wrote {args.out}")


def _cmd_compare(args):
  import qlite
  model, variables, batches, rules, stats = calibrated_entry(
      args.entry, args.calib_batches, args.stats)
  if args.batches is not None:
    batches = batches[:args.batches]
  report = qlite.compare(model, rules, stats, args.model, batches,
                         variables=variables, progress=not args.no_progress)
  print(report.table(metric=args.metric) if args.worst is None else
        report.table(worst=args.worst, metric=args.metric))
  for path, write in ((args.json, report.to_json), (args.csv, report.to_csv),
                      (args.model_explorer, report.to_model_explorer)):
    if path is not None:
      write(path)
      print(f"wrote {path}")


def _cmd_inspect(args):
  import qlite
  info = qlite.inspect_tflite(args.model)
  print(info.summary())
  if args.tensors:
    for t in info.tensors:
      q = "" if t.scale is None else (
          f" scale={t.scale[0]:.6g} zp={int(t.zero_point[0])}"
          if t.scale.size == 1 else f" per-channel[{t.scale.size}] "
          f"dim={t.quantized_dimension}")
      print(f"  {t.index:4d} {t.dtype:8s} {str(t.shape):18s} {t.name}{q}")


def _cmd_zoo(args):
  from qlite.zoo import report
  rows = report.main(args.names or None)
  if not all(r.full_integer for r in rows):
    raise QliteError("some zoo models are not full-integer (see table)")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="qlite", description=__doc__)
  sub = p.add_subparsers(dest="cmd", required=True)
  d = sub.add_parser("demo", help="train a digits CNN, export int8, verify")
  d.add_argument("--out-dir", default=".")
  d.add_argument("--steps", type=int, default=300)
  d.set_defaults(func=_cmd_demo)
  e = sub.add_parser("export", help="calibrate and export ENTRY to .tflite")
  e.add_argument("entry", help="package.module:function returning "
                 "(model, variables, batches)")
  e.add_argument("--out", required=True)
  e.add_argument("--io-dtype", default="float32", choices=["float32", "int8"])
  e.add_argument("--calib-batches", type=int, default=32)
  e.add_argument("--allow-float", action="store_true",
                 help="accept float islands instead of failing")
  e.set_defaults(func=_cmd_export)
  c = sub.add_parser("compare", help="float JAX vs fake-quant JAX vs LiteRT, "
                     "end to end and per layer")
  c.add_argument("entry", help="package.module:function returning "
                 "(model, variables, batches)")
  c.add_argument("model", help="the .tflite exported from ENTRY")
  c.add_argument("--json", help="write the report as JSON here")
  c.add_argument("--csv", help="write the per-layer table as CSV here")
  c.add_argument("--model-explorer", help="write Model Explorer node data "
                 "(per-layer SQNR) here")
  c.add_argument("--calib-batches", type=int, default=32,
                 help="batches to calibrate on (as `qlite export`)")
  c.add_argument("--stats", help="load QuantStats (.npz) instead of "
                 "calibrating")
  c.add_argument("--batches", type=int, default=None,
                 help="compare on the first N batches only (default: all)")
  c.add_argument("--metric", default="litert_vs_float",
                 choices=["fakequant_vs_float", "litert_vs_float",
                          "litert_vs_fakequant", "own_vs_float"],
                 help="SQNR that marks the worst layers")
  c.add_argument("--worst", type=int, default=None,
                 help="how many worst layers to mark")
  c.add_argument("--no-progress", action="store_true")
  c.set_defaults(func=_cmd_compare)
  i = sub.add_parser("inspect", help="ops, dtypes, quantization of a .tflite")
  i.add_argument("model")
  i.add_argument("--tensors", action="store_true", help="list every tensor")
  i.set_defaults(func=_cmd_inspect)
  z = sub.add_parser("zoo", help="convert every zoo model; full-integer + "
                     "SQNR table")
  z.add_argument("names", nargs="*", help="zoo names (default: all)")
  z.set_defaults(func=_cmd_zoo)
  args = p.parse_args(argv)
  try:
    args.func(args)
  except QliteError as err:
    print(f"qlite: error: {err}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
