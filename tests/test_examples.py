"""Every script in examples/ runs (a fresh process each, as a user runs it),
exits 0 and prints the figures it claims: SQNR / accuracy floors set a few
dB under the measured values (noted beside each)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
# lm_export.py: issue 18's example, its owner tests it (not run here).
NOT_HERE = {"__init__.py", "lm_export.py"}


def run_example(name, *args, cwd):
  env = dict(os.environ, PYTHONIOENCODING="utf-8", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  p = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args],
                     cwd=cwd, capture_output=True, text=True, env=env,
                     timeout=900)
  assert p.returncode == 0, (f"{name} exited {p.returncode}\n"
                             f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
  return p.stdout


def number(pattern, text):
  m = re.search(pattern, text)
  assert m, f"{pattern!r} not in the output:\n{text}"
  return float(m.group(1))


def check_export_linen(out, tmp):
  assert number(r"SQNR LiteRT vs float\s+([\d.]+) dB", out) >= 35.0  # 40.3
  assert number(r"LiteRT int8 accuracy\s+([\d.]+) %", out) >= 92.0  # 95.99
  assert re.search(r"full integer\s+True", out)
  assert re.search(r"input\s+INT8 \(1, 8, 8, 1\) scale", out)
  assert (tmp / "m.tflite").stat().st_size > 1000


def check_export_nnx(out, tmp):
  # Training mode is refused, naming the module and the fix.
  assert re.search(r"in training mode: QliteError: .*`bn` \(nnx.BatchNorm\)"
                   r".*model\.eval\(\)", out)
  assert number(r"SQNR LiteRT vs float\s+([\d.]+) dB", out) >= 35.0  # 42.4
  assert number(r"LiteRT int8 accuracy\s+([\d.]+) %", out) >= 92.0  # 96.66
  assert "BatchNorm folded into the conv (no MUL / ADD op left): True" in out
  assert re.search(r"full integer\s+True", out)


def check_sensitive_layer(out, tmp):
  assert "find_sensitive_layers(min_sqnr_db=30): ['Dense_1']" in out
  before = number(r"end to end before: ([\d.]+) dB", out)           # 13.8
  kept = number(r"keep \['Dense_1', 'Dense_0'\] in float: ([\d.]+) dB",
                out)                                                 # 47.6
  assert before < 20.0 and kept > 40.0
  # int16 activations (issue 17's LiteRT 16x8 path, measured 28.7 dB):
  # exported full-integer, or refused by the rule check (RuleError) on a
  # version without it; never a broken conversion.
  m = re.search(r"with int16 activations, int8 weights: ([\d.]+) dB, "
                r"[\d,]+ bytes, full integer True", out)
  assert m or ("int16 activations for ['Dense_1', 'Dense_0']: not exported "
               "by this version (RuleError:") in out, out
  if m:
    assert float(m.group(1)) > before + 5.0
  assert "Dense_0     33.8 dB -> float (kept)" in out or re.search(
      r"Dense_0\s+[\d.]+ dB -> float \(kept\)", out)
  for name in ("before", "after"):
    page = (tmp / "html" / f"sensitive_{name}.html").read_text()
    assert 'id="sqnr-chart"' in page


def check_compare_html(out, tmp):
  worst = re.findall(r"worst: (\S+)\s+([\d.]+) dB", out)
  assert worst[0][0] == "Conv_1" and float(worst[0][1]) < 20.0  # 10.3
  page = (tmp / "r.html").read_text()
  assert re.search(r'class="bar worst"[^>]*data-layer="Conv_1"', page)


def check_calibration_methods(out, tmp):
  rows = {m: float(s) for m, s in re.findall(
      r"^(\w+)\s+([\d.]+)\s+[\d.]+ %", out, re.M)}
  assert set(rows) == {"minmax", "mse", "quantile", "half_absmax"}, out
  assert rows["minmax"] >= 35.0 and rows["mse"] >= 35.0   # 39.2, 39.3
  assert rows["quantile"] >= 35.0                         # 39.3
  assert rows["half_absmax"] < rows["minmax"] - 15.0      # 7.5: it clips
  assert "half_absmax" in number_line("registered methods:", out)


def number_line(prefix, text):
  return next(l for l in text.splitlines() if l.startswith(prefix))


def check_xla_ptq(out, tmp):
  assert re.search(r"mlp_in\s+2,365,440 B ->\s+602,112 B", out)
  assert "identical: True" in out
  sq = {k: number(rf"{k}\s+([\d.]+)\s", out)
        for k in ("w8 weight-only", "w8a8 DRQ", "w8a8 SRQ")}
  assert sq["w8 weight-only"] >= 40.0                     # 45.8
  assert sq["w8a8 DRQ"] >= 35.0 and sq["w8a8 SRQ"] >= 33.0  # 39.9, 38.7
  assert re.search(r"w8a8 SRQ\s+[\d.]+\s+1,803,264\s", out)


def check_cli_entry(out, tmp):
  assert "$ qlite export my_model:make" in out
  assert "full_integer: True" in out
  assert number(r"end to end SQNR LiteRT vs float ([\d.]+) dB", out) >= 30.0
  assert "wrote r.html" in out and (tmp / "r.html").exists()   # 34.5


def check_qat_to_litert(out, tmp):
  assert number(r"max \|LiteRT - QAT fake-quant\| = ([\d.]+) LSB", out) \
      <= 2.0                                                         # 1.00
  assert number(r"QAT fake-quant JAX\s+[\d.]+ %\s+LiteRT\s+([\d.]+) %",
                out) >= 95.0                                         # 99.11
  assert "full integer True" in out and "weights INT4" in out


def check_qat_digits(out, tmp):
  ptq = number(r"PTQ\s+([\d.]+) %", out)
  qat = number(r"QAT \(\d+ ep\)\s+([\d.]+) %", out)
  assert qat > ptq and qat >= 90.0


CASES = {
    "export_linen.py": (["--out", "m.tflite"], check_export_linen),
    "export_nnx.py": ([], check_export_nnx),
    "sensitive_layer.py": (["--html-dir", "html"], check_sensitive_layer),
    "compare_html.py": (["--html", "r.html"], check_compare_html),
    "calibration_methods.py": (["--methods",
                                "minmax,mse,quantile,half_absmax"],
                               check_calibration_methods),
    "xla_ptq.py": (["--reps", "3"], check_xla_ptq),
    "cli_entry.py": (["--workdir", "."], check_cli_entry),
    "qat_to_litert.py": ([], check_qat_to_litert),
    "qat_digits.py": ([], check_qat_digits),
}
SLOW = {"qat_to_litert.py", "qat_digits.py"}   # QAT training: ~20 s each


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else [])
    for n in CASES])
def test_example(name, tmp_path):
  args, check = CASES[name]
  out = run_example(name, *args, cwd=tmp_path)
  check(out, tmp_path)


def test_every_example_is_run_and_listed():
  scripts = {f for f in os.listdir(EXAMPLES) if f.endswith(".py")}
  assert scripts - NOT_HERE == set(CASES), (
      "add the new example to CASES (and examples/README.md)")
  with open(os.path.join(EXAMPLES, "README.md")) as f:
    readme = f.read()
  for name in scripts - NOT_HERE:
    assert f"`{name}`" in readme, f"{name} is not in examples/README.md"
