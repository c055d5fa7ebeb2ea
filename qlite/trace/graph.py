"""Capture a model as a flat graph of jax primitives, each with its Flax module
path and source line, and evaluate that graph with a hook on every op.

This is how qlite intercepts the ops of unmodified Linen / NNX models: the
model function is traced once to a jaxpr (params as inputs), calls such as
``pjit`` / ``custom_jvp_call`` are inlined, and the resulting :class:`Graph` is
re-evaluated by :func:`evaluate`, which lets a provider replace any value
(quantize a weight, record or fake-quantize an activation).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax._src import source_info_util
from jax.extend import core as jcore

from qlite.errors import QliteError
from qlite.trace import intercept
from qlite.trace.flax_hooks import ModelFunction

# Higher-order primitives whose body is inlined, and the param holding it.
_INLINE_PARAMS = {
    "pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat": "jaxpr", "checkpoint": "jaxpr", "custom_lin": None,
    "custom_vmap_call": "call",
}

_LIB_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in
                  (jax, __import__("flax"), __import__("qlite")))


@dataclasses.dataclass(frozen=True)
class Lit:
  """A literal operand."""
  value: Any


@dataclasses.dataclass
class Node:
  """One primitive application in a flattened graph."""
  index: int
  prim: Any                 # jax Primitive
  params: dict
  inputs: list              # var ids (int) or Lit
  outputs: list[int]
  module_path: str          # e.g. "Encoder_0/Dense_1" ("" for the root)
  source: str               # "file.py:12 (fn)" of the user's code

  @property
  def name(self) -> str:
    """The primitive's name; for a composite, the composite's name."""
    if self.prim.name == "composite":
      return str(self.params.get("name", "composite"))
    return self.prim.name

  def where(self) -> str:
    """Human-readable location: op, module path and source line."""
    path = self.module_path or "<root module>"
    return f"op `{self.name}` in module `{path}` ({self.source})"


@dataclasses.dataclass
class Graph:
  """A flat, inlined jaxpr of ``fn(params, *args)``."""
  nodes: list[Node]
  param_vars: list[int]
  arg_vars: list[int]
  out_vars: list            # var ids or Lit
  consts: dict[int, Any]
  avals: dict[int, Any]
  static: set[int]          # vars computed from params / constants only
  producer: dict[int, Node]
  consumers: dict[int, list[Node]]
  params_tree: Any
  args_tree: Any
  out_tree: Any

  def is_float(self, var) -> bool:
    if isinstance(var, Lit):
      return False
    return np.issubdtype(np.dtype(self.avals[var].dtype), np.floating)

  def is_activation(self, var) -> bool:
    """A float tensor that depends on the model inputs."""
    return (not isinstance(var, Lit)) and var not in self.static and \
        self.is_float(var)


def _user_source(source_info) -> str:
  tb = source_info.traceback
  if tb is not None:
    try:
      frames = list(source_info_util.user_frames(tb))
    except Exception:  # private API: fall back to jax's summary
      frames = []
    for frame in frames:
      if not frame.file_name.startswith(_LIB_DIRS) and \
          "site-packages" not in frame.file_name:
        return f"{frame.file_name}:{frame.start_line} ({frame.function_name})"
  return source_info_util.summarize(source_info)


def _module_path(stack: str, root_name: str) -> str:
  parts = [p for p in stack.split("/") if p]
  if root_name and parts and parts[0] == root_name:
    parts = parts[1:]
  return "/".join(parts)


# Recent traces by (model key, trees, shapes): calibrate() then export_tflite()
# on one model trace it once (a zoo model: 0.1-0.2 s a trace).
_TRACE_CACHE: "collections.OrderedDict[Any, Graph]" = collections.OrderedDict()
_TRACE_CACHE_SIZE = 4


def trace(mf: ModelFunction, args: Sequence[Any]) -> Graph:
  """Traces ``mf.fn(mf.params, *args)`` into a flat :class:`Graph` (reused
  for an equal model, see ``ModelFunction.cache_key``, at the same param /
  arg structure, shapes and dtypes). Graphs are never modified after
  tracing.

  Raises:
    QliteError: tracing the model failed (the message carries the cause).
  """
  flat_params, params_tree = jax.tree.flatten(mf.params)
  flat_args, args_tree = jax.tree.flatten(tuple(args))
  key = None
  if mf.cache_key is not None:
    key = (mf.cache_key, mf.root_name, params_tree, args_tree,
           tuple((np.shape(x), str(_dtype_of(x)))
                 for x in flat_params + flat_args))
    try:
      hit = _TRACE_CACHE.get(key)
    except TypeError:           # an unhashable tree node
      key, hit = None, None
    if hit is not None:
      _TRACE_CACHE.move_to_end(key)
      return hit
  g = _trace(mf, flat_params, params_tree, flat_args, args_tree)
  if key is not None:
    _TRACE_CACHE[key] = g
    while len(_TRACE_CACHE) > _TRACE_CACHE_SIZE:
      _TRACE_CACHE.popitem(last=False)
  return g


def _trace(mf: ModelFunction, flat_params, params_tree, flat_args,
           args_tree) -> Graph:

  def flat_fn(*flat):
    params = jax.tree.unflatten(params_tree, flat[:len(flat_params)])
    a = jax.tree.unflatten(args_tree, flat[len(flat_params):])
    return mf.fn(params, *a)

  specs = [jax.ShapeDtypeStruct(np.shape(x), _dtype_of(x))
           for x in flat_params + flat_args]
  try:
    with intercept.active():
      closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*specs)
  except QliteError:
    raise
  except Exception as e:  # the user's model raised while tracing
    raise QliteError(f"tracing {mf.description} on inputs "
                     f"{[tuple(s.shape) for s in specs[len(flat_params):]]} "
                     f"failed: {type(e).__name__}: {e}") from e
  out_tree = jax.tree.structure(out_shape)

  nodes: list[Node] = []
  consts: dict[int, Any] = {}
  avals: dict[int, Any] = {}
  counter = [0]

  def new_var(aval) -> int:
    counter[0] += 1
    avals[counter[0]] = aval
    return counter[0]

  def inline(jaxpr, jconsts, in_ids, prefix: str):
    env: dict = {}
    for v, c in zip(jaxpr.constvars, jconsts):
      i = new_var(v.aval)
      consts[i] = c
      env[v] = i
    for v, i in zip(jaxpr.invars, in_ids):
      env[v] = i

    def read(a):
      return Lit(a.val) if isinstance(a, jcore.Literal) else env[a]

    for eqn in jaxpr.eqns:
      ins = [read(a) for a in eqn.invars]
      stack = str(eqn.source_info.name_stack)
      full = f"{prefix}/{stack}" if prefix and stack else (prefix or stack)
      name = eqn.primitive.name
      if name in _INLINE_PARAMS and _INLINE_PARAMS[name] in eqn.params:
        body = eqn.params[_INLINE_PARAMS[name]]
        if hasattr(body, "jaxpr"):   # ClosedJaxpr
          inner, inner_consts = body.jaxpr, body.consts
        else:
          inner, inner_consts = body, []
        n_extra = len(ins) - len(inner.invars)
        outs = inline(inner, inner_consts, ins[n_extra:] if n_extra > 0
                      else ins, full)
        for v, o in zip(eqn.outvars, outs):
          env[v] = o
        continue
      outs = [new_var(v.aval) for v in eqn.outvars]
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
      nodes.append(Node(len(nodes), eqn.primitive, dict(eqn.params), ins,
                        outs, _module_path(full, mf.root_name),
                        _user_source(eqn.source_info)))
    return [read(v) for v in jaxpr.outvars]

  n_params = len(flat_params)
  in_ids = [new_var(v.aval) for v in closed.jaxpr.invars]
  out_ids = inline(closed.jaxpr, closed.consts, in_ids, "")

  static = set(in_ids[:n_params]) | set(consts)
  producer: dict[int, Node] = {}
  consumers: dict[int, list[Node]] = {}
  for node in nodes:
    if all(isinstance(a, Lit) or a in static for a in node.inputs):
      static.update(node.outputs)
    for o in node.outputs:
      producer[o] = node
    for a in node.inputs:
      if not isinstance(a, Lit):
        consumers.setdefault(a, []).append(node)
  return Graph(nodes, in_ids[:n_params], in_ids[n_params:], out_ids, consts,
               avals, static, producer, consumers, params_tree, args_tree,
               out_tree)


def _dtype_of(x):
  return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


Hook = Callable[[Node, list], "list | None"]


def bind(node: Node, invals: list) -> list:
  """Applies ``node``'s primitive to ``invals``; returns a list of outputs."""
  out = node.prim.bind(*invals, **node.params)
  return list(out) if node.prim.multiple_results else [out]


