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

from qlite.errors import QliteError, UnsupportedOpError
from qlite.trace import intercept
from qlite.trace.flax_hooks import ModelFunction

# Higher-order primitives whose body is inlined, and the param holding it.
_INLINE_PARAMS = {
    "pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat": "jaxpr", "checkpoint": "jaxpr", "remat2": "jaxpr",
    "custom_lin": None,
    "custom_vmap_call": "call",
}

# Loops (``scan``, ``while`` with a trip count known while tracing) are
# unrolled; a while loop running more iterations than this is refused.
_MAX_UNROLL = 4096

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
    # jax's issubdtype: numpy's says bfloat16 / float8 are not floating
    return jax.dtypes.issubdtype(self.avals[var].dtype, np.floating)

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

  # vars whose value is known while tracing (computed from literals and
  # jaxpr constants only): what a while loop's trip count may depend on
  made_by: dict[int, Node] = {}
  literal_only: set[int] = set()
  concrete_values: dict[int, Any] = {}

  def const_ids(jaxpr, jconsts) -> list[int]:
    ids = []
    for v, c in zip(jaxpr.constvars, jconsts):
      i = new_var(v.aval)
      consts[i] = c
      ids.append(i)
    return ids

  def inline(jaxpr, jconsts, in_ids, prefix: str, suffix: str = "",
             source: str | None = None, cids: list | None = None):
    """Appends ``jaxpr``'s equations to ``nodes``; returns its outputs.
    ``suffix``: the loop iterations (``[i]``, nested ``[i][j]``) appended
    to the module path of every node; ``source``: the source line of every
    node (helper equations qlite emits); ``cids``: const ids already made."""
    env: dict = {}
    for v, i in zip(jaxpr.constvars, cids if cids is not None
                    else const_ids(jaxpr, jconsts)):
      env[v] = i
    for v, i in zip(jaxpr.invars, in_ids):
      env[v] = i

    def read(a):
      return Lit(a.val) if isinstance(a, jcore.Literal) else env[a]

    read_here: list = []     # the vars this jaxpr reads (made for a scan)

    def is_read(v) -> bool:
      if not read_here:
        read_here.append({a for e in jaxpr.eqns for a in e.invars
                          if not isinstance(a, jcore.Literal)} |
                         {a for a in jaxpr.outvars
                          if not isinstance(a, jcore.Literal)})
      return v in read_here[0]

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
                      else ins, full, suffix, source)
      elif name == "scan":
        outs = unroll_scan(eqn, ins, full, suffix,
                           [is_read(v) for v in eqn.outvars])
      elif name == "while":
        outs = unroll_while(eqn, ins, full, suffix)
      else:
        outs = [new_var(v.aval) for v in eqn.outvars]
        node = Node(len(nodes), eqn.primitive, dict(eqn.params), ins, outs,
                    _module_path(full, mf.root_name) + suffix,
                    source or _user_source(eqn.source_info))
        nodes.append(node)
        for o in outs:
          made_by[o] = node
        if all(isinstance(a, Lit) or a in consts or a in literal_only
               for a in ins):
          literal_only.update(outs)
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
    return [read(v) for v in jaxpr.outvars]

  helpers: dict = {}

  def emit(kind, fn, args, path: str, suffix: str, source: str):
    """Inlines the equations of ``fn(*args)`` (slicing / stacking that an
    unrolled loop needs) at ``path``."""
    specs = tuple(_spec(avals[a]) if not isinstance(a, Lit) else
                  _spec(jax.typeof(a.value)) for a in args)
    key = (kind, tuple((s.shape, str(s.dtype)) for s in specs))
    if key not in helpers:
      helpers[key] = jax.make_jaxpr(fn)(*specs)
    closed = helpers[key]
    return inline(closed.jaxpr, closed.consts, list(args), path, suffix,
                  source)

  def where(eqn, full, suffix) -> str:
    path = _module_path(full, mf.root_name) + suffix
    return (f"op `{eqn.primitive.name}` in module `{path or '<root module>'}`"
            f" ({_user_source(eqn.source_info)})")

  def unroll_scan(eqn, ins, full, suffix, live):
    """A scan becomes ``length`` copies of its body, carries threaded
    through; iteration ``i`` reads ``xs[i]`` and the stacked outputs are
    built once, after the last iteration, from the per-iteration values
    (``live``: which of the scan's outputs are read at all)."""
    p = eqn.params
    body, length = p["jaxpr"], int(p["length"])
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    if length > _MAX_UNROLL:
      raise UnsupportedOpError(
          f"{where(eqn, full, suffix)}: the loop runs {length} iterations, "
          f"more than the {_MAX_UNROLL} a LiteRT export unrolls")
    loop_consts = ins[:n_consts]
    carry = ins[n_consts:n_consts + n_carry]
    xs = ins[n_consts + n_carry:]
    src = _user_source(eqn.source_info)
    cids = const_ids(body.jaxpr, body.consts)
    ys_avals = [v.aval for v in body.jaxpr.outvars[n_carry:]]
    ys: list[list] = [[None] * length for _ in ys_avals]
    order = range(length - 1, -1, -1) if p["reverse"] else range(length)
    for i in order:
      it = f"{suffix}[{i}]"
      x_i = [emit(("index", i), lambda x, i=i: jax.lax.index_in_dim(
          x, i, 0, keepdims=False), [x], full, it, src)[0] for x in xs]
      outs = inline(body.jaxpr, None, loop_consts + carry + x_i, full, it,
                    None, cids)
      carry = outs[:n_carry]
      for k, y in enumerate(outs[n_carry:]):
        ys[k][i] = y
    stacked = []
    for k, aval in enumerate(ys_avals):
      if not live[n_carry + k]:
        stacked.append(None)        # never read: not built
        continue
      if length == 0:
        stacked += emit(("empty", aval), lambda aval=aval: jax.numpy.zeros(
            (0,) + tuple(aval.shape), aval.dtype), [], full, suffix, src)
        continue
      stacked += emit("stack", lambda *v: jax.lax.concatenate(
          [jax.lax.expand_dims(a, (0,)) for a in v], 0), ys[k], full,
          suffix, src)
    return carry + stacked

  def concrete(a):
    """The value of ``a`` if it is known while tracing, else None."""
    if isinstance(a, Lit):
      return a.value
    if a in consts:
      return consts[a]
    if a not in literal_only:
      return None
    if a not in concrete_values:
      node = made_by[a]
      for o, v in zip(node.outputs,
                      bind(node, [concrete(x) for x in node.inputs])):
        concrete_values[o] = v
    return concrete_values[a]

  def unroll_while(eqn, ins, full, suffix):
    """A while loop whose trip count is known while tracing (its condition
    reads only carries computed from literals, e.g. a counter) becomes that
    many copies of its body; any other while loop is refused."""
    p = eqn.params
    cond, body = p["cond_jaxpr"], p["body_jaxpr"]
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, carry = ins[:nc], ins[nc:nc + nb], ins[nc + nb:]
    # the carries the condition depends on, through any number of trips
    c_used = _live_inputs(cond.jaxpr, [True])
    rel = [u for u in c_used[nc:]]
    while True:
      b_used = _live_inputs(body.jaxpr, rel)
      new = [r or u for r, u in zip(rel, b_used[nb:])]
      if new == rel:
        break
      rel = new
    needed = [a for a, u in zip(cconsts, c_used[:nc]) if u] + \
        [a for a, u in zip(bconsts, b_used[:nb]) if u] + \
        [a for a, r in zip(carry, rel) if r]
    if any(concrete(a) is None for a in needed):
      raise UnsupportedOpError(
          f"{where(eqn, full, suffix)}: a loop whose trip count depends on "
          f"the model's inputs or parameters cannot be exported; LiteRT "
          f"int8 export unrolls "
          f"loops, so the trip count must be static (jax.lax.fori_loop with "
          f"Python int bounds, jax.lax.scan, or a while_loop whose "
          f"condition reads only a counter)")
    cvals = [concrete(a) if u else None for a, u in zip(cconsts, c_used[:nc])]
    bvals = [concrete(a) if u else None for a, u in zip(bconsts, b_used[:nb])]
    state = [concrete(a) if r else None for a, r in zip(carry, rel)]
    trips = 0
    while bool(_eval_live(cond, cvals + state, [True])[0]):
      trips += 1
      if trips > _MAX_UNROLL:
        raise UnsupportedOpError(
            f"{where(eqn, full, suffix)}: the loop runs more than "
            f"{_MAX_UNROLL} iterations, more than a LiteRT export unrolls")
      state = _eval_live(body, bvals + state, rel)
    cids = const_ids(body.jaxpr, body.consts)
    for t in range(trips):
      carry = inline(body.jaxpr, None, bconsts + carry, full,
                     f"{suffix}[{t}]", None, cids)
    return carry

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


