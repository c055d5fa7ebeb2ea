"""The ``qlite`` command: demo | export | inspect | compare | generate | zoo."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from qlite.errors import QliteError
from qlite.litert.convert import SigintWatch


def _count(minimum: int):
  """An argparse type: an int >= ``minimum`` (a clear message otherwise)."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"expected a whole number, got {text!r}") from None
    if value < minimum:
      raise argparse.ArgumentTypeError(
          f"must be {'positive' if minimum == 1 else f'>= {minimum}'}, "
          f"got {value}")
    return value
  parse.__name__ = "count"     # argparse names the type in some messages
  return parse


_positive = _count(1)
_non_negative = _count(0)


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


def calibrated_entry(entry: str, calib_batches: int, stats_path=None, *,
                     progress: bool = True, check=None):
  """Loads ENTRY and calibrates int8-everywhere rules on its first
  ``calib_batches`` batches (or loads ``stats_path``, before ENTRY);
  returns ``(model, variables, batches, rules, stats)``.
  ``check(model, variables, batches)`` runs before calibrating.

  Raises:
    QliteError: bad entry, no batches, a dict batch or a flag in a batch,
      ``calib_batches < 1``, calibration failure, bad stats file.
  """
  import qlite
  from qlite.quant.batches import describe_bad_batch
  if calib_batches < 1:
    raise QliteError(f"calib_batches must be positive, got {calib_batches}")
  stats = None
  if stats_path is not None:
    stats = qlite.QuantStats.load(stats_path)
  model, variables, batches = load_entry(entry)
  try:
    batches = list(batches)
  except TypeError:
    raise QliteError(f"{entry} must return (model, variables, batches) with "
                     f"batches a list or iterable of batches, got "
                     f"{type(batches).__name__}") from None
  if not batches:
    raise QliteError(f"{entry} returned no calibration batches")
  for n, batch in enumerate(batches):
    problem = describe_bad_batch(batch, what=f"{entry}: batch {n}")
    if problem is not None:
      raise QliteError(problem)
  if check is not None:
    check(model, variables, batches)
  rules = [qlite.QuantizationRule(module_path=r".*", weight_qtype="int8",
                                  act_qtype="int8")]
  if stats is None:
    stats = qlite.calibrate(model, rules, batches[:calib_batches],
                            variables=variables, progress=progress)
  return model, variables, batches, rules, stats


def _check_output_path(path: str, what: str) -> None:
  """Refuses, before any work, an output path that cannot be written: its
  directory is missing or it is a directory."""
  directory = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise QliteError(f"{what}: cannot write {path!r}: it is a directory")
  if not os.path.isdir(directory):
    raise QliteError(f"{what}: cannot write {path!r}: directory "
                     f"{directory!r} does not exist; create it first")


def _check_tflite_file(path: str) -> None:
  """Refuses, before any work, a ``.tflite`` that is missing or unreadable.

  Raises:
    TFLiteFormatError: no such file, not a file, unreadable, not a .tflite.
  """
  import qlite
  from qlite.errors import TFLiteFormatError
  if not os.path.exists(path):
    raise TFLiteFormatError(f"compare: no such .tflite file {path!r}")
  if not os.path.isfile(path):
    raise TFLiteFormatError(f"compare: {path!r} is not a file")
  try:
    with open(path, "rb") as f:
      blob = f.read()
  except OSError as e:
    raise TFLiteFormatError(f"compare: cannot read {path!r}: "
                            f"{e.strerror}") from None
  try:
    qlite.inspect_tflite(blob)
  except TFLiteFormatError as e:
    raise TFLiteFormatError(f"compare: {path!r}: {e}") from None


def _cmd_export(args):
  import qlite
  from qlite.litert.convert import write_atomic
  _check_output_path(args.out, "export")
  model, variables, batches, rules, stats = calibrated_entry(
      args.entry, args.calib_batches, progress=not args.no_progress)
  first = batches[0]
  example = tuple(x[:1] for x in first) if isinstance(first, (tuple, list)) \
      else first[:1]
  blob = qlite.export_tflite(model, rules, stats, example, variables=variables,
                             io_dtype=args.io_dtype,
                             strict=not args.allow_float)
  # Written here, not by export_tflite: a Ctrl-C that jax swallowed (one
  # landing in its gc callback is printed and ignored) still writes nothing.
  args.interrupts.check()
  write_atomic(args.out, blob, what="export")
  print(qlite.inspect_tflite(blob).summary())
  print(f"wrote {args.out}")


