"""Real-size benchmark: MobileNetV2 (alpha 1.0, 224x224), ResNet-50
(224x224), ViT-S/16 (224x224) and a BERT-style encoder (4 layers, d 512,
seq 128, LayerNorm eps 1e-12), random weights (bench/_real_size_models.py),
through qlite (default and with PTQ algorithms), qlite 16x8 (int16
activations, when qlite's int16 export works), TensorFlow's full-integer
converter on a Keras rebuild with the same weights, and the float model.

    python bench/real_size.py            # 4 models, 8 calibration batches
    python bench/real_size.py --quick    # MobileNetV2 + BERT, 2 batches

Each export runs in a fresh subprocess (export time and peak RSS of that
process); this process then measures LiteRT ``invoke()`` median latency
(XNNPACK, batch 1, 1 and 2 threads), the size, and the output SQNR against
the float JAX model on held-out inputs. Prints the table and writes
``bench/RESULTS_real_size.md``.
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

MODELS = ("mobilenet_v2", "resnet50", "vit_s16", "bert")
QUICK_MODELS = ("mobilenet_v2", "bert")
PIPELINES = ("float", "qlite", "qlite_ptq", "qlite_16x8", "tf")
LABEL = {"float": "float", "qlite": "qlite int8 (default)",
         "qlite_ptq": "qlite int8 + PTQ algorithms",
         "qlite_16x8": "qlite 16x8", "tf": "TF converter int8"}
# The algorithms of the "qlite_ptq" column (AdaRound is left out at real
# size: its per-layer fits take minutes per model on this machine).
PTQ_ALGORITHMS = ("smoothquant", "bias_correction")


# --------------------------------------------------------------------------
# worker: one export in a fresh process

def _rss_mib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024.0
  return float("nan")


def _export(pipeline, case, algorithms):
  import _real_size_models as rs
  import qlite
  model = rs.model(case.name)
  if pipeline == "float":
    return qlite.export_float_tflite(model, case.example_args,
                                     variables=case.variables)
  if pipeline == "tf":
    import tensorflow as tf
    kmodel = rs.keras_model(case.name, case.variables)
    kout = np.concatenate([np.asarray(kmodel(case.eval_x[i:i + 1]))
                           for i in range(min(2, len(case.eval_x)))])
    rel = float(np.max(np.abs(kout - case.ref[:len(kout)])) /
                np.max(np.abs(case.ref[:len(kout)])))
    if rel > 1e-3:
      raise RuntimeError(f"Keras rebuild differs from Flax (rel {rel:.3g})")

    def representative():
      for b in case.calib:
        yield [np.asarray(b, np.float32)]
    conv = tf.lite.TFLiteConverter.from_keras_model(kmodel)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return conv.convert()
  act = "int16" if pipeline == "qlite_16x8" else "int8"
  rules = [qlite.QuantizationRule(act_qtype=act)]
  if pipeline == "qlite_ptq":
    res = qlite.ptq.optimize(model, rules, case.calib, case.variables,
                             algorithms=algorithms)
    return qlite.export_tflite(res.model, rules, res.stats, case.example_args,
                               variables=res.variables)
  stats = qlite.calibrate(model, rules, case.calib, variables=case.variables,
                          progress=False)
  return qlite.export_tflite(model, rules, stats, case.example_args,
                             variables=case.variables)


def worker(argv) -> int:
  pipeline, case_path, out_tflite, out_json = argv[:4]
  algorithms = tuple(a for a in argv[4].split(",") if a) if len(argv) > 4 \
      else ()
  import traceback
  res = {"pipeline": pipeline}
  try:
    import _real_size_models as rs
    case = rs.Case.load(case_path)
    if pipeline == "tf":
      import tensorflow  # noqa: F401  (import time is not export time)
    else:
      import qlite  # noqa: F401
    t0 = time.perf_counter()
    blob = _export(pipeline, case, algorithms)
    res["export_s"] = time.perf_counter() - t0
    with open(out_tflite, "wb") as f:
      f.write(blob)
    res["bytes"] = len(blob)
  except Exception as e:
    res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    res["traceback"] = traceback.format_exc()[-3000:]
  res["rss_peak_mib"] = _rss_mib()
  with open(out_json, "w") as f:
    json.dump(res, f)
  return 0


# --------------------------------------------------------------------------
# measurements in this process

def latency_ms(blob: bytes, threads: int, runs: int) -> float:
  from ai_edge_litert.interpreter import Interpreter
  it = Interpreter(model_content=blob, num_threads=threads)
  it.allocate_tensors()
  rng = np.random.default_rng(0)
  for d in it.get_input_details():
    it.set_tensor(d["index"], rng.uniform(0, 1, d["shape"]).astype(
        d["dtype"]))
  it.invoke()
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    it.invoke()
    times.append(time.perf_counter() - t)
  return statistics.median(times) * 1e3


def sqnr(blob: bytes, case) -> float:
  import qlite
  runner = qlite.TFLiteRunner(blob, num_threads=2)
  out = np.concatenate([runner.run(case.eval_x[i:i + 1])[0]
                        for i in range(len(case.eval_x))])
  return qlite.metrics.sqnr_db(case.ref, out.reshape(case.ref.shape))


def full_integer(blob: bytes):
  import qlite
  try:
    return qlite.inspect_tflite(blob).full_integer
  except Exception:
    return None


def _f(x, fmt="{:.1f}"):
  return "–" if x is None else fmt.format(x)


def table(rows, models) -> str:
  head = ("| model | pipeline | SQNR vs float (dB) | latency 1 thr (ms) | "
          "latency 2 thr (ms) | vs TF (2 thr) | export (s) | peak RSS (MiB) "
          "| size (MiB) | full-integer |")
  lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
  for m in models:
    tf2 = rows.get((m, "tf"), {}).get("lat2")
    for p in PIPELINES:
      r = rows.get((m, p))
      if r is None:
        continue
      if "error" in r:
        lines.append(f"| {m} | {LABEL[p]} | {r['error'][:120]} |||||||")
        continue
      ratio = (f"{r['lat2'] / tf2:.2f}x" if tf2 and r.get("lat2") else "–")
      lines.append(
          f"| {m} | {LABEL[p]} | {_f(r.get('sqnr'))} | {_f(r.get('lat1'))} | "
          f"{_f(r.get('lat2'))} | {ratio} | {_f(r.get('export_s'))} | "
          f"{_f(r.get('rss_peak_mib'), '{:.0f}')} | "
          f"{r['bytes'] / 2**20:.1f} | {r.get('full_integer')} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] == "--worker":
    return worker(argv[1:])
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--models", nargs="*")
  ap.add_argument("--pipelines", nargs="*")
  ap.add_argument("--runs", type=int, default=None)
  a = ap.parse_args(argv)
  import _real_size_models as rs
  models = a.models or (QUICK_MODELS if a.quick else MODELS)
  pipelines = a.pipelines or PIPELINES
  calib_n, eval_n = (2, 2) if a.quick else (8, 4)
  runs = a.runs or (3 if a.quick else 5)
  rows = {}
  t_all = time.time()
  with tempfile.TemporaryDirectory() as tmp:
    for m in models:
      t = time.time()
      case = rs.build(m, calib_n=calib_n, eval_n=eval_n)
      path = os.path.join(tmp, f"{m}.pkl")
      case.save(path)
      print(f"{m}: case built in {time.time() - t:.0f} s", flush=True)
      for p in pipelines:
        out_t, out_j = (os.path.join(tmp, f"{m}.{p}.{e}")
                        for e in ("tflite", "json"))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", p,
               path, out_t, out_j, ",".join(PTQ_ALGORITHMS)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        try:
          with open(out_j) as f:
            r = json.load(f)
        except OSError:
          r = {"error": f"worker died (rc {proc.returncode}): "
                        f"{proc.stderr[-300:]}"}
        if "error" not in r:
          with open(out_t, "rb") as f:
            blob = f.read()
          r["sqnr"] = sqnr(blob, case)
          r["lat1"] = latency_ms(blob, 1, runs)
          r["lat2"] = latency_ms(blob, 2, runs)
          r["full_integer"] = full_integer(blob) if p != "float" else "–"
        rows[(m, p)] = r
        print(f"  {p:12s} " + (r["error"][:200] if "error" in r else
              f"{r['sqnr']:6.2f} dB  {r['lat1']:8.1f} / {r['lat2']:8.1f} ms"
              f"  export {r['export_s']:6.1f} s  RSS "
              f"{r['rss_peak_mib']:6.0f} MiB"), flush=True)
      if a.models is None and a.pipelines is None and m != models[-1]:
        _write(_render(rows, models, a, calib_n, eval_n, runs,
                       time.time() - t_all, partial=True))
  md = _render(rows, models, a, calib_n, eval_n, runs, time.time() - t_all)
  print(md)
  if a.models is None and a.pipelines is None:
    _write(md)
  else:
    print("(partial run: bench/RESULTS_real_size.md not written)")
  return 0


def _write(md: str) -> None:
  with open(os.path.join(HERE, "RESULTS_real_size.md"), "w") as f:
    f.write(md)


def _render(rows, models, a, calib_n, eval_n, runs, total,
            partial=False) -> str:
  """The results page (``partial``: written after each model, so a run cut
  short leaves what it measured)."""
  return "\n".join([
      "# qlite at real model sizes", "",
      f"Command: `python bench/real_size.py{' --quick' if a.quick else ''}`"
      f" ({total:.0f} s). Machine: {platform.machine()}, {os.cpu_count()} "
      f"cores **shared with 7 other jobs running at the same time**: the "
      f"latencies and export times are noisy upper bounds (median of "
      f"{runs} runs after 1 warm-up), ratios between columns of one model "
      f"are more telling than absolute numbers.", "",
      f"Random weights (BatchNorm statistics and LayerNorm scales "
      f"randomised), batch 1, float model I/O, {calib_n} calibration "
      f"batches, SQNR on {eval_n} held-out inputs vs the float JAX model. "
      f"`qlite int8 + PTQ algorithms`: `qlite.ptq.optimize(algorithms="
      f"{PTQ_ALGORITHMS})`. `qlite 16x8`: int16 activations, int8 weights "
      f"(an error in the row when this tree's int16 export fails). TF: "
      f"`TFLiteConverter` full-integer (TFLITE_BUILTINS_INT8) on a Keras "
      f"rebuild holding the same weights (BatchNorm folded). Export time "
      f"and peak RSS are of a fresh process per export (TF's includes "
      f"building the Keras model).", "",
      table(rows, models), "",
      "(run in progress: models not measured yet are missing)" if partial
      else ""])


if __name__ == "__main__":
  sys.exit(main())