def _spec(aval) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(aval.shape), aval.dtype)


def _is_key(x) -> bool:
  """True for a typed PRNG key array (or its aval): no numpy form."""
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype,
                                                     jax.dtypes.prng_key)


def _live_inputs(jaxpr, live_outs: Sequence[bool]) -> list[bool]:
  """Which of ``jaxpr``'s inputs (constvars excluded) the outputs marked
  in ``live_outs`` depend on (an equation reads all of its inputs)."""
  live = {v for v, l in zip(jaxpr.outvars, live_outs)
          if l and not isinstance(v, jcore.Literal)}
  for eqn in reversed(jaxpr.eqns):
    if any(v in live for v in eqn.outvars):
      live.update(v for v in eqn.invars if not isinstance(v, jcore.Literal))
  return [v in live for v in jaxpr.invars]


def _eval_live(closed, in_vals: Sequence[Any], live_outs: Sequence[bool]
               ) -> list:
  """Evaluates the outputs of closed jaxpr ``closed`` marked in
  ``live_outs`` (None for the others) from ``in_vals``, where the inputs
  they do not depend on may be None."""
  jaxpr = closed.jaxpr
  env: dict = dict(zip(jaxpr.constvars, closed.consts))
  env.update(zip(jaxpr.invars, in_vals))
  live = {v for v, l in zip(jaxpr.outvars, live_outs)
          if l and not isinstance(v, jcore.Literal)}
  eqns = []
  for eqn in reversed(jaxpr.eqns):
    if any(v in live for v in eqn.outvars):
      eqns.append(eqn)
      live.update(v for v in eqn.invars if not isinstance(v, jcore.Literal))

  def read(a):
    return a.val if isinstance(a, jcore.Literal) else env[a]

  for eqn in reversed(eqns):
    out = eqn.primitive.bind(*[read(a) for a in eqn.invars], **eqn.params)
    env.update(zip(eqn.outvars, out if eqn.primitive.multiple_results
                   else [out]))
  return [read(v) if l else None for v, l in zip(jaxpr.outvars, live_outs)]


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


# Folding lives in qlite/trace/fold.py; its entry point is re-exported here
# (callers and tests reach it as graph.fold_static).
from qlite.trace.fold import _FOLD_CACHE, fold_static  # noqa: E402,F401