def _cmd_compare(args):
  import qlite
  # Everything that can be checked without the model first: the .tflite,
  # the output paths (then the stats file, in calibrated_entry).
  _check_tflite_file(args.model)
  for path in (args.json, args.csv, args.model_explorer, args.html):
    if path is not None:
      _check_output_path(path, "compare")
  from qlite.analysis.runner import check_io_fits

  def fits(model, variables, batches):
    check_io_fits(args.model, model, variables, batches[0])
  model, variables, batches, rules, stats = calibrated_entry(
      args.entry, args.calib_batches, args.stats,
      progress=not args.no_progress, check=fits)
  if args.batches is not None:
    batches = batches[:args.batches]
  report = qlite.compare(model, rules, stats, args.model, batches,
                         variables=variables, progress=not args.no_progress)
  print(report.table(metric=args.metric) if args.worst is None else
        report.table(worst=args.worst, metric=args.metric))
  args.interrupts.check()
  for path, write in ((args.json, report.to_json), (args.csv, report.to_csv),
                      (args.model_explorer, report.to_model_explorer)):
    if path is not None:
      write(path)
      print(f"wrote {path}")
  if args.html is not None:
    kw = {} if args.worst is None else {"worst": args.worst}
    report.to_html(args.html, metric=args.metric, **kw)
    print(f"wrote {args.html}")


def _cmd_tune(args):
  import qlite
  from qlite.analysis.autotune import autotune
  from qlite.litert.convert import write_atomic
  from qlite.quant.batches import describe_bad_batch
  if args.out is not None:
    _check_output_path(args.out, "tune")
  model, variables, batches = load_entry(args.entry)
  batches = list(batches)
  for n, batch in enumerate(batches):
    problem = describe_bad_batch(batch, what=f"{args.entry}: batch {n}")
    if problem is not None:
      raise QliteError(problem)
  rules = [qlite.QuantizationRule(module_path=r".*", weight_qtype="int8",
                                  act_qtype="int8")]
  calib = batches[:args.calib_batches]
  held = batches[args.calib_batches:][:args.eval_batches] or None
  rules, stats, report = autotune(
      model, rules, calib, variables=variables,
      target_sqnr_db=args.target_sqnr, eval_batches=held,
      allow_float=args.allow_float, max_fraction=args.max_fraction,
      progress=not args.no_progress)
  print(report)
  args.interrupts.check()
  if args.out is not None:
    first = batches[0]
    example = tuple(x[:1] for x in first) \
        if isinstance(first, (tuple, list)) else first[:1]
    blob = qlite.export_tflite(model, rules, stats, example,
                               variables=variables,
                               strict=not args.allow_float)
    args.interrupts.check()
    write_atomic(args.out, blob, what="tune")
    print(f"wrote {args.out}")


def _cmd_inspect(args):
  import qlite
  info = qlite.inspect_tflite(args.model)
  print(info.summary())
  try:   # which ops LiteRT's XNNPACK delegate leaves to the builtin kernels
    delegation = info.delegation
  except qlite.QliteError as e:
    print(f"XNNPACK: not measured ({e})")
  else:
    print(delegation.summary())
    if args.delegation:
      for line in delegation.details():
        print(f"  builtin {line}")
  if len(info.signatures) > 1:
    print("(ops and tensors above: the first signature's subgraph)")
    for name, (ins, outs) in info.signatures.items():
      print(f"signature {name}: ({', '.join(ins)}) -> ({', '.join(outs)})")
  if args.tensors:
    for t in info.tensors:
      q = "" if t.scale is None else (
          f" scale={t.scale[0]:.6g} zp={int(t.zero_point[0])}"
          if t.scale.size == 1 else f" per-channel[{t.scale.size}] "
          f"dim={t.quantized_dimension}")
      print(f"  {t.index:4d} {t.dtype:8s} {str(t.shape):18s} {t.name}{q}")


