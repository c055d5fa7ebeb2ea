"""Constant folding of a traced graph: everything computed from params and
constants only, evaluated once in one jitted call, with the compiled fold
shared between graphs of the same static structure (calibration at batch N
and export at batch 1)."""

from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.extend import core as jcore

from qlite.trace.graph import Graph, Lit, _is_key, bind

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
                needed: set[int] | None = None) -> dict[int, Any]:
  """Evaluates the static (param-only) part of the graph in one jitted call;
  returns ``{var: numpy value}`` (a jax array for a PRNG key) for the
  static vars that activation ops consume (or for ``needed``). One compile
  instead of one per primitive (BatchNorm folding chains made op-by-op
  evaluation the slow part), shared by graphs whose static part is the
  same (see ``_FOLD_CACHE``)."""
  if needed is None:
    needed = {a for n in graph.nodes for a in n.inputs
              if not isinstance(a, Lit) and a in graph.static}
  nodes = [n for n in graph.nodes if all(o in graph.static for o in n.outputs)]
  # PRNG key arithmetic (jax.random.key in the model, e.g. an RNN's carry
  # initializer) is folded whole, so evaluate() skips all of it and no key
  # reaches a converted function (not even an unused one)
  keyed = {o for n in nodes
           if any(_is_key(graph.avals[v]) for v in n.outputs) or any(
               _is_key(graph.avals[a]) for a in n.inputs
               if not isinstance(a, Lit))
           for o in n.outputs}
  if keyed:
    needed = set(needed) | keyed
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
    val = env[v] if v in direct else next(it)
    # a PRNG key (jax.random.key in the model) has no numpy form: kept as
    # the jax key array, folded like any other constant
    out[v] = val if _is_key(val) else np.asarray(val)
  return out
