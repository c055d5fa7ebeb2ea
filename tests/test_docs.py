"""The documentation (``make docs``): docs/architecture.md carries the op
coverage table generated from the op handlers (it must match what the
handlers say now); every public name and public method has a docstring;
every QliteError subclass has a troubleshooting entry; the site builds with
warnings as errors and documents every public name. Slow: the guides' code
runs and prints what the pages show; the troubleshooting messages are what
qlite raises."""

import ast
import importlib.util
import pathlib
import re
import subprocess
import sys
import time

import pytest

from qlite.ops import coverage

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

sys.path.insert(0, str(DOCS / "_ext"))
import qlite_api  # noqa: E402  (docs/_ext/qlite_api.py)


def test_architecture_coverage_table_is_current():
  doc = (DOCS / "architecture.md").read_text()
  assert coverage.table() in doc, (
      "docs/architecture.md's op coverage table is stale: regenerate it with "
      "`python -m qlite.ops.coverage`")


def test_public_modules_include_every_subpackage_with_all():
  mods = qlite_api.public_modules()
  for m in ("qlite", "qlite.annotate", "qlite.litert", "qlite.xla",
            "qlite.kernels", "qlite.metrics", "qlite.core",
            "qlite.core.calibration", "qlite.ops"):
    assert m in mods
  assert mods[0] == "qlite"


def test_every_public_name_has_a_docstring():
  missing = [f"{m}.{n}" for m in qlite_api.public_modules()
             for n in qlite_api.public_names(m)
             if not qlite_api.docstring(m, n)]
  assert not missing, (
      f"public names without a docstring (functions / classes: a docstring; "
      f"constants: a string right after the assignment): {missing}")


def test_every_public_method_has_a_docstring():
  # the reference lists a class's public methods and properties (its own or
  # inherited docstring); one without a docstring would silently be left out
  import inspect
  missing, seen = [], set()
  for m in qlite_api.public_modules():
    mod = importlib.import_module(m)
    for n in qlite_api.public_names(m):
      cls = getattr(mod, n)
      if not inspect.isclass(cls) or id(cls) in seen:
        continue
      seen.add(id(cls))
      for k, v in vars(cls).items():
        if k.startswith("_"):
          continue
        if isinstance(v, property):
          documented = bool(v.__doc__)
        elif callable(v) or isinstance(v, (classmethod, staticmethod)):
          documented = bool(inspect.getdoc(getattr(cls, k)))
        else:
          continue
        if not documented:
          missing.append(f"{m}.{n}.{k}")
  assert not missing, f"public methods without a docstring: {missing}"


def test_data_docstring_follows_imports():
  # qlite.ops re-exports COMPUTE from qlite.ops.base: the doc found is the
  # string after the assignment there
  doc = qlite_api.docstring("qlite.ops", "COMPUTE")
  assert doc.startswith("Role of every other op")
  assert qlite_api.kind(qlite_api.public_names) == "function"
  assert qlite_api.kind(3.0) == "data"


def _qlite_error_classes() -> list[str]:
  """Every class under qlite/ that derives (by name) from QliteError."""
  bases = {}
  for path in (ROOT / "qlite").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ClassDef):
        bases[node.name] = [b.id if isinstance(b, ast.Name) else
                            b.attr if isinstance(b, ast.Attribute) else ""
                            for b in node.bases]
  found = {"QliteError"}
  grew = True
  while grew:
    grew = False
    for name, bs in bases.items():
      if name not in found and found.intersection(bs):
        found.add(name)
        grew = True
  return sorted(found)


