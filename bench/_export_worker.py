"""One cold export in a fresh process (run by ``bench/odml.py``).

    python bench/_export_worker.py PIPELINE CASE.pkl OUT.tflite OUT.json
        [--cprofile OUT.txt]

PIPELINE: ``float`` (litert-converter, no quantization), ``qlite`` (int8),
``tf`` (Keras rebuild + tf.lite.TFLiteConverter full-integer), ``qwix``
(qwix 0.1.8 ODML providers + litert-converter).

Writes the ``.tflite`` and a JSON of timings (seconds), peak RSS and errors.
Export time = calibration (of the case's 32 batches) + conversion, measured
after imports and model construction (those are reported separately).
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import collections  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore")


def _rss_mib() -> float:
  """Peak RSS of this process in MiB: VmHWM (reset by exec, unlike
  getrusage's ru_maxrss, which a child inherits from its parent's fork)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Timers:
  """Accumulating wall-clock timers wrapped around library functions."""

  def __init__(self):
    self.s = collections.defaultdict(float)
    self.n = collections.defaultdict(int)

  def wrap(self, owner, attr: str, key: str):
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def timed(*a, **k):
      t = time.perf_counter()
      try:
        return fn(*a, **k)
      finally:
        self.s[key] += time.perf_counter() - t
        self.n[key] += 1
    setattr(owner, attr, timed)


def _profile_qlite(timers: Timers):
  """Times qlite's export stages by wrapping its module functions (the same
  code runs; only timers are added)."""
  from qlite.trace import graph
  from qlite.litert import providers
  from qlite.litert import inspect as inspect_lib
  from qlite.litert import convert as litert
  timers.wrap(graph, "trace", "trace_jaxpr")
  timers.wrap(providers, "build_plan", "build_plan")
  timers.wrap(graph, "fold_static", "fold_static")
  timers.wrap(providers.ConversionProvider, "function", "conversion_fn")
  timers.wrap(litert, "stablehlo_bytecode", "jax_export_stablehlo")
  timers.wrap(litert, "convert_stablehlo", "litert_converter")
  timers.wrap(inspect_lib, "inspect_tflite", "inspect_tflite")
  timers.wrap(litert, "set_int8_io", "set_int8_io")


def _qlite(case, model, res, timers):
  import qlite
  rules = [qlite.QuantizationRule(module_path=r".*", weight_qtype="int8",
                                  act_qtype="int8", act_static_scale=True)]
  _profile_qlite(timers)
  t0 = time.perf_counter()
  stats = qlite.calibrate(model, rules, case.calib, variables=case.variables,
                          progress=False)
  t1 = time.perf_counter()
  calib_parts = dict(timers.s)
  blob = qlite.export_tflite(model, rules, stats, case.example_args,
                             variables=case.variables, strict=False)
  t2 = time.perf_counter()
  res["calib_s"], res["convert_s"] = t1 - t0, t2 - t1
  parts = {}
  for k, v in timers.s.items():
    c = calib_parts.get(k, 0.0)
    if c:
      parts[f"calib:{k}"] = c
    if v - c > 0:
      parts[f"export:{k}"] = v - c
  # the rest of calibration: running the 32 batches and their statistics
  parts["calib:batches"] = res["calib_s"] - sum(calib_parts.values())
  res["parts"] = parts
  return blob


def _float(case, model, res, timers):
  import qlite
  from qlite.litert import convert as litert
  timers.wrap(litert, "stablehlo_bytecode", "jax_export_stablehlo")
  timers.wrap(litert, "convert_stablehlo", "litert_converter")
  t0 = time.perf_counter()
  blob = qlite.export_float_tflite(model, case.example_args,
                                   variables=case.variables)
  res["calib_s"], res["convert_s"] = 0.0, time.perf_counter() - t0
  res["parts"] = dict(timers.s)
  return blob