def evaluate(graph: Graph, flat_params: Sequence[Any], flat_args: Sequence[Any],
             *, on_value: Callable[[int, Any], Any] | None = None,
             on_node: Hook | None = None,
             preset: dict[int, Any] | None = None) -> list:
  """Evaluates ``graph``; returns the flat outputs.

  ``on_node(node, invals)`` may return the node's outputs (replacing the
  primitive) or None to run it unchanged. ``on_value(var, value)`` sees every
  value as it is defined (inputs included) and returns the value to store.
  ``preset`` gives values (e.g. folded constants) whose producers are skipped.
  """
  env: dict[int, Any] = dict(preset or {})

  def define(var, val):
    env[var] = on_value(var, val) if on_value is not None else val

  for var, val in graph.consts.items():
    env[var] = val
  for var, val in zip(graph.param_vars, flat_params):
    define(var, val)
  for var, val in zip(graph.arg_vars, flat_args):
    define(var, val)

  def read(a):
    return a.value if isinstance(a, Lit) else env[a]

  for node in graph.nodes:
    if preset and all(o in env for o in node.outputs):
      continue
    invals = [read(a) for a in node.inputs]
    # Re-enter the module's name scope: converted tensors keep the path.
    with jax.named_scope(node.module_path) if node.module_path else \
        contextlib.nullcontext():
      outs = on_node(node, invals) if on_node is not None else None
      if outs is None:
        outs = bind(node, invals)
    for var, val in zip(node.outputs, outs):
      define(var, val)
  return [read(a) for a in graph.out_vars]