def test_every_qlite_error_has_a_troubleshooting_entry():
  errors = _qlite_error_classes()
  for name in ("QliteError", "CalibrationError", "UnsupportedOpError",
               "MissingRecordError", "LiteRTQTypeError"):
    assert name in errors
  doc = (DOCS / "troubleshooting.md").read_text()
  headings = set(re.findall(r"^##+ `(\w+)`", doc, re.M))
  missing = [e for e in errors if e not in headings]
  assert not missing, (
      f"docs/troubleshooting.md has no '## `Name`' entry (typical cause and "
      f"fix) for: {missing}")
  for e in errors:   # each entry says what causes it and how to fix it
    body = re.split(rf"^##+ `{e}`", doc, maxsplit=1, flags=re.M)[1]
    body = body.split("\n## ", 1)[0]
    assert "**Cause" in body and "**Fix" in body, e


def test_site_builds_strict_and_documents_every_public_name(tmp_path):
  if importlib.util.find_spec("sphinx") is None:
    pytest.skip("sphinx is not installed: pip install -e '.[docs]' "
                "(make docs installs it)")
  t0 = time.perf_counter()
  out = tmp_path / "html"
  proc = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b",
       "html", "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
      capture_output=True, text=True, timeout=600)
  took = time.perf_counter() - t0
  print(f"strict site build: {took:.1f} s")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  for m in qlite_api.public_modules():
    html = (out / "api" / f"{m}.html").read_text()
    for n in qlite_api.public_names(m):
      obj = getattr(importlib.import_module(m), n)
      if qlite_api.kind(obj) == "module":
        assert (out / "api" / f"{obj.__name__}.html").exists(), n
      else:
        assert f'id="{m}.{n}"' in html, f"{m}.{n} has no entry"
  # the coverage page is the generated table, one row per handler
  cov = (out / "op_coverage.html").read_text()
  from qlite.ops.registry import REGISTRY
  for h in REGISTRY.handlers:
    assert f"{h.family} (" in cov, h.family
  # the examples page has a section per example script with a docstring
  examples = (out / "examples.html").read_text()
  for script in sorted((ROOT / "examples").glob("*.py")):
    if ast.get_docstring(ast.parse(script.read_text())):
      assert f"examples/{script.name}" in examples, script.name
  # the command-line page is the command's own --help, one per subcommand
  cli_page = (out / "cli.html").read_text()
  for sub in ("demo", "export", "compare", "inspect", "zoo"):
    assert f"usage: qlite {sub}" in cli_page, sub
  # every guide is in the table of contents
  index = (out / "index.html").read_text()
  for page in sorted(DOCS.glob("*.md")):
    if page.stem != "index":
      assert f'href="{page.stem}.html"' in index, page.name


def _marked_blocks(page: pathlib.Path):
  """``(tag, code)`` of the fenced blocks right after a ``<!-- run -->`` or
  ``<!-- output -->`` line, in page order."""
  lines = page.read_text().split("\n")
  out = []
  for i, ln in enumerate(lines):
    tag = re.fullmatch(r"<!-- (run|output) -->", ln.strip())
    if tag and i + 1 < len(lines) and lines[i + 1].startswith("```"):
      end = next(j for j in range(i + 2, len(lines))
                 if lines[j].startswith("```"))
      out.append((tag.group(1), "\n".join(lines[i + 2:end])))
  return out


GUIDES_WITH_RUN_BLOCKS = ("getting_started.md", "compare.md", "calibration.md",
                          "xla.md", "qat.md")


def test_marked_guide_blocks_exist():
  for name in GUIDES_WITH_RUN_BLOCKS:
    tags = [t for t, _ in _marked_blocks(DOCS / name)]
    assert tags.count("run") >= 1 and tags.count("output") >= 1, name


