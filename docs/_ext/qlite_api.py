"""The public API of qlite, as the documentation site lists it.

Used by ``docs/conf.py`` (writes one reference page per public module into
``docs/api/``, and the op coverage table) and by ``tests/test_docs.py``
(every public name has a docstring and a page).

Public modules: ``qlite``, every package under ``qlite/`` whose
``__init__.py`` declares ``__all__`` (found by walking the tree, so a new
one is documented without editing this file), and :data:`EXTRA_MODULES`.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pathlib
import types

ROOT = pathlib.Path(__file__).resolve().parents[2]
PKG = ROOT / "qlite"

# Modules without ``__all__`` that are public: their public names are the
# functions and classes they define.
EXTRA_MODULES = ("qlite.metrics",)

# The order of the reference pages (others follow alphabetically).
ORDER = ("qlite", "qlite.litert", "qlite.annotate", "qlite.xla",
         "qlite.kernels", "qlite.metrics", "qlite.core",
         "qlite.core.calibration", "qlite.ops")


def _declares_all(path: pathlib.Path) -> bool:
  tree = ast.parse(path.read_text())
  for node in tree.body:
    targets = (node.targets if isinstance(node, ast.Assign) else
               [node.target] if isinstance(node, ast.AnnAssign) else [])
    if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
      return True
  return False


def public_modules() -> list[str]:
  """The documented modules, in page order."""
  found = set(EXTRA_MODULES)
  for init in PKG.rglob("__init__.py"):
    if _declares_all(init):
      rel = init.parent.relative_to(ROOT)
      found.add(".".join(rel.parts))
  rank = {m: i for i, m in enumerate(ORDER)}
  return sorted(found, key=lambda m: (rank.get(m, len(ORDER)), m))


def public_names(modname: str) -> list[str]:
  """``__all__`` of a public module, or for an :data:`EXTRA_MODULES` one the
  functions and classes it defines without a leading underscore."""
  mod = importlib.import_module(modname)
  if hasattr(mod, "__all__"):
    return list(mod.__all__)
  return [n for n, v in vars(mod).items()
          if not n.startswith("_") and (inspect.isfunction(v) or
                                        inspect.isclass(v))
          and v.__module__ == modname]


def kind(obj) -> str:
  """``module`` | ``class`` | ``exception`` | ``function`` | ``data``."""
  if isinstance(obj, types.ModuleType):
    return "module"
  if inspect.isclass(obj):
    return "exception" if issubclass(obj, BaseException) else "class"
  if callable(obj) and _own_doc(obj) is not None:
    return "function"
  return "data"


def _own_doc(obj) -> str | None:
  if inspect.isclass(obj):
    doc = obj.__dict__.get("__doc__")
  else:
    doc = getattr(obj, "__doc__", None)
    if doc is not None and doc == getattr(type(obj), "__doc__", None):
      doc = None                           # an instance: its class's doc
  if (inspect.isclass(obj) and doc and dataclasses.is_dataclass(obj)
      and doc.startswith(f"{obj.__name__}(")):
    doc = None                             # the signature dataclass writes
  return inspect.cleandoc(doc) if doc and doc.strip() else None


def _module_file(modname: str) -> pathlib.Path:
  mod = importlib.import_module(modname)
  return pathlib.Path(mod.__file__)


def _stmt_doc(body: list, i: int, lines: list[str]) -> str | None:
  """The docstring of the assignment ``body[i]``: a string statement right
  after it, or ``#:`` comment lines right above it."""
  if i + 1 < len(body):
    nxt = body[i + 1]
    if (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
        and isinstance(nxt.value.value, str)):
      return inspect.cleandoc(nxt.value.value)
  comments = []
  ln = body[i].lineno - 2
  while ln >= 0 and lines[ln].strip().startswith("#:"):
    comments.insert(0, lines[ln].strip()[2:].strip())
    ln -= 1
  return "\n".join(comments) if comments else None


def data_doc(modname: str, name: str, _depth: int = 0) -> str | None:
  """The attribute docstring of a data name (a constant, a registry
  instance) of a module, following ``from X import name`` to where it is
  assigned; None when it has none."""
  if _depth > 8:
    return None
  path = _module_file(modname)
  src = path.read_text()
  lines = src.splitlines()
  body = ast.parse(src).body
  for i, node in enumerate(body):
    targets = (node.targets if isinstance(node, ast.Assign) else
               [node.target] if isinstance(node, ast.AnnAssign) else [])
    if any(isinstance(t, ast.Name) and t.id == name for t in targets):
      doc = _stmt_doc(body, i, lines)
      if doc:
        return doc
  for node in body:
    if isinstance(node, ast.ImportFrom):
      for alias in node.names:
        if (alias.asname or alias.name) == name:
          src_mod = node.module or ""
          if node.level:
            base = modname.split(".")
            if path.name != "__init__.py":
              base = base[:-1]
            base = base[:len(base) - (node.level - 1)]
            src_mod = ".".join(base + ([src_mod] if src_mod else []))
          return data_doc(src_mod, alias.name, _depth + 1)
  return None


