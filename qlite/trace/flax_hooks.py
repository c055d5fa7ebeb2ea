"""Turn a Flax model (Linen or NNX, unmodified) into a pure function of
``(params, *args)`` whose ops carry their Flax module path in jax's name stack.

Linen already pushes every module's name onto jax's name stack. NNX does not,
so while an NNX model is traced we wrap the ``__call__`` of its module classes
in ``jax.named_scope(<attribute path>)``.

A model in training mode is refused with a :class:`QliteError` naming the
module and the fix: a BatchNorm that normalizes with batch statistics, a
Dropout (or attention dropout) that is not deterministic. NNX: checked as
each such module is called (its call argument, else its attribute), and,
for any other module, by the model's batch statistics or RNG streams
changing while it is traced. Linen, and plain functions that apply Linen
modules (where these fail inside flax: the
``batch_stats`` collection is immutable, there is no ``'dropout'`` rng):
the failing trace is re-run with a method interceptor to name the module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from typing import Any, Callable

import jax
import numpy as np
from flax import errors as flax_errors
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
    description = f"linen:{type(model).__name__}"
    def fn(params, *args):
      try:
        return model.apply(params, *args)
      except (flax_errors.FlaxError, ValueError) as e:
        _raise_training_mode(e, description,
                             lambda: model.apply(params, *args))
        raise
    return ModelFunction(fn, variables, "linen", type(model).__name__,
                         description, _hashable(("linen", model)))
  if isinstance(model, nnx.Module):
    if variables is not None:
      raise QliteError(f"{type(model).__name__} is an NNX module: it carries "
                       f"its own state; pass variables=None")
    graphdef, state = nnx.split(model)
    description = f"nnx:{type(model).__name__}"
    def fn(state, *args):
      merged = nnx.merge(graphdef, state)
      before = _nnx_mode_state(merged)
      try:
        with _nnx_named_scopes(merged, description):
          out = merged(*args)
      except (flax_errors.FlaxError, ValueError) as e:
        _raise_training_mode(e, description)
        raise
      _check_nnx_mode_state(merged, before, description)
      return out
    return ModelFunction(fn, state, "nnx", "", description,
                         _hashable(("nnx", graphdef)))
  if callable(model) and variables is not None and not isinstance(model, type):
    # A plain function f(variables, *args).
    name = getattr(model, "__name__", type(model).__name__)
    description = f"function:{name}"
    def fn(params, *args):
      try:
        return model(params, *args)
      except (flax_errors.FlaxError, ValueError) as e:
        _raise_training_mode(e, description, lambda: model(params, *args))
        raise
    return ModelFunction(fn, variables, "function", "", description)
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
def _nnx_named_scopes(root: nnx.Module, description: str = "the model"):
  """Wraps ``__call__`` of every module class under ``root`` in a named scope
  holding the instance's attribute path, for the duration of the block.
  A BatchNorm / Dropout / attention called in training mode raises
  QliteError (see :func:`_training_flag`)."""
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
      found = _training_flag(self, __original, a, k, _NNX_TRAINING_FLAGS)
      if found is not None:
        raise QliteError(_training_message(description, path, *found))
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


# Modules with a training mode: (class, flag that is True in inference,
# attribute holding the dropout rate or None). A rate of 0 never drops.
_NNX_TRAINING_FLAGS = (
    (nnx.BatchNorm, "use_running_average", None),
    (nnx.Dropout, "deterministic", "rate"),
    (nnx.MultiHeadAttention, "deterministic", "dropout_rate"),
)
_LINEN_TRAINING_FLAGS = (
    (nn.BatchNorm, "use_running_average", None),
    (nn.Dropout, "deterministic", "rate"),
    (nn.MultiHeadDotProductAttention, "deterministic", "dropout_rate"),
)


def _training_flag(module, call_fn, args, kwargs, table):
  """``(label, flag, value, from_call)`` when ``module`` called with
  ``args`` / ``kwargs`` runs in training mode (``flag`` is False or unset:
  the call argument wins over the attribute, as in flax), else None."""
  for cls, flag, rate in table:
    if not isinstance(module, cls):
      continue
    if rate is not None:
      r = getattr(module, rate, 0.0)
      if isinstance(r, (int, float, np.number)) and float(r) == 0.0:
        return None
    value, from_call = None, False
    try:
      bound = inspect.signature(call_fn).bind_partial(module, *args, **kwargs)
      value = bound.arguments.get(flag)
    except (TypeError, ValueError):
      pass
    if value is not None:
      from_call = True
    else:
      value = getattr(module, flag, None)
    if value is not None and not isinstance(value, (bool, np.bool_)):
      return None          # a traced or unusual flag: not decidable here
    if value:
      return None
    prefix = "nnx" if issubclass(cls, nnx.Module) else "nn"
    label = f"{prefix}.{cls.__name__}"
    if type(module) is not cls:
      label = f"{type(module).__name__}, an {label}"
    return label, flag, value, from_call
  return None


def _training_message(description: str, path: str, label: str, flag: str,
                      value, from_call: bool) -> str:
  where = f"{description}: `{path or '<root>'}` ({label})"
  state = (f"{flag}={value}" if value is not None else f"{flag} is not set")
  after = "before calibrating, exporting or quantizing it"
  nnx_model = label.startswith("nnx.") or ", an nnx." in label
  if from_call:
    fix = (f"pass {flag}=True where the model calls it (e.g. train=False)"
           if nnx_model or description.startswith("function:") else
           f"pass {flag}=True where the model calls it, or hand qlite a "
           f"function with the inference flags, e.g. `lambda variables, x: "
           f"model.apply(variables, x, train=False)` (with variables=...)")
    return f"{where} is called with {state} (training mode): {fix}, {after}"
  if nnx_model:
    fix = (f"call model.eval() (or use nnx.view(model, {flag}=True)) "
           f"{after}")
  else:
    fix = (f"construct it with {flag}=True (e.g. {flag}=not train, with the "
           f"model built or called with train=False) {after}")
  return f"{where} is in training mode ({state}): {fix}"


class _Found(Exception):
  """Carries the first training-mode module out of a diagnostic trace."""


def _raise_training_mode(exc: BaseException, description: str,
                         rerun: Callable[[], Any] | None = None) -> None:
  """Raises QliteError when ``exc`` (raised by the model while traced) comes
  from a module in training mode: naming the Linen module found by
  re-running ``rerun`` under a method interceptor, else with a hint from
  flax's error. Returns when ``exc`` is something else."""
  found = _linen_training_module(rerun) if rerun is not None else None
  if found is not None:
    raise QliteError(_training_message(description, *found)) from exc
  hint = training_mode_hint(exc)
  if hint:
    raise QliteError(f"{description}: {type(exc).__name__}: {exc}{hint}"
                     ) from exc


