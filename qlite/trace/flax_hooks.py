"""Turn a Flax model (Linen or NNX, unmodified) into a pure function of
``(params, *args)`` whose ops carry their Flax module path in jax's name stack.

Linen already pushes every module's name onto jax's name stack. NNX does not,
so while an NNX model is traced we wrap the ``__call__`` of its module classes
in ``jax.named_scope(<attribute path>)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable

import jax
from flax import linen as nn
from flax import nnx

from qlite.errors import QliteError


@dataclasses.dataclass
class ModelFunction:
  """A model as ``fn(params, *args)`` plus the concrete ``params``."""
  fn: Callable[..., Any]
  params: Any
  framework: str          # "linen" or "nnx"
  root_name: str          # stripped from name stacks to form module paths
  description: str
  # Equal keys trace to the same graph for the same param / arg shapes (a
  # Linen module compares by its config, an NNX module by its graphdef);
  # None: never reuse a trace.
  cache_key: Any = None


def model_function(model, variables=None, *,
                   require_variables: bool = True) -> ModelFunction:
  """Returns the :class:`ModelFunction` of a Linen module (+ variables) or an
  NNX module.

  Raises:
    QliteError: ``model`` is neither, or a Linen model has no variables.
  """
  if isinstance(model, nn.Module):
    if variables is None and require_variables:
      raise QliteError(
          f"{type(model).__name__} is a Flax Linen module: pass its variables "
          f"(variables=model.init(...) or your trained variables)")
    if variables is not None and not hasattr(variables, "keys"):
      raise QliteError(f"variables for Linen model {type(model).__name__} "
                       f"must be a dict of collections, got "
                       f"{type(variables).__name__}")
    def fn(params, *args):
      return model.apply(params, *args)
    return ModelFunction(fn, variables, "linen", type(model).__name__,
                         f"linen:{type(model).__name__}",
                         _hashable(("linen", model)))
  if isinstance(model, nnx.Module):
    if variables is not None:
      raise QliteError(f"{type(model).__name__} is an NNX module: it carries "
                       f"its own state; pass variables=None")
    graphdef, state = nnx.split(model)
    def fn(state, *args):
      merged = nnx.merge(graphdef, state)
      with _nnx_named_scopes(merged):
        return merged(*args)
    return ModelFunction(fn, state, "nnx", "", f"nnx:{type(model).__name__}",
                         _hashable(("nnx", graphdef)))
  if callable(model) and variables is not None and not isinstance(model, type):
    # A plain function f(variables, *args).
    name = getattr(model, "__name__", type(model).__name__)
    return ModelFunction(model, variables, "function", "", f"function:{name}")
  raise QliteError(
      f"qlite needs a flax.linen.Module (with variables=...) or a flax.nnx."
      f"Module, got {type(model).__name__}")


def _hashable(key):
  """``key`` if it can key a cache (modules holding unhashable fields
  cannot), else None."""
  try:
    hash(key)
  except TypeError:
    return None
  return key


def _path_str(path) -> str:
  return "/".join(str(p) for p in path)


@contextlib.contextmanager
def _nnx_named_scopes(root: nnx.Module):
  """Wraps ``__call__`` of every module class under ``root`` in a named scope
  holding the instance's attribute path, for the duration of the block."""
  paths: dict[int, str] = {}
  classes = []
  for path, node in nnx.iter_graph(root):
    if isinstance(node, nnx.Module) and path:
      paths.setdefault(id(node), _path_str(path))
      if type(node) not in classes:
        classes.append(type(node))
  stack: list[str] = [""]
  saved = []
  for cls in classes:
    original = cls.__dict__.get("__call__")
    if original is None:
      continue
    @functools.wraps(original)
    def wrapped(self, *a, __original=original, **k):
      path = paths.get(id(self))
      if path is None:
        return __original(self, *a, **k)
      parent = stack[-1]
      # Named scopes nest: push the part of the path below the caller's.
      rel = path[len(parent) + 1:] if parent and path.startswith(parent + "/") \
          else path
      stack.append(path)
      try:
        with jax.named_scope(rel):
          return __original(self, *a, **k)
      finally:
        stack.pop()
    saved.append((cls, original))
    cls.__call__ = wrapped
  try:
    yield
  finally:
    for cls, original in saved:
      cls.__call__ = original