def docstring(modname: str, name: str) -> str | None:
  """The docstring a public name is documented with (None: it has none)."""
  obj = getattr(importlib.import_module(modname), name)
  if kind(obj) == "module":
    return _own_doc(obj)
  if kind(obj) == "data":
    return data_doc(modname, name)
  return _own_doc(obj)


def _summary(doc: str | None) -> str:
  return (doc or "").strip().split("\n\n")[0].replace("\n", " ")


def _indent(text: str, n: int = 3) -> str:
  pad = " " * n
  return "\n".join(pad + ln if ln.strip() else "" for ln in text.splitlines())


def _short_repr(obj) -> str:
  r = repr(obj)
  return r if len(r) <= 80 and "\n" not in r else type(obj).__name__


def page(modname: str, seen: dict[int, str]) -> str:
  """The reStructuredText reference page of one module. ``seen`` maps
  ``id(obj)`` to the first documented full name: a name re-exported by a
  later page is an alias entry linking there, so each object is documented
  (and indexed) once."""
  mod = importlib.import_module(modname)
  title = f"``{modname}``"
  out = [title, "=" * len(title), "",
         f".. py:module:: {modname}", ""]
  mdoc = _own_doc(mod)
  if mdoc:
    out += [f".. automodule:: {modname}", "   :no-members:",
            "   :no-index:", ""]
  names = public_names(modname)
  out += ["", "Public names", "------------", "",
          ".. list-table::", "   :widths: 30 70", ""]
  for n in names:
    obj = getattr(mod, n)
    first = seen.get(id(obj)) if kind(obj) != "data" else None
    summary = (f"same object as :py:obj:`{first}`" if first else
               _summary(docstring(modname, n)))
    summary = summary.replace("|", "\\|")
    out += [f"   * - :py:obj:`~{modname}.{n}`", f"     - {summary}"]
  out += ["", "Reference", "---------", ""]
  for n in names:
    obj = getattr(mod, n)
    full = f"{modname}.{n}"
    k = kind(obj)
    if k == "module":
      out += [f".. py:data:: {n}", "   :no-index:", "",
              f"   The module :doc:`{obj.__name__}` (its own page).", ""]
      continue
    first = seen.get(id(obj)) if k != "data" else None
    if first:
      directive = {"class": "py:class", "exception": "py:exception",
                   "function": "py:function"}[k]
      out += [f".. {directive}:: {n}", "",
              f"   The same object as :py:obj:`{first}` (documented there).",
              ""]
      continue
    if k in ("class", "exception"):
      seen[id(obj)] = full
      out += [f".. auto{k}:: {full}", "   :members:",
              "   :show-inheritance:", ""]
    elif k == "function":
      seen[id(obj)] = full
      out += [f".. autofunction:: {full}", ""]
    else:
      doc = data_doc(modname, n) or ""
      out += [f".. py:data:: {n}", f"   :value: {_short_repr(obj)}", "",
              _indent(doc), ""]
  return "\n".join(out) + "\n"


def write_pages(outdir: pathlib.Path) -> list[str]:
  """Writes ``<module>.rst`` per public module and ``index.rst`` into
  ``outdir``; returns the module names."""
  outdir.mkdir(parents=True, exist_ok=True)
  mods = public_modules()
  seen: dict[int, str] = {}
  wanted = set()
  for m in mods:
    text = page(m, seen)
    wanted.add(f"{m}.rst")
    f = outdir / f"{m}.rst"
    if not f.exists() or f.read_text() != text:   # keep Sphinx's cache valid
      f.write_text(text)
  index = ["API reference", "=============", "",
           "Generated from the docstrings of every name in ``__all__`` of the "
           "public modules (``docs/_ext/qlite_api.py``).", "",
           ".. toctree::", "   :maxdepth: 1", ""] + [f"   {m}" for m in mods]
  text = "\n".join(index) + "\n"
  f = outdir / "index.rst"
  if not f.exists() or f.read_text() != text:
    f.write_text(text)
  wanted.add("index.rst")
  for stale in outdir.glob("*.rst"):
    if stale.name not in wanted:
      stale.unlink()
  return mods