def _linen_training_module(rerun: Callable[[], Any]):
  """Runs ``rerun`` (a Linen apply) with a method interceptor that stops at
  the first BatchNorm / Dropout / attention called in training mode;
  returns ``(path, label, flag, value, from_call)`` or None."""
  def interceptor(next_fun, a, k, context):
    if context.method_name == "__call__":
      m = context.module
      found = _training_flag(m, type(m).__call__, a, k, _LINEN_TRAINING_FLAGS)
      if found is not None:
        path = "/".join(str(p) for p in (getattr(m, "path", None) or ()))
        raise _Found((path or m.name or "", *found))
    return next_fun(*a, **k)
  try:
    with nn.intercept_methods(interceptor):
      rerun()
  except _Found as f:
    return f.args[0]
  except Exception:  # pylint: disable=broad-except
    return None
  return None


_MODE_VARIABLES = (nnx.BatchStat, nnx.RngState)


def _variable_value(var):
  return var.get_value() if hasattr(var, "get_value") else var.value


def _nnx_mode_state(root: nnx.Module) -> dict:
  """``{id(variable): value}`` of the batch statistics and RNG state."""
  return {id(node): _variable_value(node)
          for _, node in nnx.iter_graph(root)
          if isinstance(node, _MODE_VARIABLES)}


def _check_nnx_mode_state(root: nnx.Module, before: dict,
                          description: str) -> None:
  """Raises QliteError when running the model updated batch statistics or
  drew from an RNG stream (training mode in a module the call-time check
  does not know), naming the module that owns the variable."""
  if not before:
    return
  modules = {}
  changed = None
  for path, node in nnx.iter_graph(root):
    if isinstance(node, nnx.Module):
      modules[tuple(path)] = node
    elif changed is None and id(node) in before and \
        _variable_value(node) is not before[id(node)]:
      changed = (tuple(path), node)
  if changed is None:
    return
  vpath, var = changed
  owner, opath = root, ()
  for i in range(len(vpath) - 1, -1, -1):
    if vpath[:i] in modules:
      owner, opath = modules[vpath[:i]], vpath[:i]
      break
  where = (f"{description}: `{_path_str(opath) or '<root>'}` "
           f"({type(owner).__name__})")
  if isinstance(var, nnx.BatchStat):
    what = (f"updated its batch statistics (`{_path_str(vpath)}`) while "
            f"qlite traced it: it normalizes with batch statistics "
            f"(training mode)")
  else:
    what = (f"drew random numbers from its RNG stream (`{_path_str(vpath)}`) "
            f"while qlite traced it: dropout in training mode, or a "
            f"stochastic layer (qlite exports deterministic models)")
  raise QliteError(f"{where} {what}; call model.eval() (or use "
                   f"nnx.view(model, use_running_average=True, "
                   f"deterministic=True)) before calibrating, exporting or "
                   f"quantizing it")


def training_mode_hint(exc: BaseException) -> str:
  """A hint for a flax error that a model in training mode raises while
  traced (immutable ``batch_stats``, no ``'dropout'`` rng, unset
  ``use_running_average`` / ``deterministic``), else ``""``."""
  text = str(exc)
  if isinstance(exc, flax_errors.ModifyScopeVariableError) and \
      "batch_stats" in text:
    return ("; a BatchNorm in training mode updates its batch statistics: "
            "use use_running_average=True (or train=False in the model's "
            "call)")
  if isinstance(exc, flax_errors.InvalidRngError) or \
      "no `rngs` argument was provided to Dropout" in text:
    return ("; a Dropout (or attention dropout) in training mode needs an "
            "rng: use deterministic=True (or train=False in the model's "
            "call; NNX: model.eval())")
  if any(f"{q}{flag}{q}" in text for flag in ("use_running_average",
                                             "deterministic")
         for q in ('"', "`")):
    return ("; set the inference flag: use_running_average=True / "
            "deterministic=True (or train=False; NNX: model.eval())")
  return ""