# Compiled fold functions by the structure of the static subgraph: the
# calibration (batch N) and the export (batch 1) trace the same param-only
# equations, so the second fold reuses the first one's XLA compile
# (ResNet-like zoo model: 0.11 s of a 0.5 s export).
_FOLD_CACHE: "collections.OrderedDict[Any, Callable]" = \
    collections.OrderedDict()
_FOLD_CACHE_SIZE = 8


def _fold_signature(graph: Graph, nodes: list, wanted: list, direct: set,
                    flat_params: Sequence[Any]):
  """A hashable description of what ``fold_static`` evaluates, or None when
  some equation parameter has no stable text form."""
  def aval(x):
    return (tuple(np.shape(x)), str(getattr(x, "dtype", type(x).__name__)))

  def arg(a):
    return ("lit", repr(a.value)) if isinstance(a, Lit) else a

  def exact_text(v) -> bool:
    # array reprs elide values ("..."), a closed jaxpr's repr omits consts
    if isinstance(v, (np.ndarray, jax.Array)):
      return np.size(v) <= 16
    if isinstance(v, jcore.ClosedJaxpr):
      return not v.consts
    if isinstance(v, (tuple, list)):
      return all(exact_text(x) for x in v)
    return True

  if not all(exact_text(v) for n in nodes for v in n.params.values()):
    return None
  try:
    sig = (tuple((n.prim.name, tuple(arg(a) for a in n.inputs),
                  tuple(n.outputs), repr(sorted(n.params.items())))
                 for n in nodes),
           tuple(wanted), tuple(sorted(direct)), tuple(graph.param_vars),
           tuple(aval(p) for p in flat_params),
           tuple((k, aval(v)) for k, v in sorted(graph.consts.items())))
  except Exception:   # pylint: disable=broad-except
    return None
  text = repr(sig)
  # reprs of functions / objects carry addresses: never share those
  return None if " at 0x" in text else text


def fold_static(graph: Graph, flat_params: Sequence[Any],
                needed: set[int] | None = None) -> dict[int, np.ndarray]:
  """Evaluates the static (param-only) part of the graph in one jitted call;
  returns ``{var: numpy value}`` for the static vars that activation ops
  consume (or for ``needed``). One compile instead of one per primitive
  (BatchNorm folding chains made op-by-op evaluation the slow part), shared
  by graphs whose static part is the same (see ``_FOLD_CACHE``)."""
  if needed is None:
    needed = {a for n in graph.nodes for a in n.inputs
              if not isinstance(a, Lit) and a in graph.static}
  nodes = [n for n in graph.nodes if all(o in graph.static for o in n.outputs)]
  wanted = sorted(v for v in needed if v in graph.static)
  direct = {v for v in wanted if v in graph.consts or v in graph.param_vars}
  const_vars = sorted(graph.consts)
  param_vars = list(graph.param_vars)   # `run` must not hold the graph

  def run(params, consts):
    env: dict[int, Any] = dict(zip(const_vars, consts))
    env.update(zip(param_vars, params))
    for node in nodes:
      invals = [a.value if isinstance(a, Lit) else env[a] for a in node.inputs]
      for var, val in zip(node.outputs, bind(node, invals)):
        env[var] = val
    return [env[v] for v in wanted if v not in direct]

  computed = []
  if len(wanted) > len(direct):
    key = _fold_signature(graph, nodes, wanted, direct, flat_params)
    fn = _FOLD_CACHE.get(key) if key is not None else None
    if fn is None:
      fn = jax.jit(run)
      if key is not None:
        _FOLD_CACHE[key] = fn
        while len(_FOLD_CACHE) > _FOLD_CACHE_SIZE:
          _FOLD_CACHE.popitem(last=False)
    else:
      _FOLD_CACHE.move_to_end(key)
    computed = fn(list(flat_params), [graph.consts[v] for v in const_vars])
  out = {}
  env = dict(graph.consts)
  env.update(zip(graph.param_vars, flat_params))
  it = iter(computed)
  for v in wanted:
    out[v] = np.asarray(env[v]) if v in direct else np.asarray(next(it))
  return out
