"""qlite.autotune on zoo models: promote the fewest boundaries to int16
(LiteRT 16x8) until LiteRT reaches 35 dB vs float on held-out batches.
Records base / final SQNR, the modules and share of boundaries promoted,
and the size and LiteRT latency cost.

    python bench/autotune.py                 # writes bench/RESULTS_autotune.md
    python bench/autotune.py mlp_mixer       # one model, no file
    python bench/autotune.py resnet50_64     # appends ResNet-50 64x64
    python bench/autotune.py transformer:0.2 # at most 20 % of boundaries
    python bench/autotune.py --bound transformer   # what 20 % can give
"""

from __future__ import annotations

import os
import sys
import time

import jax

import qlite
from qlite.zoo import base, registry

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = 35.0
CALIB = 16
HELD = 2


def batches_of(name: str):
  """(calibration, held-out) batches from the zoo model's own generator,
  the held-out ones with another seed."""
  import importlib
  mod = importlib.import_module(f"qlite.zoo.{name}")
  if name == "transformer":
    shape, make, seed = (mod.SEQ_LEN, mod.IN_FEATURES), base.normal_batches, 300
  else:
    shape, make, seed = mod.INPUT_SHAPE, base.uniform_batches, {
        "mlp_mixer": 700, "resnet": 200}[name]
  return (make(shape, seed=seed, num=CALIB),
          make(shape, seed=seed + 9000, num=HELD))


def resnet50_64():
  """ResNet-50 (bottleneck 3-4-6-3, bench/_real_size_models.py) at 64x64,
  random weights and BatchNorm statistics (as issue 17's 17.4 dB figure):
  (model, variables, calibration batches, held-out batches)."""
  sys.path.insert(0, HERE)
  import numpy as np
  import _real_size_models as rs
  m = rs.ResNet50()
  calib = base.uniform_batches((64, 64, 3), seed=500, num=CALIB,
                               batch_size=2)
  held = base.uniform_batches((64, 64, 3), seed=9500, num=HELD,
                              batch_size=4)
  v = base.init_linen(m, 0, calib[0][:1])
  v = base.randomize_batchnorm_linen(
      jax.tree_util.tree_map(lambda a: np.array(a, np.float32), v), 2)
  v = jax.tree_util.tree_map(lambda a: np.array(a, np.float32), v)
  return m, v, calib, held


def _case(name: str):
  """(model, variables, calibration batches, held-out batches) of a zoo
  model (its Linen form) or ``resnet50_64``."""
  if name == "resnet50_64":
    return resnet50_64()
  zm = registry.get(f"{name}/linen")
  calib, held = batches_of(name)
  return zm.model, zm.variables, calib, held


def measure(spec: str) -> dict:
  """``name`` or ``name:max_fraction``."""
  name, _, frac = spec.partition(":")
  max_fraction = float(frac) if frac else None
  model, variables, calib, held = _case(name)
  t0 = time.perf_counter()
  rules, stats, report = qlite.autotune(
      model, [qlite.QuantizationRule()], calib, variables=variables,
      target_sqnr_db=TARGET, eval_batches=held, max_fraction=max_fraction,
      progress=True)
  secs = time.perf_counter() - t0
  print(report, flush=True)
  label = name if max_fraction is None else \
      f"{name} (max_fraction {max_fraction:g})"
  return dict(model=label, report=report, secs=secs)


def bound(name: str, fraction: float = 0.2) -> str:
  """What promoting ``fraction`` of the boundaries can give at best, on
  the fake-quant JAX model autotune scores with (held-out batches): the
  boundaries picked one at a time, each the one whose int16 removes the
  most output noise, *without* the constraint of a mixed model (the ops
  reading an int16 value must run at int16 too, or they requantize it
  back to int8; constants of the promoted ops int16), with int8 and with
  float weights."""
  import numpy as np
  from qlite.analysis.autotune import _MixModel
  model, variables, calib, held = _case(name)
  rules = [qlite.QuantizationRule()]
  stats = qlite.calibrate(model, rules, calib, variables=variables,
                          progress=False)
  mix = _MixModel(model, variables, rules, stats, held)
  codes, edges, consts, weights = mix.base
  n = len(codes)
  k = int(fraction * n)
  none = np.zeros_like(edges)
  c16 = np.full_like(consts, 2)
  lines = [f"{name}: {n} boundaries; fake-quant SQNR (held-out batches):",
           f"  int8: {mix.sqnr_db(mix.base):.2f} dB",
           f"  int16 activations, int8 weights: "
           f"{mix.sqnr_db((np.full_like(codes, 2), none, c16, weights)):.2f}"
           f" dB",
           f"  float activations, int8 weights: "
           f"{mix.sqnr_db((np.zeros_like(codes), none, c16, weights)):.2f}"
           f" dB"]
  for wname, w in (("int8", weights), ("float", np.zeros_like(weights))):
    chosen: list[int] = []
    for _ in range(k):
      best = None
      for i in range(n):
        if i in chosen:
          continue
        c = codes.copy()
        c[chosen + [i]] = 2
        s = mix.sqnr_db((c, none, c16, w))
        if best is None or s > best[0]:
          best = (s, i)
      chosen.append(best[1])
    lines.append(f"  best {k} boundaries int16 one at a time, no reader "
                 f"constraint, {wname} weights: {best[0]:.2f} dB")
  return "\n".join(lines)