@pytest.mark.slow
@pytest.mark.parametrize("name", GUIDES_WITH_RUN_BLOCKS)
def test_guide_code_runs_and_prints_what_the_page_shows(name, tmp_path):
  """The ``<!-- run -->`` blocks of a guide run, in order, as one script;
  every line of each ``<!-- output -->`` block is a line it printed."""
  blocks = _marked_blocks(DOCS / name)
  script = "\n\n".join(code for tag, code in blocks if tag == "run")
  (tmp_path / "guide.py").write_text(script)
  proc = subprocess.run([sys.executable, "guide.py"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=900,
                        env={**__import__("os").environ,
                             "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-4000:]
  printed = {ln.rstrip() for ln in proc.stdout.splitlines()}
  for tag, text in blocks:
    if tag == "output":
      missing = [ln for ln in text.splitlines()
                 if ln.strip() and ln.rstrip() not in printed]
      assert not missing, (f"{name}: lines the page shows but the code did "
                           f"not print: {missing}\n--- printed:\n"
                           f"{proc.stdout[-4000:]}")


def _troubleshooting_messages() -> dict[str, list[str]]:
  """The messages docs/troubleshooting.md shows, by error class."""
  doc = (DOCS / "troubleshooting.md").read_text()
  out = {}
  for sec in re.split(r"^## ", doc, flags=re.M)[1:]:
    name = re.match(r"`(\w+)`", sec).group(1)
    blocks = re.findall(r"```\{code-block\} text\n:class: wrap-lines\n\n(.*?)```",
                        sec, re.S)
    out[name] = [ln for b in blocks for ln in b.splitlines() if ln.strip()]
  return out


@pytest.mark.slow
def test_troubleshooting_messages_are_what_qlite_raises():
  """Each message the page shows is raised, word for word, by the case it
  describes (the source path of UnsupportedOpError's op is shortened)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import flax.linen as nn
  from flax import nnx
  import qlite

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4)(nn.relu(nn.Dense(8)(x)))

  class Sin(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4)(jnp.sin(x))

  class N(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(8, 4, rngs=rngs)
      self.bn = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
      return self.bn(self.lin(x))

  m = Net()
  x = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
  v = m.init(jax.random.key(0), x)
  rules = [qlite.QuantizationRule()]
  stats = qlite.calibrate(m, rules, [x], variables=v, progress=False)
  s2 = Sin()
  v2 = s2.init(jax.random.key(0), x)
  st2 = qlite.calibrate(s2, rules, [x], variables=v2, progress=False)
  nan_v = jax.tree.map(lambda a: a * np.nan, v)
  cases = {
      "QliteError": [
          lambda: qlite.export_tflite(m, rules, stats, x[:1]),
          lambda: qlite.calibrate(N(nnx.Rngs(0)), rules, [x], progress=False)],
      "QTypeError": [lambda: qlite.QuantizationRule(weight_qtype="int9")],
      "RuleError": [lambda: qlite.QuantizationRule(module_path="Dense_(0")],
      "LiteRTQTypeError": [lambda: qlite.export_tflite(
          m, [qlite.QuantizationRule(weight_qtype="fp8_e4m3")], stats, x[:1],
          variables=v)],
      "CalibrationError": [
          lambda: qlite.calibrate(m, rules, [], variables=v, progress=False),
          lambda: qlite.calibrate(m, rules, [x * np.nan], variables=v,
                                  progress=False),
          lambda: qlite.export_tflite(s2, rules, stats, x[:1], variables=v2)],
      "MissingRecordError": [lambda: stats["nope"]],
      "ConversionError": [lambda: qlite.export_tflite(
          m, rules, stats, x[:1], variables=nan_v,
          allow_changed_weights=True)],
      "UnsupportedOpError": [lambda: qlite.export_tflite(
          s2, rules, st2, x[:1], variables=v2)],
      "TFLiteFormatError": [lambda: qlite.inspect_tflite(b"not a model")],
  }
  shown = _troubleshooting_messages()
  assert set(shown) == set(cases)
  for name, fns in cases.items():
    raised = []
    for fn in fns:
      with pytest.raises(qlite.QliteError) as info:
        fn()
      assert type(info.value).__name__ == name
      raised.append(re.sub(r"[^\s(]+\.py:\d+ \([\w.<>]*?(\w+\.__call__)\)",
                           r"model.py:12 (\1)", str(info.value)))
    for line in shown[name]:
      assert line in raised, (name, line, raised)
