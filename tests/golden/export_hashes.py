"""sha1 of every .tflite the zoo (16 models), the 5 bench models and the first
25 fuzz seeds export: the proof that a restructuring changed no output byte.

    python tests/golden/export_hashes.py            # compare with tflite_sha1.json
    python tests/golden/export_hashes.py --record   # (re)write tflite_sha1.json
    python tests/golden/export_hashes.py --only zoo # one group: zoo | bench | fuzz

A fuzz seed that raises a named QliteError is recorded as "error: <class>".
Exit status 1 when any hash differs from the recorded one; models without a
recorded hash (added later) are listed as "new".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HASHES = os.path.join(HERE, "tflite_sha1.json")
sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "bench")]

RULES_KW = dict(module_path=r".*", weight_qtype="int8", act_qtype="int8")


def _sha1(blob: bytes) -> str:
  return hashlib.sha1(blob).hexdigest()


def zoo_hashes(names=None) -> dict:
  import qlite
  from qlite.zoo import registry
  out = {}
  rules = [qlite.QuantizationRule(**RULES_KW)]
  for name in names or registry.names():
    zm = registry.get(name)
    stats = qlite.calibrate(zm.model, rules, zm.batches,
                            variables=zm.variables, progress=False)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      blob = qlite.export_tflite(zm.model, rules, stats, zm.example_args,
                                 variables=zm.variables, strict=False)
    out[f"zoo:{name}"] = _sha1(blob)
  return out


def bench_hashes() -> dict:
  import qlite
  import _models
  out = {}
  rules = [qlite.QuantizationRule(**RULES_KW)]
  for name in ("digits_cnn", "mobilenet_v2", "resnet", "transformer", "unet"):
    case = _models.build(name)
    model = _models.flax_model(case)
    stats = qlite.calibrate(model, rules, case.calib,
                            variables=case.variables, progress=False)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      blob = qlite.export_tflite(model, rules, stats, case.example_args,
                                 variables=case.variables)
    out[f"bench:{name}"] = _sha1(blob)
  return out


def fuzz_hashes(n: int = 25) -> dict:
  import qlite
  import fuzz_models
  out = {}
  rules = [qlite.QuantizationRule()]
  for seed in range(n):
    case = fuzz_models.generate(seed)
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = qlite.calibrate(case.model, rules, case.batches,
                                variables=case.variables, progress=False)
        blob = qlite.export_tflite(case.model, rules, stats, case.batches[0],
                                   variables=case.variables)
      out[f"fuzz:{seed}"] = _sha1(blob)
    except qlite.QliteError as e:
      out[f"fuzz:{seed}"] = f"error: {type(e).__name__}"
  return out


GROUPS = {"zoo": zoo_hashes, "bench": bench_hashes, "fuzz": fuzz_hashes}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--record", action="store_true")
  p.add_argument("--only", choices=sorted(GROUPS), action="append")
  a = p.parse_args(argv)
  got = {}
  for g in a.only or list(GROUPS):
    got.update(GROUPS[g]())
  if a.record:
    old = json.load(open(HASHES)) if os.path.exists(HASHES) else {}
    old.update(got)
    with open(HASHES, "w") as f:
      json.dump(dict(sorted(old.items())), f, indent=1)
      f.write("\n")
    print(f"recorded {len(got)} hashes in {HASHES}")
    return 0
  want = json.load(open(HASHES))
  bad = new = 0
  for k, v in got.items():
    if k not in want:         # e.g. a zoo model added after the recording
      new += 1
      print(f"new   {k:32s} {v}")
      continue
    ok = want[k] == v
    bad += not ok
    print(f"{'same' if ok else 'DIFF'}  {k:32s} {v}"
          + ("" if ok else f"  (recorded {want[k]})"))
  print(f"\n{len(got) - new - bad}/{len(got) - new} identical"
        + (f" ({new} not recorded)" if new else ""))
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
