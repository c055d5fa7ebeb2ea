"""ODML benchmark: qlite int8 vs float, TensorFlow's full-integer converter
and qwix 0.1.8's ODML providers, side by side, in one command.

    python bench/odml.py            # 5 models + transformer width scaling
    python bench/odml.py --quick    # digits CNN + MobileNetV2, 30 runs (< 5 min)

For each model: every pipeline exports in a fresh subprocess
(``bench/_export_worker.py``: calibration of 32 batches + conversion, split,
with qlite's stages profiled); this process then measures the ``.tflite``
size, LiteRT ``invoke()`` median latency (XNNPACK, batch 1, float model
I/O, 1 and 2 threads), float compute ops left, and accuracy (digits test
set) / output SQNR against the float JAX model. Prints the tables and
writes ``bench/RESULTS_odml.md``.

Needs the bench extras (tensorflow-cpu, qwix==0.1.8); qlite never imports them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402

MODELS = ("digits_cnn", "mobilenet_v2", "resnet", "transformer", "unet")
QUICK_MODELS = ("digits_cnn", "mobilenet_v2")
PIPELINES = ("float", "qlite", "tf", "qwix")
SCALING_WIDTHS = (1, 4, 16)
SCALING_PIPELINES = ("float", "qlite", "qwix")
LABEL = {"float": "float (litert-converter)", "qlite": "qlite int8",
         "tf": "TF converter int8", "qwix": "qwix ODML int8"}


# --------------------------------------------------------------------------
# measurements in this process

def latency_ms(blob: bytes, threads: int, runs: int, warmup: int) -> float:
  """Median wall time of ``invoke()`` in ms (LiteRT, default XNNPACK)."""
  from ai_edge_litert.interpreter import Interpreter
  it = Interpreter(model_content=blob, num_threads=threads)
  it.allocate_tensors()
  rng = np.random.default_rng(0)
  for d in it.get_input_details():
    dt = np.dtype(d["dtype"])
    x = (rng.uniform(0, 1, d["shape"]).astype(dt)
         if np.issubdtype(dt, np.floating) else
         rng.integers(-10, 10, d["shape"]).astype(dt))
    it.set_tensor(d["index"], x)
  for _ in range(warmup):
    it.invoke()
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    it.invoke()
    times.append(time.perf_counter() - t)
  return statistics.median(times) * 1e3


def outputs(blob: bytes, xs: np.ndarray) -> np.ndarray:
  import qlite
  runner = qlite.TFLiteRunner(blob, num_threads=2)
  return np.concatenate([runner.run(xs[i:i + 1])[0] for i in range(len(xs))])


def op_counts(blob: bytes) -> dict:
  import qlite
  info = qlite.inspect_tflite(blob)
  hist = info.op_histogram
  return {"float_ops": len(info.float_ops), "ops": sum(hist.values()),
          "qdq": hist.get("QUANTIZE", 0) + hist.get("DEQUANTIZE", 0),
          "full_integer": info.full_integer, "hist": hist}


def run_worker(pipeline: str, case_path: str, workdir: str, tag: str,
               cprofile: str | None = None) -> tuple[dict, bytes | None]:
  out_tflite = os.path.join(workdir, f"{tag}_{pipeline}.tflite")
  out_json = os.path.join(workdir, f"{tag}_{pipeline}.json")
  cmd = [sys.executable, os.path.join(HERE, "_export_worker.py"), pipeline,
         case_path, out_tflite, out_json]
  if cprofile:
    cmd += ["--cprofile", cprofile]
  log = os.path.join(workdir, f"{tag}_{pipeline}.log")
  with open(log, "w") as f:
    proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                          timeout=1800)
  if not os.path.exists(out_json):
    with open(log) as f:
      tail = f.read()[-1500:]
    return {"pipeline": pipeline, "error": f"worker exited {proc.returncode}: "
            f"{tail}"}, None
  with open(out_json) as f:
    res = json.load(f)
  blob = None
  if "error" not in res:
    with open(out_tflite, "rb") as f:
      blob = f.read()
  return res, blob


ROUNDS = 5


def measure(case, pipeline, res, blob) -> dict:
  """Size, op counts, SQNR / accuracy of one exported model (latency is
  added by :func:`add_latencies`)."""
  from qlite.metrics import sqnr_db
  row = dict(res)
  row["model"], row["pipeline"] = case.name, pipeline
  if blob is None:
    return row
  row["_blob"] = blob
  row.update(op_counts(blob))
  out = outputs(blob, case.eval_x)
  row["sqnr_db"] = sqnr_db(case.ref, out)
  if case.eval_y is not None:
    row["acc"] = float(np.mean(np.argmax(out, -1) == case.eval_y) * 100)
    row["acc_float_jax"] = float(np.mean(np.argmax(case.ref, -1) ==
                                         case.eval_y) * 100)
  return row


def add_latencies(rows, runs, warmup) -> None:
  """Median invoke() latency at 1 and 2 threads for each row: ROUNDS rounds
  interleaved across the pipelines of one model, each the median of
  ``runs``; the lowest round median is kept (least disturbed by the host)."""
  meds = {}
  for _ in range(ROUNDS):
    for i, r in enumerate(rows):
      if "_blob" not in r:
        continue
      for t in (1, 2):
        meds.setdefault((i, t), []).append(
            latency_ms(r["_blob"], t, runs, warmup))
  for i, r in enumerate(rows):
    if "_blob" in r:
      r["lat1_ms"], r["lat2_ms"] = min(meds[(i, 1)]), min(meds[(i, 2)])
      r["lat2_spread"] = max(meds[(i, 2)]) / min(meds[(i, 2)])
      del r["_blob"]


# --------------------------------------------------------------------------
# formatting

def _f(x, fmt="{:.2f}", none="–"):
  return none if x is None else fmt.format(x)


def _ratio(a, b):
  return None if a is None or b is None or b == 0 else a / b


def _get(rows, model, pipeline, key):
  for r in rows:
    if r["model"] == model and r["pipeline"] == pipeline:
      return r.get(key)
  return None


def md_table(header, body) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
  return "\n".join(lines)


def ratio_table(rows, models) -> str:
  header = ["ratio"] + list(models)
  specs = [
      ("qlite int8 / float latency (2 thr)", "qlite", "lat2_ms", "float",
       "lat2_ms"),
      ("qlite int8 / float latency (1 thr)", "qlite", "lat1_ms", "float",
       "lat1_ms"),
      ("qlite int8 / TF int8 latency (2 thr)", "qlite", "lat2_ms", "tf",
       "lat2_ms"),
      ("qlite int8 / qwix int8 latency (2 thr)", "qlite", "lat2_ms", "qwix",
       "lat2_ms"),
      ("qlite size / float size", "qlite", "bytes", "float", "bytes"),
      ("qlite export / TF export time", "qlite", "export_s", "tf",
       "export_s"),
      ("qlite export / qwix export time", "qlite", "export_s", "qwix",
       "export_s"),
  ]
  body = []
  for label, p1, k1, p2, k2 in specs:
    body.append([label] + [_f(_ratio(_get(rows, m, p1, k1),
                                      _get(rows, m, p2, k2)), "{:.2f}x")
                           for m in models])
  for peer in ("tf", "qwix"):
    body.append([f"SQNR qlite − {peer} (dB)"] + [
        _f(None if _get(rows, m, "qlite", "sqnr_db") is None or
           _get(rows, m, peer, "sqnr_db") is None else
           _get(rows, m, "qlite", "sqnr_db") - _get(rows, m, peer, "sqnr_db"),
           "{:+.1f}") for m in models])
  return md_table(header, body)


def main_table(rows) -> str:
  header = ["model", "pipeline", "export s (calib + conv)", "import s",
            "peak RSS MiB", ".tflite B", "lat 1thr ms", "lat 2thr ms",
            "float ops / Q+DQ / all", "SQNR dB", "digits acc %"]
  body = []
  for r in rows:
    if "error" in r:
      body.append([r["model"], LABEL[r["pipeline"]],
                   "ERROR: " + r["error"].splitlines()[0][:160]] +
                  [""] * (len(header) - 3))
      continue
    import_s = r.get("import_s", 0) + r.get("import_tf_s", 0)
    body.append([
        r["model"], LABEL[r["pipeline"]],
        f"{r['export_s']:.2f} ({r['calib_s']:.2f} + {r['convert_s']:.2f})",
        f"{import_s:.1f}", f"{r['rss_peak_mib']:.0f}", f"{r['bytes']:,}",
        _f(r.get("lat1_ms"), "{:.3f}"), _f(r.get("lat2_ms"), "{:.3f}"),
        f"{r['float_ops']} / {r['qdq']} / {r['ops']}",
        _f(r.get("sqnr_db"), "{:.1f}"), _f(r.get("acc"), "{:.2f}")])
  return md_table(header, body)


_PART_ORDER = ["calib:trace_jaxpr", "calib:build_plan", "calib:fold_static",
               "calib:jax_export_stablehlo", "calib:litert_converter",
               "calib:batches", "export:trace_jaxpr", "export:build_plan",
               "export:fold_static", "export:conversion_fn",
               "export:jax_export_stablehlo", "export:litert_converter",
               "export:inspect_tflite"]


def profile_table(rows) -> str:
  qrows = [r for r in rows if r["pipeline"] == "qlite" and "parts" in r]
  seen, uniq = set(), []
  for r in qrows:
    if r["model"] not in seen:
      seen.add(r["model"])
      uniq.append(r)
  qrows = uniq
  header = ["qlite stage (s)"] + [r["model"] for r in qrows]
  body = []
  for k in _PART_ORDER:
    vals = []
    for r in qrows:
      v = r["parts"].get(k)
      if k == "export:conversion_fn" and v is not None:
        v -= r["parts"].get("export:fold_static", 0.0)   # nested: the rest
      vals.append(_f(v, "{:.2f}"))
    label = {
        "export:conversion_fn": "export:weight scales (conversion_fn − "
                                "fold_static)",
        "calib:jax_export_stablehlo": "calib:jax_export (float .tflite with "
                                      "boundary outputs)",
        "calib:litert_converter": "calib:litert_converter (float)",
        "calib:batches": "calib:32 batches (LiteRT runs + statistics)",
    }.get(k, k)
    body.append([label] + vals)
  body.append(["= export total"] + [f"{r['export_s']:.2f}" for r in qrows])
  return md_table(header, body)


def peer_parts_table(rows) -> str:
  header = ["model", "pipeline", "export split (s)"]
  body = []
  for r in rows:
    if r["pipeline"] in ("tf", "qwix", "float") and "parts" in r:
      body.append([r["model"], LABEL[r["pipeline"]], ", ".join(
          f"{k} {v:.2f}" for k, v in r["parts"].items())])
  return md_table(header, body)


def scaling_table(srows) -> str:
  header = ["width", "params", "param MiB", "pipeline", "export s (calib + conv)",
            "peak RSS MiB", "RSS − baseline MiB", "(RSS − base) / params",
            "(RSS − base − fixed) / params", ".tflite B", "lat 2thr ms",
            "SQNR dB"]
  body = []
  # fixed overhead of a pipeline: its RSS growth at the smallest width
  # (jax / XLA runtime, the converter library's pages, LiteRT), where the
  # weights are negligible
  fixed = {}
  for r in sorted(srows, key=lambda r: r["params"]):
    if "error" not in r:
      fixed.setdefault(r["pipeline"],
                       r["rss_peak_mib"] - r["rss_baseline_mib"])
  for r in srows:
    pm = r["param_bytes"] / 2**20
    if "error" in r:
      body.append([f"{r['width']}x", f"{r['params']:,}", f"{pm:.1f}",
                   LABEL[r["pipeline"]], "ERROR: " +
                   r["error"].splitlines()[0][:160]] + [""] * 7)
      continue
    extra = r["rss_peak_mib"] - r["rss_baseline_mib"]
    body.append([f"{r['width']}x", f"{r['params']:,}", f"{pm:.1f}",
                 LABEL[r["pipeline"]],
                 f"{r['export_s']:.2f} ({r['calib_s']:.2f} + "
                 f"{r['convert_s']:.2f})", f"{r['rss_peak_mib']:.0f}",
                 f"{extra:.0f}", f"{extra / pm:.1f}x",
                 f"{(extra - fixed[r['pipeline']]) / pm:.1f}x",
                 f"{r['bytes']:,}",
                 _f(r.get("lat2_ms"), "{:.3f}"), _f(r.get("sqnr_db"),
                                                    "{:.1f}")])
  return md_table(header, body)


def versions() -> str:
  from importlib import metadata
  pk = ["jax", "jaxlib", "flax", "numpy", "litert-converter", "ai-edge-litert",
        "tensorflow-cpu", "keras", "qwix"]
  vs = []
  for p in pk:
    try:
      vs.append(f"{p} {metadata.version(p)}")
    except metadata.PackageNotFoundError:
      vs.append(f"{p} (not installed)")
  cpu = platform.processor() or ""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return (f"Python {platform.python_version()}; " + ", ".join(vs) +
          f"; qlite {_qlite_version()}.\nMachine: {cpu}, {os.cpu_count()} "
          f"CPUs, {platform.system()} {platform.release()}.")


def _qlite_version():
  try:
    sha = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain",
                            "--", "../qlite"], capture_output=True,
                           text=True).stdout.strip()
  except OSError:
    return "?"
  return f"@{sha}{' (+ uncommitted changes in qlite/)' if dirty else ''}"


# --------------------------------------------------------------------------

def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true",
                  help="digits CNN + MobileNetV2, 30 timed runs, no scaling")
  ap.add_argument("--models", nargs="+", choices=MODELS)
  ap.add_argument("--runs", type=int, help="timed invoke() runs per setting")
  ap.add_argument("--no-scaling", action="store_true")
  ap.add_argument("--out", default=os.path.join(HERE, "RESULTS_odml.md"))
  args = ap.parse_args(argv)
  models = args.models or (QUICK_MODELS if args.quick else MODELS)
  runs = args.runs or (30 if args.quick else 200)
  warmup = 5 if args.quick else 20
  scaling = not (args.quick or args.no_scaling)
  command = "python bench/odml.py" + "".join(
      f" {a}" for a in (argv if argv is not None else sys.argv[1:]))

  import _keras_models
  import _models
  t_all = time.perf_counter()
  rows, srows = [], []
  with tempfile.TemporaryDirectory(prefix="qlite-bench-") as work:
    for name in models:
      case = _models.build(name)
      path = os.path.join(work, f"{name}.pkl")
      case.save(path)
      model_rows = []
      for p in PIPELINES:
        if p == "tf" and case.family not in _keras_models.FAMILIES:
          continue
        res, blob = run_worker(p, path, work, name)
        model_rows.append(measure(case, p, res, blob))
      add_latencies(model_rows, runs, warmup)
      rows.extend(model_rows)
      for row in model_rows:
        p = row["pipeline"]
        print(f"[{time.perf_counter() - t_all:6.0f}s] {name:13s} {p:6s} "
              + (f"export {row['export_s']:.2f}s  {row['bytes']:,} B  "
                 f"lat2 {row['lat2_ms']:.3f} ms  SQNR {row['sqnr_db']:.1f} dB"
                 if "error" not in row else "ERROR " + row["error"][:200]),
              flush=True)
    if scaling:
      for w in SCALING_WIDTHS:
        name = f"transformer_x{w}"
        case = _models.build(name)
        path = os.path.join(work, f"{name}.pkl")
        case.save(path)
        params = int(sum(np.size(x) for x in
                         __import__("jax").tree_util.tree_leaves(
                             case.variables)))
        model_rows = []
        for p in SCALING_PIPELINES:
          res, blob = run_worker(p, path, work, name)
          row = measure(case, p, res, blob)
          row.update(width=w, params=params, param_bytes=case.param_bytes())
          model_rows.append(row)
        add_latencies(model_rows, max(20, runs // 4), 5)
        srows.extend(model_rows)
        for row in model_rows:
          p = row["pipeline"]
          print(f"[{time.perf_counter() - t_all:6.0f}s] {name:13s} {p:6s} "
                + (f"export {row['export_s']:.2f}s  peak RSS "
                   f"{row['rss_peak_mib']:.0f} MiB"
                   if "error" not in row else "ERROR " + row["error"][:200]),
                flush=True)

  total = time.perf_counter() - t_all
  report = render(rows, srows, models, command, runs, warmup, total)
  print()
  print(report)
  with open(args.out, "w") as f:
    f.write(report)
  print(f"\nwrote {os.path.relpath(args.out)}")
  if not args.quick:
    import _results
    section = report.replace("# ODML benchmark", "## ODML benchmark", 1)
    print(f"wrote {os.path.relpath(_results.write_section('odml', section))}")
  return 0


def render(rows, srows, models, command, runs, warmup, total) -> str:
  out = [
      "# ODML benchmark: qlite vs float, TensorFlow converter, qwix",
      "",
      f"Command: `{command}` (total {total:.0f} s).",
      "",
      versions(),
      "",
      "Latency: LiteRT `Interpreter.invoke()` (XNNPACK delegate, batch 1, "
      f"float model I/O), median of {runs} runs after {warmup} warm-up runs "
      f"(scaling rows: {max(20, runs // 4)}), the lowest of {ROUNDS} such "
      "medians taken in rounds interleaved across a model's pipelines (these "
      "models run in tens of microseconds; single medians moved by up to "
      "~1.6x between runs on this shared 2-CPU host). "
      "Export: fresh subprocess per pipeline; calibration of the same 32 "
      "batches + conversion, after imports and model construction (both "
      "reported apart). SQNR: LiteRT output vs float JAX on held-out inputs "
      "(digits: the 449-image test set; others: 64 rows at batch 1).",
      "",
      "Peers: TF = the same weights rebuilt in Keras (BatchNorm folded; "
      "float output checked against Flax below), "
      "`tf.lite.TFLiteConverter.from_keras_model` + representative dataset "
      "(the same 32 batches, row by row) + `TFLITE_BUILTINS_INT8`, float I/O; "
      "its calibration happens inside `convert()`, so its split is estimated "
      "with a float-only `convert()` right after. qwix = "
      "`OdmlQatProvider` calibration (qwix's default per-batch moving-average "
      "min/max; the step jitted; weights as jax arrays, since numpy weights "
      "stay float in qwix) then `OdmlConversionProvider` + the same "
      "litert-converter call qlite makes.",
      "",
      "## Ratios",
      "",
      ratio_table(rows, models),
      "",
      "## All pipelines",
      "",
      main_table(rows),
      "",
  ]
  acc = [r for r in rows if "acc_float_jax" in r]
  if acc:
    out += [f"Digits float JAX test accuracy: {acc[0]['acc_float_jax']:.2f} %.",
            ""]
  tf_rows = [r for r in rows if r["pipeline"] == "tf"
             and "keras_vs_flax_max_abs" in r]
  if tf_rows:
    out += ["Keras rebuild vs Flax float output (max abs diff, 16 rows): " +
            ", ".join(f"{r['model']} {r['keras_vs_flax_max_abs']:.1e}"
                      for r in tf_rows) + ".", ""]
  out += ["## Where qlite's export time goes (cold, seconds)", "",
          "Stages timed by wrapping qlite's own functions in the export "
          "subprocess (`bench/_export_worker.py`). Calibration (default "
          "engine) converts the float model with every boundary as an output "
          "and runs the batches in LiteRT; export converts the fake-quant "
          "model. `export:trace_jaxpr` is ~0 when calibration ran at the "
          "export's shapes (the trace is reused).", "",
          profile_table(rows + srows), "",
          "## Peer export splits (seconds)", "", peer_parts_table(rows), ""]
  if srows:
    out += ["## Scaling: transformer at 1x / 4x / 16x width", "",
            scaling_table(srows), "",
            "Baseline RSS: after imports and loading the case, before "
            "export (" + ", ".join(
                sorted({f"{r['rss_baseline_mib']:.0f} MiB"
                        for r in srows if "rss_baseline_mib" in r})) + "). "
            "Fixed overhead: each pipeline's RSS growth at 1x width, where "
            "the weights are negligible (jax / XLA runtime, the pages of the "
            "converter's 278 MiB library that a conversion touches, LiteRT); "
            "the issue's target is (RSS − base − fixed) / params <= 3x.", ""]
  ops = [r for r in rows if "hist" in r and r["pipeline"] != "float"]
  if ops:
    out += ["## int8 op histograms", ""]
    out += [f"- {r['model']} / {LABEL[r['pipeline']]}: " + ", ".join(
        f"{k}x{v}" for k, v in sorted(r["hist"].items())) for r in ops]
    out += [""]
  return "\n".join(out)


if __name__ == "__main__":
  sys.exit(main())
