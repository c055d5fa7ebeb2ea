"""16x8 (int16 activations, int8 weights) against int8 on the bench models
and a few zoo models: full-integer, LiteRT SQNR vs float on held-out rows,
size, and the ceiling int8 weights put on any activation width (the float
model with only its weights rounded to int8, in JAX).

Models with an op LiteRT has no 16x8 kernel for (CONCATENATION,
GATHER_ND: docs/litert_int16_ops.md) run mixed: the rules below keep those
ops (or the op a pass-through gather reads) int8, the rest int16.

    python bench/int16_models.py            # writes bench/RESULTS_int16.md
    python bench/int16_models.py resnet     # some models only, no file
"""

from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import qlite                                   # noqa: E402
from qlite.metrics import sqnr_db              # noqa: E402

import _models                                 # noqa: E402

Rule = qlite.QuantizationRule
EVAL_ROWS = 32
# model -> int8 rules put before the int16 one (ops without a 16x8 kernel)
MIXED = {
    "unet": [Rule(op_names=("concatenate",), act_qtype="int8"),
             Rule(module_path="bottleneck", act_qtype="int8")],
}
BENCH = ["digits_cnn", "mobilenet_v2", "resnet", "transformer", "unet"]
ZOO = ["mlp_mixer", "squeeze_excite", "tcn"]


def zoo_case(name: str) -> _models.Case:
  """A zoo model (Linen) as a bench Case: the first 6 of its 8 seeded
  calibration batches calibrate, the rows of the last 2 are held out."""
  from qlite.zoo import registry
  zm = registry.get(f"{name}/linen")
  calib = [np.asarray(b) for b in zm.batches[:6]]
  held = np.concatenate([np.asarray(b) for b in zm.batches[6:8]])
  model = zm.model
  ref = np.concatenate([np.asarray(model.apply(zm.variables, held[i:i + 1]))
                        for i in range(len(held))])
  case = _models.Case(name, name, 1, zm.variables, calib,
                      (np.ascontiguousarray(calib[0][:1]),), held, None, ref)
  case.model = model
  return case


def run(case, model, rules):
  t0 = time.perf_counter()
  stats = qlite.calibrate(model, rules, case.calib[:8],
                          variables=case.variables, progress=False)
  blob = qlite.export_tflite(model, rules, stats, case.example_args,
                             variables=case.variables, verify="error")
  secs = time.perf_counter() - t0
  info = qlite.inspect_tflite(blob)
  runner = qlite.TFLiteRunner(blob)
  xs = case.eval_x[:EVAL_ROWS]
  y = np.concatenate([np.asarray(runner.run(xs[i:i + 1])[0])
                      for i in range(len(xs))])
  return dict(full_integer=info.full_integer,
              sqnr=sqnr_db(case.ref[:EVAL_ROWS], y), size=len(blob),
              secs=secs)


def weight_ceiling(case, model) -> float:
  """SQNR vs float of the model with only its weights (every ``kernel``)
  rounded to int8 per output channel (last axis), activations float: what
  no activation width can beat."""
  def rnd(path, w):
    if getattr(path[-1], "key", None) != "kernel" or np.ndim(w) < 2:
      return w
    w = np.asarray(w, np.float32)
    s = np.abs(w).reshape(-1, w.shape[-1]).max(0) / 127.0
    s = np.where(s == 0, 1.0, s)
    return np.round(w / s) * s
  rounded = jax.tree_util.tree_map_with_path(rnd, case.variables)
  xs = case.eval_x[:EVAL_ROWS]
  y = np.asarray(model.apply(rounded, xs))
  ref = np.asarray(model.apply(case.variables, xs))
  return sqnr_db(ref, y)


def measure(name: str) -> dict:
  if name in BENCH:
    case = _models.build(name)
    model = _models.flax_model(case)
  else:
    case = zoo_case(name)
    model = case.model
  row = dict(model=name)
  row["int8"] = run(case, model, [Rule()])
  mixed = MIXED.get(name, [])
  try:
    row["int16"] = run(case, model, mixed + [Rule(act_qtype="int16")])
  except qlite.QliteError as e:
    row["int16"] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
  row["mixed"] = ", ".join(
      (r.op_names[0] if r.op_names else r.module_path) for r in mixed) or "–"
  row["ceiling"] = weight_ceiling(case, model)
  return row


def table(rows) -> str:
  head = ("| model | int8 SQNR dB | 16x8 SQNR dB | gain dB | int8-weights "
          "ceiling dB | 16x8 full-integer | kept int8 | size int8 / 16x8 KiB |")
  lines = [head, "|" + "---|" * 8]
  for r in rows:
    a, b = r["int8"], r["int16"]
    if "error" in b:
      lines.append(f"| {r['model']} | {a['sqnr']:.1f} | {b['error']} | | "
                   f"{r['ceiling']:.1f} | | {r['mixed']} | |")
      continue
    lines.append(
        f"| {r['model']} | {a['sqnr']:.1f} | {b['sqnr']:.1f} | "
        f"{b['sqnr'] - a['sqnr']:+.1f} | {r['ceiling']:.1f} | "
        f"{b['full_integer']} | {r['mixed']} | {a['size'] / 1024:.0f} / "
        f"{b['size'] / 1024:.0f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  names = list(argv if argv is not None else sys.argv[1:])
  write = not names
  names = names or BENCH + ZOO
  rows = []
  for name in names:
    rows.append(measure(name))
    print(rows[-1], flush=True)
  text = table(rows)
  print(text)
  if write:
    with open(os.path.join(HERE, "RESULTS_int16.md"), "w") as f:
      f.write(
          "# 16x8 export vs int8 (bench/int16_models.py)\n\n"
          f"LiteRT SQNR vs the float model on {EVAL_ROWS} held-out rows "
          "(batch 1), calibration on 8 batches, self-check on. The ceiling "
          "is the float model with only its weights rounded to int8: 16x8 "
          "keeps int8 weights, so no activation width gets past it.\n\n"
          f"Command: `python bench/int16_models.py` (jax "
          f"{jax.__version__}).\n\n" + text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
