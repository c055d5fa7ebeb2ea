"""PTQ algorithms (qlite.ptq) measured on held-out data: LiteRT int8 output
SQNR vs the float model for each algorithm alone and combined, on the bench
models (bench/_models.py: 32 calibration batches, 64 held-out rows from
another seed) and more zoo models (their 8 calibration batches; 4 held-out
batches drawn with another seed), plus a small BERT-style encoder
(LayerNorm eps 1e-12, bench/_real_size_models.py).

    python bench/ptq_algorithms.py            # every model, every config
    python bench/ptq_algorithms.py --quick    # 3 models
    python bench/ptq_algorithms.py --softmax-forms [--models ...]

``--softmax-forms``: no PTQ algorithm; each model with a softmax exported
twice, its softmaxes as the int8 SOFTMAX kernel and in the exp / sum form of
qlite/ops/softmax.py (the evidence for ``SOFTMAX_EXP_ABOVE``); prints the
table, writes nothing. Besides the names above it takes ``zoo:<name>`` (the
zoo model's batches 0-3 calibrate, 4-7 are held out: token-id inputs) and the
real-size ``vit_s16`` / ``bert`` of bench/_real_size_models.py, optionally at
another size: ``vit_s16@176`` (image side), ``bert@256`` (tokens).

Prints the table and writes bench/RESULTS_ptq.md (the evidence for
qlite.ptq.DEFAULT_ALGORITHMS).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402

CONFIGS = {
    "none": (),
    "bias_correction": ("bias_correction",),
    "equalization": ("equalization",),
    "adaround": ("adaround",),
    "smoothquant": ("smoothquant",),
    "equalization+bias_correction": ("equalization", "bias_correction"),
    "all": ("equalization", "smoothquant", "adaround", "bias_correction"),
}
BENCH = ("digits_cnn", "mobilenet_v2", "resnet", "transformer", "unet")
ZOO = ("mlp_mixer/linen", "squeeze_excite/linen", "tcn/linen",
       "autoencoder/linen", "resnet/nnx")
EXTRA = ("bert_tiny",)
QUICK = ("resnet", "transformer", "bert_tiny")
OUT = os.path.join(HERE, "RESULTS_ptq.md")


class Item:
  """A model with calibration batches, held-out inputs and float outputs."""

  def __init__(self, name, model, variables, calib, example, eval_x, ref):
    self.name, self.model, self.variables = name, model, variables
    self.calib, self.example, self.eval_x, self.ref = (calib, example, eval_x,
                                                       ref)


def _bench_item(name):
  import _models
  case = _models.build(name)
  return Item(name, _models.flax_model(case), case.variables, case.calib,
              case.example_args, case.eval_x, case.ref)


def _zoo_item(name):
  from qlite.zoo import base, registry
  zm = registry.get(name)
  first = np.asarray(zm.batches[0])
  make = base.uniform_batches if first.min() >= 0 else base.normal_batches
  held = make(first.shape[1:], seed=12345, num=4, batch_size=first.shape[0])
  xs = np.concatenate(held)
  ref = _zoo_reference(zm, xs)
  return Item(name, zm.model, zm.variables if zm.framework == "linen" else None,
              list(zm.batches), (first[:1],), xs, ref)


def _zoo_reference(zm, xs):
  """The float outputs of zoo model ``zm`` on the rows of ``xs``, one row
  at a time."""
  import jax
  if zm.framework == "linen":
    fn = jax.jit(lambda x: zm.model.apply(zm.variables, x))
  else:
    fn = lambda x: zm.model(x)
  return np.concatenate([np.asarray(fn(xs[i:i + 1])) for i in range(len(xs))])


def _bert_item(name):
  import _real_size_models as rs
  return rs.bert_item(tiny=True)


def _zoo_split_item(name):
  from qlite.zoo import registry
  zm = registry.get(name)
  xs = np.concatenate([np.asarray(b) for b in zm.batches[4:]])
  ref = _zoo_reference(zm, xs)
  return Item(name, zm.model, zm.variables if zm.framework == "linen" else None,
              list(zm.batches[:4]), (np.asarray(zm.batches[0])[:1],), xs, ref)


def _real_size_item(name):
  import _real_size_models as rs
  base, _, size = name.partition("@")
  if size:
    make, shape, kind = rs.SPECS[base]
    shape = (int(size), int(size), 3) if base == "vit_s16" else (
        int(size), shape[1])
    rs.SPECS[name] = (make, shape, kind)
  case = rs.build(name)
  return Item(name, rs.model(name), case.variables, case.calib,
              case.example_args, case.eval_x, case.ref)


def build(name) -> Item:
  if name.startswith("zoo:"):
    return _zoo_split_item(name[4:])
  if name.partition("@")[0] in ("vit_s16", "bert"):
    return _real_size_item(name)
  if name in BENCH:
    return _bench_item(name)
  if name in EXTRA:
    return _bert_item(name)
  return _zoo_item(name)


def litert_sqnr(blob, item) -> float:
  import qlite
  runner = qlite.TFLiteRunner(blob, num_threads=2)
  out = np.concatenate([runner.run(item.eval_x[i:i + 1])[0]
                        for i in range(len(item.eval_x))])
  return qlite.metrics.sqnr_db(item.ref, out)


def run(item, algorithms) -> dict:
  import qlite
  rules = [qlite.QuantizationRule()]
  t = time.perf_counter()
  res = qlite.ptq.optimize(item.model, rules, item.calib, item.variables,
                           algorithms=algorithms)
  t_opt = time.perf_counter() - t
  blob = qlite.export_tflite(res.model, rules, res.stats, item.example,
                             variables=res.variables)
  noop = all(line.split(":")[1].strip().startswith("no ")
             for line in res.report) if res.report else not algorithms
  return dict(sqnr=litert_sqnr(blob, item), time=t_opt, noop=noop,
              report=res.report)


def table(rows, names) -> str:
  head = "| model | " + " | ".join(CONFIGS) + " |"
  sep = "|---|" + "---:|" * len(CONFIGS)
  lines = [head, sep]
  for n in names:
    base = rows.get((n, "none"), {}).get("sqnr")
    cells = []
    for c in CONFIGS:
      r = rows.get((n, c))
      if r is None:
        cells.append("–")
      elif c == "none":
        cells.append(f"{r['sqnr']:.2f}")
      elif r["noop"]:
        cells.append("n/a")
      else:
        cells.append(f"{r['sqnr']:.2f} ({r['sqnr'] - base:+.2f}; "
                     f"{r['time']:.0f} s)")
    lines.append(f"| {n} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def summary(rows, names) -> str:
  lines = ["| config | models changed | mean gain (dB) | min | max | "
           "wins (> +0.1 dB) | losses (< -0.1 dB) |", "|---|---:|---:|---:|"
           "---:|---:|---:|"]
  for c in CONFIGS:
    if c == "none":
      continue
    gains = [rows[(n, c)]["sqnr"] - rows[(n, "none")]["sqnr"] for n in names
             if (n, c) in rows and (n, "none") in rows
             and not rows[(n, c)]["noop"]]
    if not gains:
      lines.append(f"| {c} | 0 | – | – | – | – | – |")
      continue
    lines.append(f"| {c} | {len(gains)} | {np.mean(gains):+.2f} | "
                 f"{min(gains):+.2f} | {max(gains):+.2f} | "
                 f"{sum(g > 0.1 for g in gains)} | "
                 f"{sum(g < -0.1 for g in gains)} |")
  return "\n".join(lines)


SOFTMAX_MODELS = ("zoo:moe/linen", "zoo:causal_lm/linen", "zoo:causal_lm/nnx",
                  "transformer", "zoo:transformer/linen",
                  "zoo:transformer/nnx", "bert_tiny", "vit_s16@128", "bert@64",
                  "vit_s16@176", "bert", "vit_s16", "bert@256")


def softmax_forms(names) -> str:
  """LiteRT SQNR with every softmax as the SOFTMAX kernel vs the exp form."""
  from qlite.ops import softmax
  from qlite.trace import graph
  lengths = set()
  exp_form, kernel = softmax.softmax_exp, softmax._softmax_composite

  def spy(fn):
    def f(x):
      lengths.add(x.shape[-1])
      return fn(x)
    return f

  softmax.softmax_exp, softmax._softmax_composite = spy(exp_form), spy(kernel)
  above = softmax.SOFTMAX_EXP_ABOVE
  lines = ["| model | softmax row length | SOFTMAX kernel (dB) | exp form (dB) "
           "| exp - kernel (dB) | default |", "|---|---|---:|---:|---:|---|"]
  try:
    for n in names:
      item = build(n)
      res = []
      for thr in (10**9, 0):
        softmax.SOFTMAX_EXP_ABOVE = thr
        lengths.clear()
        graph._TRACE_CACHE.clear()
        graph._FOLD_CACHE.clear()
        res.append(run(item, ())["sqnr"])
      ls = sorted(lengths)
      uses = "exp form" if ls and max(ls) > above else "kernel"
      line = (f"| {n} | {', '.join(map(str, ls))} | {res[0]:.2f} | "
              f"{res[1]:.2f} | {res[1] - res[0]:+.2f} | {uses} |")
      print(line, flush=True)
      lines.append(line)
  finally:
    softmax.SOFTMAX_EXP_ABOVE = above
    softmax.softmax_exp, softmax._softmax_composite = exp_form, kernel
    graph._TRACE_CACHE.clear()
    graph._FOLD_CACHE.clear()
  return "\n".join(lines)


def _save(path, rows) -> dict:
  """Merges ``rows`` into the JSON file at ``path``; returns all rows."""
  import json
  old = {}
  if os.path.exists(path):
    with open(path) as f:
      old = {tuple(k.split("|")): v for k, v in json.load(f).items()}
  old.update(rows)
  with open(path, "w") as f:
    json.dump({"|".join(k): v for k, v in old.items()}, f)
  return old


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--models", nargs="*")
  ap.add_argument("--configs", nargs="*")
  ap.add_argument("--merge", metavar="JSON",
                  help="keep rows in this file and render every row in it "
                       "(runs split over several invocations)")
  ap.add_argument("--render-only", action="store_true",
                  help="with --merge: render the saved rows, run nothing")
  ap.add_argument("--softmax-forms", action="store_true",
                  help="SOFTMAX kernel vs exp form, no PTQ (writes nothing)")
  a = ap.parse_args(argv)
  if a.softmax_forms:
    print(softmax_forms(a.models or SOFTMAX_MODELS))
    return 0
  names = a.models or (list(QUICK) if a.quick else
                       list(BENCH) + list(ZOO) + list(EXTRA))
  configs = a.configs or list(CONFIGS)
  rows = {}
  t0 = time.time()
  for n in ([] if a.render_only else names):
    if a.merge:
      _save(a.merge, rows)
    item = build(n)
    for c in configs:
      try:
        rows[(n, c)] = run(item, CONFIGS[c])
      except Exception as e:   # a failing config is a result too
        print(f"{n} {c}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        continue
      r = rows[(n, c)]
      print(f"{n:24s} {c:26s} {r['sqnr']:7.2f} dB  {r['time']:6.1f} s"
            f"{'  (no-op)' if r['noop'] else ''}", flush=True)
  if a.merge:
    rows = _save(a.merge, rows)
    names = list(dict.fromkeys(k[0] for k in rows))
  md = ["# qlite PTQ algorithms on held-out data", "",
        f"Command: `python bench/ptq_algorithms.py{' --quick' if a.quick else ''}`"
        f" ({time.time() - t0:.0f} s). Machine: {platform.machine()}, "
        f"{os.cpu_count()} cores shared with other jobs (times are "
        f"indicative only).", "",
        "LiteRT int8 output SQNR (dB) vs the float model on held-out inputs "
        "(not the calibration batches); in brackets the gain over `none` "
        "(plain min/max calibration) and the time of `qlite.ptq.optimize` "
        "(calibrations included). `n/a`: the algorithm finds nothing to "
        "change in that model. Random-weight models.", "",
        table(rows, names), "", "## Per config", "",
        summary(rows, names), ""]
  text = "\n".join(md)
  print(text)
  with open(OUT, "w") as f:
    f.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