def _qwix(case, model, res, timers):
  import jax
  import _qwix_path
  variables = _qwix_path.as_jax(case.variables)
  parts = {}
  t0 = time.perf_counter()
  stats = _qwix_path.calibrate(model, variables, case.calib, parts)
  t1 = time.perf_counter()
  blob = _qwix_path.export(model, variables, stats, case.example_args, parts)
  t2 = time.perf_counter()
  res["calib_s"], res["convert_s"] = t1 - t0, t2 - t1
  res["parts"] = parts
  del jax
  return blob


def _tf(case, model, res, timers):
  import numpy as np
  t0 = time.perf_counter()
  import tensorflow as tf
  import _keras_models
  res["import_tf_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  kmodel = _keras_models.build(case.family, case.variables,
                               case.example_args[0].shape)
  n = min(16, len(case.eval_x))
  kout = np.concatenate([np.asarray(kmodel(case.eval_x[i:i + 1]))
                         for i in range(n)])
  diff = float(np.max(np.abs(kout - case.ref[:n])))
  res["keras_build_s"] = time.perf_counter() - t0
  res["keras_vs_flax_max_abs"] = diff
  res["keras_vs_flax_rel"] = diff / float(np.max(np.abs(case.ref[:n])))
  if res["keras_vs_flax_rel"] > 1e-4:
    raise RuntimeError(f"Keras rebuild differs from Flax by {diff:.3g} "
                       f"(max abs); not quantizing it")

  def representative():
    for b in case.calib:
      for i in range(len(b)):
        yield [np.asarray(b[i:i + 1], np.float32)]

  t0 = time.perf_counter()
  conv = tf.lite.TFLiteConverter.from_keras_model(kmodel)
  conv.optimizations = [tf.lite.Optimize.DEFAULT]
  conv.representative_dataset = representative
  conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  blob = conv.convert()
  t1 = time.perf_counter()
  # TF does calibration inside convert(); a float-only convert() right after
  # estimates the conversion share (warm, so an underestimate).
  fconv = tf.lite.TFLiteConverter.from_keras_model(kmodel)
  fconv.convert()
  t_float = time.perf_counter() - t1
  total = t1 - t0
  res["convert_total_s"] = total
  res["calib_s"] = max(0.0, total - t_float)
  res["convert_s"] = min(total, t_float)
  res["parts"] = {"convert() int8 total": total,
                  "float convert() after (conversion estimate)": t_float}
  return blob


PIPELINES = {"qlite": _qlite, "float": _float, "qwix": _qwix, "tf": _tf}


def main(argv):
  pipeline, case_path, out_tflite, out_json = argv[:4]
  cprofile_out = argv[argv.index("--cprofile") + 1] \
      if "--cprofile" in argv else None
  res = {"pipeline": pipeline}
  timers = Timers()
  try:
    t0 = time.perf_counter()
    import jax  # noqa: F401
    import numpy as np  # noqa: F401
    import qlite  # noqa: F401
    import _models
    if pipeline == "qwix":
      import qwix  # noqa: F401
    res["import_s"] = time.perf_counter() - t0
    case = _models.Case.load(case_path)
    model = _models.flax_model(case)
    res["rss_baseline_mib"] = _rss_mib()
    prof = None
    if cprofile_out:
      import cProfile
      prof = cProfile.Profile()
      prof.enable()
    t0 = time.perf_counter()
    blob = PIPELINES[pipeline](case, model, res, timers)
    res["export_s"] = res["calib_s"] + res["convert_s"]
    res["wall_in_fn_s"] = time.perf_counter() - t0
    if prof is not None:
      prof.disable()
      import io
      import pstats
      s = io.StringIO()
      pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(40)
      with open(cprofile_out, "w") as f:
        f.write(s.getvalue())
    with open(out_tflite, "wb") as f:
      f.write(blob)
    res["bytes"] = len(blob)
  except Exception as e:   # recorded in the table, not fatal to the bench
    res["error"] = f"{type(e).__name__}: {e}"
    res["traceback"] = traceback.format_exc()[-4000:]
  res["rss_peak_mib"] = _rss_mib()
  res["process_wall_s"] = time.perf_counter() - T_START
  with open(out_json, "w") as f:
    json.dump(res, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1:])
