"""The visual compare report: one self-contained HTML page.

    python examples/compare_html.py [--html report.html] [--wrong-scale Conv_1]

Trains the digits CNN, calibrates, and -- to show what a broken layer looks
like -- multiplies one layer's calibrated max by 50 (``--wrong-scale``, as
tests/test_compare.py does; ``--wrong-scale none`` leaves the statistics
alone). Exports, runs ``qlite.compare`` and writes ``Report.to_html``: the
end-to-end figures, per-layer SQNR and LSB charts in graph order (the worst
layers in red, module paths on hover) and the table. Opens offline in any
browser. Prints the worst layers and the path written.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings

import numpy as np

import qlite
from qlite.zoo import digits


def scaled_stats(stats, layer: str, factor: float):
  """``stats`` with the calibrated max of ``layer``'s boundary x factor."""
  records = {k: {s: np.array(v) for s, v in r.items()}
             for k, r in stats.records.items()}
  (key,) = [k for k in records if k.split("/")[0] == layer]
  records[key]["max"] = records[key]["max"] * factor
  return qlite.QuantStats(records, stats.meta)


def main(html: str | None = None, wrong_scale: str | None = "Conv_1",
         factor: float = 50.0) -> dict:
  data = digits.load_digits(0)
  model, variables = digits.train(data, steps=300, seed=0)
  rules = [qlite.QuantizationRule(module_path=r".*", weight_qtype="int8",
                                  act_qtype="int8", act_static_scale=True)]
  stats = qlite.calibrate(model, rules, data.batches(32, 32),
                          variables=variables, progress=False)
  if wrong_scale:
    stats = scaled_stats(stats, wrong_scale, factor)
    print(f"{wrong_scale}: calibrated max x {factor:g} (a wrong scale)")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)   # "range int8 cannot use"
    blob = qlite.export_tflite(model, rules, stats, data.x_test[:1],
                               variables=variables)
  report = qlite.compare(model, rules, stats, blob, [data.x_test[:64]],
                         variables=variables, progress=False)
  html = html or os.path.join(tempfile.mkdtemp(), "compare_report.html")
  page = report.to_html(html)
  out = report.outputs[0].metrics["litert_vs_float"]
  print(f"end to end: SQNR LiteRT vs float {out.sqnr_db:.1f} dB, top-1 "
        f"agreement {100 * out.top1_agreement:.1f} %")
  for r in report.worst(3):
    print(f"  worst: {r.layer:8s} {r.sqnr('litert_vs_float'):6.1f} dB "
          f"(own {r.sqnr('own_vs_float'):.1f} dB, scale {r.scale:.4g})")
  print(f"wrote {html} ({len(page):,} bytes, self-contained)")
  return {"worst": report.worst(1)[0].layer, "html": html,
          "e2e_db": out.sqnr_db}


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--html", help="the page to write (default: a temporary "
                 "directory)")
  p.add_argument("--wrong-scale", default="Conv_1",
                 help="layer whose calibrated max is multiplied by 50 "
                 "('none': no change)")
  a = p.parse_args()
  main(a.html, None if a.wrong_scale.lower() == "none" else a.wrong_scale)