def table(rows) -> str:
  lines = ["| model | int8 dB | tuned dB | reached | boundaries promoted | "
           "op groups (modules) | size int8 -> tuned | LiteRT latency int8 "
           "-> tuned (1 thread) | exports | time s |",
           "|" + "---|" * 10]
  for r in rows:
    rep = r["report"]
    lines.append(
        f"| {r['model']} | {rep.base_sqnr_db:.1f} | {rep.final_sqnr_db:.1f} "
        f"| {rep.reached} | {rep.boundaries_promoted}/{rep.boundaries} "
        f"({100 * rep.fraction_promoted:.1f} %) | {len(rep.promoted)} "
        f"({len(rep.modules)}) | "
        f"{rep.base_size / 1024:.0f} -> {rep.final_size / 1024:.0f} KiB | "
        f"{rep.base_latency_ms:.3f} -> {rep.final_latency_ms:.3f} ms | "
        f"{len(rep.steps) + 1} | {r['secs']:.0f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  names = list(argv if argv is not None else sys.argv[1:])
  if names[:1] == ["--bound"]:
    for n in names[1:]:
      print(bound(n), flush=True)
    return 0
  write = not names
  rows = [measure(n) for n in (names or ["transformer", "transformer:0.2",
                                         "mlp_mixer", "resnet"])]
  text = table(rows)
  print(text)
  limit = bound("transformer") if write else ""
  print(limit)
  if names == ["resnet50_64"]:     # appended to the default run's file
    with open(os.path.join(HERE, "RESULTS_autotune.md"), "a") as f:
      f.write(f"\n## ResNet-50 at 64x64 (`python bench/autotune.py "
              f"resnet50_64`)\n\n{CALIB} calibration batches of 2 rows, "
              f"{HELD} held-out batches of 4 rows.\n\n{text}\n\n```\n"
              f"{rows[0]['report']}\n```\n")
  if write:
    detail = "\n\n".join(f"### {r['model']}\n\n```\n{r['report']}\n```"
                         for r in rows)
    with open(os.path.join(HERE, "RESULTS_autotune.md"), "w") as f:
      f.write(
          f"# qlite.autotune, target {TARGET:.0f} dB (bench/autotune.py)\n\n"
          f"Zoo models (Linen, seeded random weights), {CALIB} calibration "
          f"batches from the zoo's generator, {HELD} held-out batches from "
          f"the same generator with another seed; SQNR is LiteRT vs the "
          f"float model on the held-out rows (batch 1). Starting rules: int8 "
          f"everywhere; candidates: int16 (16x8), promoted per op group "
          f"(one jax primitive in one module). 'boundaries promoted': "
          f"activation boundaries (model inputs included) that run at int16 "
          f"with the returned rules. Latency: median of 50 LiteRT runs of "
          f"one row, 1 thread, on the machine that ran the command (shared, "
          f"noisy).\n\n"
          f"Command: `python bench/autotune.py` (jax {jax.__version__}).\n\n"
          + text + "\n\n"
          f"## What 20 % of the transformer's boundaries can give\n\n"
          f"`python bench/autotune.py --bound transformer` (written here by "
          f"the command above): the fake-quant JAX model autotune searches "
          f"with, on the held-out batches; 'best N boundaries' picks them "
          f"greedily one at a time (each the one whose int16 removes the "
          f"most output noise) and ignores what a mixed model needs (the "
          f"ops reading an int16 value run at int16 too, else they "
          f"requantize it to int8), so it is an optimistic estimate of what "
          f"any choice of 20 % reaches.\n\n```\n{limit}\n```\n\n"
          + detail + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
