"""Cost of export_tflite's self-check (verify="error" vs "off") on the bench
models: each export in a fresh process (cold: what `qlite export` pays) and
repeated in one process (warm: jax's per-op caches filled).

    python bench/self_check.py        # prints a table, writes bench/RESULTS_selfcheck.md
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("digits_cnn", "mobilenet_v2", "resnet", "transformer", "unet")

_CHILD = r"""
import json, sys, time, warnings
sys.path.insert(0, {here!r})
import qlite, _models
case = _models.build({name!r})
model = _models.flax_model(case)
rules = [qlite.QuantizationRule()]
stats = qlite.calibrate(model, rules, case.calib[:8], variables=case.variables,
                        progress=False)
out = {{}}
for verify in {order!r}:
  t = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    qlite.export_tflite(model, rules, stats, case.example_args,
                        variables=case.variables, verify=verify)
  out.setdefault(verify, []).append(time.perf_counter() - t)
print(json.dumps(out))
"""


def _run(name: str, order) -> dict:
  code = _CHILD.format(here=HERE, name=name, order=list(order))
  res = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True)
  return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> str:
  rows = ["| model | export, verify off (s) | cold self-check (s) | cold cost "
          "| warm self-check (s) | warm cost |", "|---|---|---|---|---|---|"]
  for name in MODELS:
    off_first = _run(name, ["off", "error"])     # cold export, then check
    on_first = _run(name, ["error", "off"])      # cold export with check
    warm = _run(name, ["off", "error"] * 3)
    cold_off = off_first["off"][0]
    cold_cost = on_first["error"][0] - cold_off
    warm_off, warm_on = min(warm["off"][1:]), min(warm["error"][1:])
    rows.append(f"| {name} | {cold_off:.2f} | {cold_cost:.2f} | "
                f"{100 * cold_cost / cold_off:.0f} % | {warm_on - warm_off:.2f} "
                f"| {100 * (warm_on - warm_off) / warm_off:.0f} % |")
    print(rows[-1], flush=True)
  text = ("# export_tflite self-check cost\n\n`python bench/self_check.py` "
          f"({time.strftime('%Y-%m-%d')}; 8 calibration batches; cold = a "
          "fresh process per export, warm = best of repeated exports in one "
          "process; the check runs the .tflite and the fake-quant model on "
          "the example args and 2 kept calibration rows)\n\n" +
          "\n".join(rows) + "\n")
  with open(os.path.join(HERE, "RESULTS_selfcheck.md"), "w") as f:
    f.write(text)
  return text


if __name__ == "__main__":
  print(main())
