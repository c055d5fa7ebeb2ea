"""Find and fix a sensitive layer: compare -> find_sensitive_layers -> rules
keeping it at higher precision -> re-export -> compare again.

    python examples/sensitive_layer.py [--html-dir DIR]

The digits CNN is trained, then given an *outlier feature*: channel 3 of
``Dense_0`` is scaled up 100x and the ``Dense_1`` weights that read it are
scaled down 100x. The float model computes the same function (relu is
positively homogeneous), but one activation channel is now 100x larger
than the others -- the pattern large transformers show. Per-tensor int8
gives that whole activation one scale, so the 63 ordinary channels round
to a few codes and the logits lose ~25 dB.

The script prints the compare table, the layers ``find_sensitive_layers``
flags, and the end-to-end SQNR after each fix it tries: keeping the flagged
layer in float, then also the layer whose int8 output it reads; then the
same two layers with int16 activations and int8 weights instead of float
(LiteRT's 16x8 kernels: the file stays full-integer and small, the tiny
int8 weights that read the outlier channel still cost accuracy). With
``--html-dir`` it writes the before / after reports as HTML pages.
"""

from __future__ import annotations

import argparse
import os
import re
import warnings

import jax
import numpy as np

import qlite
from qlite.zoo import digits

OUTLIER_CHANNEL, OUTLIER_FACTOR = 3, 100.0


def outlier_model(seed: int = 0):
  data = digits.load_digits(seed)
  model, variables = digits.train(data, steps=300, seed=seed)
  p = jax.tree.map(np.array, variables["params"])
  k, f = OUTLIER_CHANNEL, OUTLIER_FACTOR
  p["Dense_0"]["kernel"][:, k] *= f
  p["Dense_0"]["bias"][k] *= f
  p["Dense_1"]["kernel"][k, :] /= f
  return data, model, {"params": p}


def export_and_compare(model, variables, rules, data, strict=True):
  stats = qlite.calibrate(model, rules, data.batches(32, 16),
                          variables=variables, progress=False)
  blob = qlite.export_tflite(model, rules, stats, data.x_test[:1],
                             variables=variables, strict=strict)
  report = qlite.compare(model, rules, stats, blob, [data.x_test[:200]],
                         variables=variables, progress=False)
  return blob, report


def e2e(report) -> float:
  return report.outputs[0].metrics["litert_vs_float"].sqnr_db


def main(html_dir: str | None = None) -> dict:
  data, model, variables = outlier_model()
  rules = [qlite.QuantizationRule(module_path=r".*", weight_qtype="int8",
                                  act_qtype="int8")]

  # 1. compare: float JAX vs fake-quant JAX vs LiteRT, per layer.
  blob, before = export_and_compare(model, variables, rules, data)
  print(before.table(metric="fakequant_vs_float"))
  # 2. The layers below 30 dB (accumulated error up to each layer).
  flagged = qlite.find_sensitive_layers(before, min_sqnr_db=30.0)
  print(f"\nfind_sensitive_layers(min_sqnr_db=30): {flagged}")
  print(f"end to end before: {e2e(before):.1f} dB SQNR LiteRT vs float, "
        f"full integer, {len(blob):,} bytes")

  # 3. Keep the flagged layer in float (export with strict=False: the file
  # has a float island around it).
  results = {"before": e2e(before), "flagged": flagged}
  warnings.simplefilter("ignore", UserWarning)   # "float island" warnings
  keep = list(flagged)
  rules_1 = qlite.rules_keeping_float(keep, rules)
  blob_1, after_1 = export_and_compare(model, variables, rules_1, data,
                                       strict=False)
  results["keep_flagged"] = e2e(after_1)
  print(f"\nkeep {keep} in float: {e2e(after_1):.1f} dB, "
        f"{len(blob_1):,} bytes")

  # Not enough: the flagged layer still reads the int8 activation of the
  # layer before it (graph order), whose single scale the outlier channel
  # set. Keep that one in float too.
  order = [r.module_path for r in before.layers]
  for path in flagged:
    i = order.index(path)
    if i > 0 and order[i - 1] and order[i - 1] not in keep:
      keep.append(order[i - 1])
  rules_2 = qlite.rules_keeping_float(keep, rules)
  blob_2, after_2 = export_and_compare(model, variables, rules_2, data,
                                       strict=False)
  results["keep_with_input"] = e2e(after_2)
  results["kept"] = keep
  info = qlite.inspect_tflite(blob_2)
  print(f"keep {keep} in float: {e2e(after_2):.1f} dB, {len(blob_2):,} "
        f"bytes, float ops: "
        f"{', '.join(op.name for op in info.float_ops) or 'none'}")

  # Instead of float: int16 activations, int8 weights (LiteRT's 16x8 mode)
  # for the same layers, where this version of qlite can export them.
  rules_16 = [qlite.QuantizationRule(
      module_path="|".join(re.escape(p) for p in keep), weight_qtype="int8",
      act_qtype="int16")] + rules
  try:
    blob_16, after_16 = export_and_compare(model, variables, rules_16, data)
    results["int16"] = e2e(after_16)
    print(f"{keep} with int16 activations, int8 weights: "
          f"{e2e(after_16):.1f} dB, {len(blob_16):,} bytes, full integer "
          f"{qlite.inspect_tflite(blob_16).full_integer}")
  except qlite.QliteError as e:
    results["int16"] = None
    print(f"int16 activations for {keep}: not exported by this version "
          f"({type(e).__name__}: {str(e).splitlines()[0][:160]}...)")

  print(f"\nend to end SQNR LiteRT vs float: {results['before']:.1f} dB -> "
        f"{results['keep_with_input']:.1f} dB")
  print("per layer after (fake-quant vs float):")
  now = {r.key: r for r in after_2.layers}
  for r in before.layers:
    was = r.sqnr("fakequant_vs_float")
    new = ("float (kept)" if r.key not in now else
           f"{now[r.key].sqnr('fakequant_vs_float'):.1f} dB")
    print(f"  {r.layer:8s} {was:6.1f} dB -> {new}")
  if html_dir:
    os.makedirs(html_dir, exist_ok=True)
    for name, rep in (("before", before), ("after", after_2)):
      path = os.path.join(html_dir, f"sensitive_{name}.html")
      rep.to_html(path, metric="fakequant_vs_float")
      print(f"wrote {path}")
  return results


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--html-dir", help="write the before / after HTML reports "
                 "here")
  main(p.parse_args().html_dir)
