"""The ``qlite`` command end to end on your own ``module:function`` entry.

    python examples/cli_entry.py [--workdir DIR]

Writes a user module, ``my_model.py``, whose ``make()`` returns
``(model, variables, batches)`` -- the one thing the CLI needs -- then runs,
as a user would in a shell (here through ``python -m qlite.cli``)::

    qlite export  my_model:make --out my_model.tflite --calib-batches 8
    qlite inspect my_model.tflite
    qlite compare my_model:make my_model.tflite --json r.json --html r.html

and prints each command with its output. The module is a small Linen
classifier over 12 features with a LayerNorm and a residual block.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

USER_MODULE = '''
"""my_model.py: what `qlite export my_model:make` imports."""
import jax
import numpy as np
from flax import linen as nn


class Classifier(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm()(x)
    h = nn.relu(nn.Dense(32)(x))
    h = h + nn.relu(nn.Dense(32)(h))        # residual block
    return nn.Dense(3)(h)


def make():
  """Returns (model, variables, batches): batches calibrate and compare."""
  rng = np.random.default_rng(0)
  batches = [rng.normal(size=(16, 12)).astype(np.float32) for _ in range(10)]
  model = Classifier()
  variables = model.init(jax.random.key(0), batches[0])
  return model, variables, batches
'''


def qlite_cli(args: list[str], cwd: str) -> str:
  """Runs ``python -m qlite.cli ARGS`` in ``cwd``; returns its stdout."""
  print(f"\n$ qlite {' '.join(args)}")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONIOENCODING="utf-8")
  p = subprocess.run([sys.executable, "-m", "qlite.cli", *args], cwd=cwd,
                     capture_output=True, text=True, env=env, timeout=600)
  print(p.stdout.rstrip())
  if p.returncode != 0:
    print(p.stderr[-3000:], file=sys.stderr)
    raise SystemExit(f"qlite {args[0]} exited with {p.returncode}")
  return p.stdout


def main(workdir: str | None = None) -> dict:
  workdir = workdir or tempfile.mkdtemp()
  with open(os.path.join(workdir, "my_model.py"), "w") as f:
    f.write(textwrap.dedent(USER_MODULE).lstrip())
  print(f"wrote {os.path.join(workdir, 'my_model.py')}")
  qlite_cli(["export", "my_model:make", "--out", "my_model.tflite",
             "--calib-batches", "8", "--no-progress"], workdir)
  qlite_cli(["inspect", "my_model.tflite"], workdir)
  qlite_cli(["compare", "my_model:make", "my_model.tflite", "--no-progress",
             "--calib-batches", "8", "--json", "r.json", "--html", "r.html"],
            workdir)
  with open(os.path.join(workdir, "r.json")) as f:
    report = json.load(f)
  out = report["outputs"][0]
  sqnr = float(out["metrics"]["litert_vs_float"]["sqnr_db"])
  print(f"\nfrom r.json: {len(report['layers'])} boundaries, end to end "
        f"SQNR LiteRT vs float {sqnr:.1f} dB, max {out['max_lsb']:.2f} LSB "
        f"from fake-quant; open {os.path.join(workdir, 'r.html')} in a "
        f"browser")
  return {"sqnr_db": sqnr, "layers": len(report["layers"]),
          "workdir": workdir}


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", help="where to write my_model.py and the "
                 "outputs (default: a temporary directory)")
  main(p.parse_args().workdir)
