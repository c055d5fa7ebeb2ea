"""Imports point down the layers documented in docs/architecture.md: a module
may import its own package and packages of lower layers, never higher ones
(function-level imports included)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "qlite"

# Lowest first. A package not listed here fails the test (add it to a layer
# and to docs/architecture.md).
LAYERS = [
    {"qlite.errors", "qlite.metrics"},
    {"qlite.core"},
    {"qlite.rules", "qlite.kernels"},
    {"qlite.trace"},
    {"qlite.ops"},
    {"qlite.quant"},
    {"qlite.litert", "qlite.xla", "qlite.annotate"},
    {"qlite.qat", "qlite.ptq"},
    {"qlite.analysis"},
    {"qlite.demo", "qlite.zoo", "qlite.cli", "qlite"},
]


def _unit(module: str) -> str:
  """The layered unit of a dotted module name (qlite.litert.convert ->
  qlite.litert)."""
  parts = module.split(".")
  return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def _layer(unit: str) -> int:
  for i, layer in enumerate(LAYERS):
    if unit in layer:
      return i
  raise AssertionError(f"{unit} is in no layer of tests/test_layers.py")


def _module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT.parent).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _imports(path: pathlib.Path):
  tree = ast.parse(path.read_text(), str(path))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        yield a.name, node.lineno
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      yield node.module, node.lineno
      for a in node.names:            # from qlite import ops -> qlite.ops
        yield f"{node.module}.{a.name}", node.lineno


def test_imports_point_down():
  bad = []
  for path in sorted(ROOT.rglob("*.py")):
    me = _module_name(path)
    mine = _unit(me)
    if mine == "qlite":       # the package's __init__: re-exports everything
      continue
    for target, line in _imports(path):
      if not target.startswith("qlite.") or target == "qlite":
        continue
      unit = _unit(target)
      if unit == mine or unit not in set().union(*LAYERS):
        continue   # own package; `from qlite.x import name` of a non-module
      if _layer(unit) > _layer(mine):
        bad.append(f"{path.relative_to(ROOT.parent)}:{line} ({mine}) imports "
                   f"{target} ({unit}, a higher layer)")
  assert not bad, "\n".join(bad)


def test_every_package_has_a_layer():
  units = {_unit(_module_name(p)) for p in ROOT.rglob("*.py")}
  for unit in units:
    _layer(unit)
