"""Real-size benchmark: MobileNetV2 (alpha 1.0, 224x224), ResNet-50
(224x224), ViT-S/16 (224x224) and a BERT-style encoder (4 layers, d 512,
seq 128, LayerNorm eps 1e-12), random weights (bench/_real_size_models.py),
through qlite (default and with PTQ algorithms), qlite 16x8 (int16
activations, when qlite's int16 export works), TensorFlow's full-integer
converter on a Keras rebuild with the same weights, and the float model.

    python bench/real_size.py            # 4 models, 8 calibration batches
    python bench/real_size.py --quick    # MobileNetV2 + BERT, 2 batches

    python bench/real_size.py --models vit_s16 --keep /tmp/vit --out x.md

Each export runs in a fresh subprocess (export time and peak RSS of that
process); when a model's exports are done, this process measures the size,
the output SQNR against the float JAX model on held-out inputs, which ops
LiteRT's XNNPACK delegate leaves to the builtin kernels
(``qlite.inspect_tflite(blob).delegation``), and the LiteRT ``invoke()``
latency (XNNPACK, batch 1, 1 and 2 threads) of all pipelines interleaved,
round after round, so that their ratios are measured side by side (see
:func:`interleaved_latency_ms`). The page states the machine's load average
(``os.getloadavg()``) at the start, the end and around each model's
latency rounds. Prints the table and writes ``bench/RESULTS_real_size.md``
(a full run) or ``--out``; ``--keep DIR`` keeps the ``.tflite`` files and a
``results.json`` with every per-round median.
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
# The algorithms of the "qlite_ptq" column: qlite.ptq.DEFAULT_ALGORITHMS,
# the one default measured not to lose on the held-out zoo / bench models
# (bench/RESULTS_ptq.md; SmoothQuant loses 0.3 dB on two of them). Real
# size with it (issue 17): ViT-S/16 27.2, BERT 10.2, MobileNetV2 39.8,
# ResNet-50 39.3 dB; with smoothquant too 29.4 / 10.1 / 39.8 / 39.3 dB.
PTQ_ALGORITHMS = ("bias_correction",)


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

def _interpreter(blob: bytes, threads: int):
  from ai_edge_litert.interpreter import Interpreter
  it = Interpreter(model_content=blob, num_threads=threads)
  it.allocate_tensors()
  rng = np.random.default_rng(0)
  for d in it.get_input_details():
    it.set_tensor(d["index"], rng.uniform(0, 1, d["shape"]).astype(
        d["dtype"]))
  return it


def _timed_invokes(it, n: int) -> list[float]:
  times = []
  for _ in range(n):
    t = time.perf_counter()
    it.invoke()
    times.append(time.perf_counter() - t)
  return times


def interleaved_latency_ms(blobs: dict, threads: int, *, rounds: int = 5,
                           budget_s: float = 5.0, min_runs: int = 3,
                           max_runs: int = 200, runs: int | None = None,
                           log=print) -> dict:
  """Median ``invoke()`` latency of every blob, measured side by side.

  One interpreter per blob (``threads`` threads, default XNNPACK delegate,
  one untimed warm-up invoke: XNNPACK packs its weights there). Then
  ``rounds`` rounds; each round times every blob in turn (the order rotates
  from round to round), each for its share of its runs, so that a change of
  machine load hits every pipeline alike. A blob's runs: ``runs`` if given,
  else as many as fit ``budget_s`` at the warm-up's speed (an upper bound),
  within ``[min_runs, max_runs]``, spread evenly over the rounds; a slow
  blob (seconds per invoke) stops after ``min_runs`` runs, one per round.
  Returns ``{name: {"ms": median over its per-round medians, "runs":
  invokes timed, "rounds": the per-round medians (ms)}}``.
  """
  its, target = {}, {}
  for name, blob in blobs.items():
    its[name] = _interpreter(blob, threads)
    t = time.perf_counter()
    its[name].invoke()   # warm-up: XNNPACK packs its weights here
    warm = time.perf_counter() - t   # so an upper bound on one invoke
    target[name] = runs or max(min_runs, min(max_runs,
                                             int(budget_s / max(warm, 1e-6))))
  per_round = {n: -(-target[n] // rounds) for n in its}
  done = {n: 0 for n in its}
  by_round = {n: [] for n in its}
  names = list(its)
  r = 0
  while any(done[n] < target[n] for n in names):
    order = names[r % len(names):] + names[:r % len(names)]
    for n in order:
      k = min(per_round[n], target[n] - done[n])
      if k > 0:
        by_round[n].append(statistics.median(_timed_invokes(its[n], k)) * 1e3)
        done[n] += k
    r += 1
  del its
  out = {}
  for n in names:
    out[n] = {"ms": statistics.median(by_round[n]), "runs": done[n],
              "rounds": [round(x, 4) for x in by_round[n]]}
  log(f"    {threads} thr: " + ", ".join(
      f"{n} {v['ms']:.2f} ms ({v['runs']} runs, {len(v['rounds'])} rounds)"
      for n, v in out.items()))
  return out


def latency_ms(blob: bytes, threads: int, runs: int) -> float:
  """Median ``invoke()`` latency of one blob (``runs`` timed runs)."""
  return interleaved_latency_ms({"m": blob}, threads, runs=runs,
                                log=lambda s: None)["m"]["ms"]


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


def delegation(blob: bytes) -> dict:
  """XNNPACK's split of the model: ops, partitions, the ops it leaves to
  the builtin kernels (``qlite.inspect_tflite(blob).delegation``)."""
  import qlite
  try:
    d = qlite.inspect_tflite(blob).delegation
  except Exception as e:
    return {"error": f"{type(e).__name__}: {e}"}
  return {"ops": d.num_ops, "partitions": d.num_partitions,
          "builtin": len(d.builtin_ops), "builtin_ops": d.builtin_histogram,
          "summary": d.summary(), "xnnpack_error": d.error}


def _f(x, fmt="{:.1f}"):
  return "–" if x is None else fmt.format(x)


def _lat(x):
  return "–" if x is None else (
      f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 10 else f"{x:.1f}")


def _ratio(r, base, key):
  a, b = r.get(key), (base or {}).get(key)
  return f"{a / b:.2f}x" if a and b else "–"


def _builtin(r, top=3) -> str:
  d = r.get("delegation") or {}
  if "error" in d:
    return "?"
  if not d:
    return "–"
  head = f"{d['builtin']}/{d['ops']} ({d['partitions']} part.)"
  names = list(d["builtin_ops"].items())
  more = ", …" if len(names) > top else ""
  return head + ("" if not names else ": " + ", ".join(
      f"{k} x{v}" for k, v in names[:top]) + more)


def table(rows, models) -> str:
  head = ("| model | pipeline | SQNR vs float (dB) | latency 1 thr (ms) | "
          "latency 2 thr (ms) | vs TF (1 / 2 thr) | vs float (1 / 2 thr) | "
          "ops on builtin kernels (XNNPACK) | export (s) | peak RSS (MiB) | "
          "size (MiB) | full-integer |")
  lines = [head, "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
  for m in models:
    tf, fl = rows.get((m, "tf")), rows.get((m, "float"))
    for p in PIPELINES:
      r = rows.get((m, p))
      if r is None:
        continue
      if "error" in r:
        lines.append(f"| {m} | {LABEL[p]} | {r['error'][:120]} "
                     f"||||||||||")
        continue
      vs_tf = (f"{_ratio(r, tf, 'lat1')} / {_ratio(r, tf, 'lat2')}"
               if p != "tf" else "1.00x")
      vs_fl = (f"{_ratio(r, fl, 'lat1')} / {_ratio(r, fl, 'lat2')}"
               if p != "float" else "1.00x")
      lines.append(
          f"| {m} | {LABEL[p]} | {_f(r.get('sqnr'))} | {_lat(r.get('lat1'))} "
          f"| {_lat(r.get('lat2'))} | {vs_tf} | {vs_fl} | {_builtin(r)} | "
          f"{_f(r.get('export_s'))} | "
          f"{_f(r.get('rss_peak_mib'), '{:.0f}')} | "
          f"{r['bytes'] / 2**20:.1f} | {r.get('full_integer')} |")
  return "\n".join(lines)


def _load() -> tuple:
  try:
    return tuple(round(x, 2) for x in os.getloadavg())
  except OSError:
    return (float("nan"),) * 3


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] == "--worker":
    return worker(argv[1:])
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--models", nargs="*")
  ap.add_argument("--pipelines", nargs="*")
  ap.add_argument("--runs", type=int, default=None,
                  help="time exactly N invokes per blob and thread count "
                  "(default: adaptive, see --budget-s)")
  ap.add_argument("--rounds", type=int, default=5,
                  help="interleaved rounds (each times every pipeline)")
  ap.add_argument("--budget-s", type=float, default=5.0,
                  help="timed invokes per blob and thread count: as many as "
                  "fit this many seconds (at least --min-runs)")
  ap.add_argument("--min-runs", type=int, default=3)
  ap.add_argument("--max-runs", type=int, default=200)
  ap.add_argument("--keep", metavar="DIR",
                  help="keep the .tflite files (<model>.<pipeline>.tflite) "
                  "and results.json there")
  ap.add_argument("--out", metavar="MD",
                  help="write the results page there (default: "
                  "bench/RESULTS_real_size.md on a full run, nothing on a "
                  "run limited by --models / --pipelines)")
  a = ap.parse_args(argv)
  import _real_size_models as rs
  models = a.models or (QUICK_MODELS if a.quick else MODELS)
  pipelines = a.pipelines or PIPELINES
  calib_n, eval_n = (2, 2) if a.quick else (8, 4)
  out_md = a.out or (os.path.join(HERE, "RESULTS_real_size.md")
                     if a.models is None and a.pipelines is None else None)
  timing = dict(rounds=a.rounds, budget_s=a.budget_s, min_runs=a.min_runs,
                max_runs=a.max_runs, runs=a.runs)
  rows = {}
  loads = {"start": _load()}
  print(f"load average at start (1/5/15 min): {loads['start']}, "
        f"{os.cpu_count()} cores", flush=True)
  t_all = time.time()
  with tempfile.TemporaryDirectory() as tmp:
    blob_dir = a.keep or tmp
    os.makedirs(blob_dir, exist_ok=True)
    for m in models:
      t = time.time()
      case = rs.build(m, calib_n=calib_n, eval_n=eval_n)
      path = os.path.join(tmp, f"{m}.pkl")
      case.save(path)
      print(f"{m}: case built in {time.time() - t:.0f} s", flush=True)
      blobs = {}
      for p in pipelines:   # every export first, a fresh process each
        out_t, out_j = (os.path.join(blob_dir, f"{m}.{p}.{e}")
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
            blobs[p] = f.read()
          r["sqnr"] = sqnr(blobs[p], case)
          r["full_integer"] = full_integer(blobs[p]) if p != "float" else "–"
          r["delegation"] = delegation(blobs[p])
        rows[(m, p)] = r
        print(f"  {p:12s} " + (r["error"][:200] if "error" in r else
              f"{r['sqnr']:6.2f} dB  export {r['export_s']:6.1f} s  RSS "
              f"{r['rss_peak_mib']:6.0f} MiB  "
              f"{r['delegation'].get('summary', r['delegation'])}"),
              flush=True)
      # then the latencies, all pipelines side by side
      load0 = _load()
      for threads, key in ((1, "lat1"), (2, "lat2")):
        lat = interleaved_latency_ms(blobs, threads, **timing)
        for p, v in lat.items():
          rows[(m, p)][key] = v["ms"]
          rows[(m, p)][f"{key}_runs"] = v["runs"]
          rows[(m, p)][f"{key}_rounds"] = v["rounds"]
      loads[m] = (load0, _load())
      print(f"  load average before / after its latencies: {load0} / "
            f"{loads[m][1]}", flush=True)
      if out_md and m != models[-1]:
        _write(out_md, _render(rows, models, a, calib_n, eval_n, loads,
                               time.time() - t_all, partial=True))
      if a.keep:
        _dump(os.path.join(a.keep, "results.json"), rows, loads)
  loads["end"] = _load()
  md = _render(rows, models, a, calib_n, eval_n, loads, time.time() - t_all)
  print(md)
  if out_md:
    _write(out_md, md)
    print(f"wrote {out_md}")
  else:
    print("(partial run: bench/RESULTS_real_size.md not written)")
  if a.keep:
    _dump(os.path.join(a.keep, "results.json"), rows, loads)
  return 0


def _dump(path, rows, loads) -> None:
  with open(path, "w") as f:
    json.dump({"rows": [dict(r, model=m, pipeline=p)
                        for (m, p), r in rows.items()],
               "load_average": loads}, f, indent=1, default=str)


def _write(path: str, md: str) -> None:
  with open(path, "w") as f:
    f.write(md)


def _command(a) -> str:
  parts = ["python bench/real_size.py"]
  if a.quick:
    parts.append("--quick")
  for flag, v in (("--models", a.models), ("--pipelines", a.pipelines)):
    if v:
      parts.append(f"{flag} {' '.join(v)}")
  for flag, v, default in (("--runs", a.runs, None),
                           ("--rounds", a.rounds, 5),
                           ("--budget-s", a.budget_s, 5.0),
                           ("--min-runs", a.min_runs, 3),
                           ("--max-runs", a.max_runs, 200)):
    if v != default:
      parts.append(f"{flag} {v}")
  return " ".join(parts)


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.system()


def _load_text(loads, total) -> str:
  """What the machine was doing, from ``os.getloadavg()`` (measured, not
  assumed)."""
  cores = os.cpu_count() or 1
  start, end = loads.get("start"), loads.get("end")
  per_model = [(m, v) for m, v in loads.items() if m not in ("start", "end")]
  peak = max([x[0] for _, v in per_model for x in v] +
             [x[0] for x in (start, end) if x])
  text = (f"Load average (1 / 5 / 15 min, `os.getloadavg()`) at the start: "
          f"{'/'.join(str(x) for x in start)}"
          + (f", at the end: {'/'.join(str(x) for x in end)}" if end else "")
          + ". 1-minute load before / after each model's latency rounds: "
          + ", ".join(f"{m} {v[0][0]} / {v[1][0]}" for m, v in per_model)
          + f" on {cores} cores (this benchmark's own timing thread(s) count "
          f"in it: 1 while timing 1 thread, 2 while timing 2).")
  if peak > 0.75 * cores + 2:
    text += (f" **The machine was loaded (1-minute load up to {peak} on "
             f"{cores} cores): the latencies are upper bounds, the ratios "
             f"between pipelines of one model (timed in the same rounds) "
             f"are the telling figures.**")
  elif peak > cores:
    text += (f" The 1-minute load reached {peak} on {cores} cores: "
             f"latencies at 2 threads may be inflated; ratios between "
             f"pipelines of one model are measured side by side.")
  else:
    text += (f" The 1-minute load stayed at or below {peak} on {cores} "
             f"cores.")
  return text


def _render(rows, models, a, calib_n, eval_n, loads, total,
            partial=False) -> str:
  """The results page (``partial``: written after each model, so a run cut
  short leaves what it measured)."""
  if a.runs:
    runs = f"{a.runs} timed invokes per blob and thread count"
  else:
    runs = (f"as many timed invokes per blob and thread count as fit "
            f"{a.budget_s:g} s, {a.min_runs} to {a.max_runs}")
  return "\n".join([
      "# qlite at real model sizes", "",
      f"Command: `{_command(a)}` ({total:.0f} s). Machine: "
      f"{platform.machine()}, {os.cpu_count()} cores, "
      f"{_cpu_name()}. {_load_text(loads, total)}",
      "",
      f"Latency: LiteRT `invoke()` with its default XNNPACK delegate, batch "
      f"1, after one warm-up invoke. All pipelines of a model are exported "
      f"first, then timed interleaved: {a.rounds} rounds, each timing every "
      f"pipeline in turn (rotating order), {runs}; the figure is the median "
      f"of the per-round medians. `vs TF` / `vs float`: latency ratio to "
      f"the TF converter's / the float model's row, same thread count. "
      f"`ops on builtin kernels`: ops XNNPACK does not take (they run on "
      f"LiteRT's builtin kernels; `qlite.inspect_tflite(blob).delegation`, "
      f"`qlite inspect FILE`), count / all ops, the most frequent, with "
      f"the number of XNNPACK partitions (`0/n (1 part.)`: fully "
      f"delegated).", "",
      f"Random weights (BatchNorm statistics and LayerNorm scales "
      f"randomised), float model I/O, {calib_n} calibration "
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