def _token_ids(text: str) -> list:
  """An argparse type: comma-separated non-negative token ids."""
  try:
    ids = [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected comma-separated token ids like 1,2,3, got {text!r}") \
        from None
  if not ids or min(ids) < 0:
    raise argparse.ArgumentTypeError(
        f"expected at least one non-negative token id, got {text!r}")
  return ids


def _cmd_generate(args):
  from qlite.litert.generate import LMRunner
  if args.temperature < 0:
    raise QliteError(f"--temperature must be >= 0, got {args.temperature}")
  runner = LMRunner(args.model, num_threads=args.threads)
  out = runner.generate(args.prompt_ids, args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k,
                        seed=args.seed)
  print(",".join(str(t) for t in out.tokens))


def _cmd_zoo(args):
  from qlite.zoo import report
  rows = report.main(args.names or None)
  if not all(r.full_integer for r in rows):
    raise QliteError("some zoo models are not full-integer (see table)")


def _cmd_doctor(args):
  from qlite.kernels import cpu as cpu_kernels
  print(cpu_kernels.format_info(), end="")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="qlite", description=__doc__)
  sub = p.add_subparsers(dest="cmd", required=True)
  d = sub.add_parser("demo", help="train a digits CNN, export int8, verify")
  d.add_argument("--out-dir", default=".")
  d.add_argument("--steps", type=_positive, default=300)
  d.set_defaults(func=_cmd_demo)
  e = sub.add_parser("export", help="calibrate and export ENTRY to .tflite")
  e.add_argument("entry", help="package.module:function returning "
                 "(model, variables, batches)")
  e.add_argument("--out", required=True)
  e.add_argument("--io-dtype", default="float32", choices=["float32", "int8"])
  e.add_argument("--calib-batches", type=_positive, default=32)
  e.add_argument("--allow-float", action="store_true",
                 help="accept float islands instead of failing")
  e.add_argument("--no-progress", action="store_true",
                 help="no progress bars")
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
  c.add_argument("--html", help="write a self-contained HTML report (per-"
                 "layer SQNR / LSB charts, tables) here")
  c.add_argument("--calib-batches", type=_positive, default=32,
                 help="batches to calibrate on (as `qlite export`)")
  c.add_argument("--stats", help="load QuantStats (.npz) instead of "
                 "calibrating")
  c.add_argument("--batches", type=_positive, default=None,
                 help="compare on the first N batches only (default: all)")
  c.add_argument("--metric", default="litert_vs_float",
                 choices=["fakequant_vs_float", "litert_vs_float",
                          "litert_vs_fakequant", "own_vs_float"],
                 help="SQNR that marks the worst layers")
  c.add_argument("--worst", type=_non_negative, default=None,
                 help="how many worst layers to mark")
  c.add_argument("--no-progress", action="store_true",
                 help="no progress bars (calibration and compare)")
  c.set_defaults(func=_cmd_compare)
  t = sub.add_parser("tune", help="promote the fewest op groups to int16 "
                     "(LiteRT 16x8) until the export reaches a target SQNR")
  t.add_argument("entry", help="package.module:function returning "
                 "(model, variables, batches)")
  t.add_argument("--target-sqnr", type=float, required=True,
                 help="LiteRT vs float SQNR (dB) to reach on held-out "
                 "batches")
  t.add_argument("--out", help="export the tuned model here")
  t.add_argument("--calib-batches", type=_positive, default=24,
                 help="the first N batches calibrate; the ones after are "
                 "held out (default: the last quarter of the N)")
  t.add_argument("--eval-batches", type=_positive, default=8,
                 help="held-out batches after the calibration ones")
  t.add_argument("--allow-float", action="store_true",
                 help="allow float modules when int16 everywhere misses the "
                 "target")
  t.add_argument("--max-fraction", type=float, default=None,
                 help="promote at most this fraction of the boundaries")
  t.add_argument("--no-progress", action="store_true",
                 help="do not print each export measured")
  t.set_defaults(func=_cmd_tune)
  i = sub.add_parser("inspect", help="ops, dtypes, quantization, XNNPACK "
                     "delegation of a .tflite")
  i.add_argument("model")
  i.add_argument("--tensors", action="store_true", help="list every tensor")
  i.add_argument("--delegation", action="store_true",
                 help="list each op LiteRT's XNNPACK delegate leaves to the "
                 "(slower) builtin kernels, with its tensors")
  i.set_defaults(func=_cmd_inspect)
  g = sub.add_parser("generate", help="generate tokens with a prefill + "
                     "decode LM .tflite (greedy, or sampling with a seed)")
  g.add_argument("model", help="a .tflite with 'prefill' and 'decode' "
                 "signatures (qlite.export_tflite(..., signatures=...))")
  g.add_argument("--prompt-ids", type=_token_ids, required=True,
                 help="comma-separated prompt token ids, e.g. 1,2,3")
  g.add_argument("--max-new-tokens", type=_positive, default=16)
  g.add_argument("--temperature", type=float, default=0.0,
                 help="0: greedy (default); > 0: sample")
  g.add_argument("--top-k", type=_positive, default=None,
                 help="sample from the K most likely tokens")
  g.add_argument("--seed", type=int, default=0, help="sampling seed")
  g.add_argument("--threads", type=_positive, default=None,
                 help="LiteRT threads")
  g.set_defaults(func=_cmd_generate)
  z = sub.add_parser("zoo", help="convert every zoo model; full-integer + "
                     "SQNR table")
  z.add_argument("names", nargs="*", help="zoo names (default: all)")
  z.set_defaults(func=_cmd_zoo)
  dr = sub.add_parser("doctor", help="CPU kernel report: instruction set, "
                      "which dots run the kernel and why")
  dr.set_defaults(func=_cmd_doctor)
  args = p.parse_args(argv)
  try:
    with SigintWatch() as args.interrupts:
      args.func(args)
  except QliteError as err:
    print(f"qlite: error: {err}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    # Every qlite output is written atomically: nothing partial is left.
    print("qlite: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
