"""Float values computed from one bounded integer become a table lookup.

Rotary / timestep embeddings compute ``sin`` / ``cos`` of integer positions
(``jnp.cumsum`` of a padding mask, ``arange`` plus a cache index, an int
timestep input); graph networks cast integer degree counts to float
(``rsqrt(max(degree, 1))``). LiteRT has no int8 SIN / COS and CAST to float
has no int8 form, but every such value is a function of an integer below a
static maximum: the whole float computation from the int -> float cast up to
the values the rest of the model reads (a :class:`Region`) is replaced, in
the exported model, by ``GATHER(table, clip(i, lo, hi) - lo)`` from a
constant table computed at export time (one row per integer in ``[lo,
hi]``), quantized at the boundary of the value it replaces (the consumer's
scale). Axes along which the table does not vary are dropped, so a rotary
table is ``rows x head_dim / 2``.

The integer's range ``[lo, hi]`` comes from :func:`int_range` when the
graph bounds it (iota, cumsum of a 0/1 mask over an axis of length L,
sums and segment sums of bounded values, clamps, small int dtypes); else
from calibration (the observed range, widened to the next power of two,
``probe`` statistics recorded beside the boundaries), with a warning that
values outside it are clamped and a :class:`~qlite.errors.UnsupportedOpError`
when the table would exceed :data:`MAX_TABLE_ROWS`. A region whose output is
the integer itself (a plain int -> float cast) with ``hi - lo < 256`` gets
the fixed range ``[lo, lo + 255]``: scale 1, every integer exact.

Calibration runs the float ops; only the converted (fake-quant) model looks
the values up. Bool -> float casts are not regions (``shape.Cast`` runs them
as a SELECT of two constants).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlite.errors import CalibrationError, UnsupportedOpError
from qlite.ops import base

# The most table rows an export builds (int positions up to 65535).
MAX_TABLE_ROWS = 1 << 16

# Ops applied elementwise (an output element depends on the same element of
# each operand): inside a region they follow the integer's index unchanged.
ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "max", "min", "pow", "integer_pow", "neg",
    "abs", "sign", "sin", "cos", "tan", "exp", "exp2", "log", "log1p",
    "expm1", "sqrt", "rsqrt", "cbrt", "tanh", "logistic", "erf", "erfc",
    "atan2", "atan", "asin", "acos", "sinh", "cosh", "floor", "ceil",
    "round", "square", "rem", "clamp", "convert_element_type",
    "reduce_precision", "select_n",
})
# Ops that move elements: inside a region they move the index too.
MOVES = frozenset({"reshape", "broadcast_in_dim", "transpose", "squeeze",
                   "expand_dims", "slice", "rev", "copy", "copy_p"})


@dataclasses.dataclass(frozen=True)
class Region:
  """The float ops computed from one integer var ``source``.

  Attributes:
    source: the integer var (not bool, not static).
    nodes: indices of the region's nodes, in graph order.
    exits: the vars of the region that other ops (or the model's outputs)
      read: each becomes a table lookup.
    lo, hi: the integer's range; None until resolved from calibration.
    probe_key: the statistics key calibration records the integer's
      observed range under (when the graph does not bound it).
    where: the first cast's op / module / source line, for messages.
  """
  source: int
  nodes: tuple
  exits: tuple
  lo: int | None
  hi: int | None
  probe_key: str
  where: str
  bounded: bool = False       # (lo, hi) from the graph, not calibration

  @property
  def resolved(self) -> bool:
    return self.lo is not None


def _is_int(graph, var) -> bool:
  if not isinstance(var, int):
    return False
  dt = np.dtype(graph.avals[var].dtype)
  return np.issubdtype(dt, np.integer)


def find_regions(graph, role) -> list[Region]:
  """The regions of ``graph`` (see :class:`Region`); ``role(node)`` is the
  op handler's role (trailing pass-through ops are left out of a region:
  they run on int8 at the lookup's scale)."""
  src: dict[int, int] = {}          # float var -> its integer source
  member: set[int] = set()
  for node in graph.nodes:
    outs = node.outputs
    if not outs or not all(graph.is_activation(o) for o in outs):
      continue
    if node.name == "convert_element_type" and len(node.inputs) == 1 and \
        _is_int(graph, node.inputs[0]) and \
        node.inputs[0] not in graph.static:
      s = node.inputs[0]
    elif node.name in ELEMENTWISE or node.name in MOVES:
      sources = set()
      ok = True
      for a in node.inputs:
        if not isinstance(a, int) or a in graph.static:
          continue
        if a in src:
          sources.add(src[a])
        else:
          ok = False
      if not ok or len(sources) != 1:
        continue
      if node.name in MOVES and sum(1 for a in node.inputs if isinstance(
          a, int) and a not in graph.static) != 1:
        continue
      s = sources.pop()
    else:
      continue
    member.add(node.index)
    for o in outs:
      src[o] = s

  def is_source_cast(n) -> bool:
    return n.name == "convert_element_type" and _is_int(graph, n.inputs[0])

  while True:
    exits = {o for i in member for o in graph.nodes[i].outputs
             if o in graph.out_vars or any(
                 c.index not in member for c in graph.consumers.get(o, []))}
    drop = set()
    for i in member:
      node = graph.nodes[i]
      reads = [a for a in node.inputs if isinstance(a, int) and a in src]
      # a region value read both inside and outside: the inside reader
      # starts over from the looked-up value
      if any(a in exits for a in reads) or any(
          graph.producer[a].index not in member for a in reads):
        drop.add(i)
      elif not is_source_cast(node) and role(node) == base.PASS_THROUGH and \
          all(o in exits for o in node.outputs):
        drop.add(i)        # a trailing reshape / broadcast / float cast
    if not drop:
      break
    member -= drop
    for i in drop:
      for o in graph.nodes[i].outputs:
        src.pop(o, None)

  by_source: dict[int, list[int]] = {}
  for i in sorted(member):
    by_source.setdefault(src[graph.nodes[i].outputs[0]], []).append(i)
  regions = []
  for s, idx in by_source.items():
    outs = [o for i in idx for o in graph.nodes[i].outputs if o in exits]
    first = graph.nodes[idx[0]]
    try:
      rng = int_range(graph, s)
    except RecursionError:     # a very long integer chain: calibration
      rng = None
    key = (f"{first.module_path}/" if first.module_path else "") + \
        f"convert_element_type:int_range:{s}"
    regions.append(Region(
        s, tuple(idx), tuple(outs), None if rng is None else rng[0],
        None if rng is None else rng[1], key, first.where(),
        bounded=rng is not None))
  return regions


_INF = float("inf")
_ANY = (-_INF, _INF)


def _dtype_bounds(dtype):
  dt = np.dtype(dtype)
  if dt == np.bool_:
    return 0, 1
  if np.issubdtype(dt, np.integer) and dt.itemsize <= 2:
    info = np.iinfo(dt)
    return int(info.min), int(info.max)
  return _ANY


def int_range(graph, var) -> tuple[int, int] | None:
  """A sound ``(lo, hi)`` of integer (or bool) var ``var`` from the ops
  that compute it, or None when they do not bound it (an int32 model input,
  a division...)."""
  lo, hi = _bounds(graph, var, {})
  if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
    return None
  return int(lo), int(hi)


def _bounds(graph, var, memo):
  """``(lo, hi)`` with infinities for what is not bounded."""
  if not isinstance(var, int):
    v = np.asarray(var.value)
    return (int(v.min()), int(v.max())) if v.size else _ANY
  if var not in memo:
    memo[var] = _ANY            # (no cycles; keeps recursion finite)
    memo[var] = _int_range(graph, var, memo)
  return memo[var]


def _mul(a, b):
  p = [x * y if x and y else 0 for x in a for y in b]   # 0 * inf = 0
  return min(p), max(p)


def _int_range(graph, var, memo):
  aval = graph.avals[var]
  dt = np.dtype(aval.dtype)
  if dt == np.bool_:
    return 0, 1
  if var in graph.consts:
    v = np.asarray(graph.consts[var])
    return (int(v.min()), int(v.max())) if v.size else _ANY
  node = graph.producer.get(var)
  if node is None:
    return _dtype_bounds(dt)
  r = lambda a: _bounds(graph, a, memo)
  name, ins = node.name, node.inputs
  shape = tuple(aval.shape)
  if name == "iota":
    n = shape[node.params["dimension"]]
    return 0, max(n - 1, 0)
  if name in MOVES or name in ("convert_element_type", "dynamic_slice",
                               "gather", "reduce_max", "reduce_min",
                               "cummax", "cummin", "reduce_precision"):
    src_dt = np.asarray(ins[0].value).dtype if not isinstance(ins[0], int) \
        else np.dtype(graph.avals[ins[0]].dtype)
    if name == "convert_element_type" and not (
        np.issubdtype(src_dt, np.integer) or src_dt == np.bool_):
      return _dtype_bounds(dt)
    a = r(ins[0])
    b = _dtype_bounds(dt)
    return max(a[0], b[0]), min(a[1], b[1])
  if name in ("add", "sub", "mul", "max", "min"):
    a, b = r(ins[0]), r(ins[1])
    if name == "add":
      return a[0] + b[0], a[1] + b[1]
    if name == "sub":
      return a[0] - b[1], a[1] - b[0]
    if name == "mul":
      return _mul(a, b)
    if name == "max":
      return max(a[0], b[0]), max(a[1], b[1])
    return min(a[0], b[0]), min(a[1], b[1])
  if name == "neg":
    a = r(ins[0])
    return -a[1], -a[0]
  if name == "abs":
    a = r(ins[0])
    return (0 if a[0] <= 0 <= a[1] else min(abs(a[0]), abs(a[1])),
            max(abs(a[0]), abs(a[1])))
  if name == "clamp":                    # clamp(lo, x, hi)
    lo, x, hi = r(ins[0]), r(ins[1]), r(ins[2])
    return max(x[0], lo[0]), min(x[1], hi[1])
  if name == "select_n":
    cases = [r(a) for a in ins[1:]]
    return min(c[0] for c in cases), max(c[1] for c in cases)
  if name in ("concatenate", "pad"):
    parts = [r(a) for a in ins]
    return min(p[0] for p in parts), max(p[1] for p in parts)
  if name in ("cumsum", "reduce_sum"):
    a = r(ins[0])
    in_shape = graph.avals[ins[0]].shape
    if name == "cumsum":
      n = int(in_shape[node.params["axis"]])
    else:
      n = int(np.prod([in_shape[d] for d in node.params["axes"]]))
    return min(a[0], _mul(a, (n, n))[0]), max(a[1], _mul(a, (n, n))[1])
  if name == "scatter-add":              # operand, indices, updates
    base_r, upd = r(ins[0]), r(ins[2])
    n = int(np.prod(graph.avals[ins[2]].shape))
    u = _mul(upd, (n, n))
    return base_r[0] + min(0, u[0]), base_r[1] + max(0, u[1])
  if name in ("argmax", "argmin"):
    n = int(graph.avals[ins[0]].shape[node.params["axes"][0]])
    return 0, max(n - 1, 0)
  return _dtype_bounds(dt)


def _widened(lo: int, hi: int) -> tuple[int, int]:
  """An observed range widened to powers of two (headroom past what
  calibration saw: positions 0..7 stay 0..7, a timestep seen up to 997
  covers 0..1023)."""
  def up(n):          # smallest 2**k - 1 >= n, for n >= 0
    return (1 << max(int(n), 0).bit_length()) - 1
  new_hi = up(hi) if hi >= 0 else hi
  new_lo = 0 if lo >= 0 else -(up(-lo - 1) + 1)
  return new_lo, new_hi


def probe_stats(val) -> dict:
  """What calibration records at a region's integer: its min and max."""
  return {"min": jnp.min(val).astype(jnp.int32),
          "max": jnp.max(val).astype(jnp.int32)}


def merge_probe(old: dict | None, batch: dict) -> dict:
  """Aggregates :func:`probe_stats` over batches (the overall min / max)."""
  lo, hi = int(batch["min"]), int(batch["max"])
  if old is not None:
    lo, hi = min(lo, int(old["min"])), max(hi, int(old["max"]))
  return {"min": np.asarray(lo, np.int64), "max": np.asarray(hi, np.int64)}


def resolve(regions: dict, stats) -> dict:
  """``regions`` (node index -> :class:`Region`) with every range known:
  those the graph does not bound take calibration's (``stats``).

  Raises:
    CalibrationError: ``stats`` has no record of a region's integer
      (calibrated before qlite recorded them: calibrate again).
    UnsupportedOpError: the table would have more than
      :data:`MAX_TABLE_ROWS` rows.
  """
  done: dict[int, Region] = {}
  out = {}
  for i, r in regions.items():
    if r.source not in done:
      if r.resolved:
        new = r
      else:
        rec = None
        if stats is not None and r.probe_key in stats:
          rec = stats[r.probe_key]
        if rec is None:
          raise CalibrationError(
              f"no calibration record of the integer range at "
              f"`{r.probe_key}` ({r.where}): calibrate again with this "
              f"qlite (it records the range of integers that float values "
              f"are computed from)")
        lo, hi = _widened(int(rec["min"]), int(rec["max"]))
        new = dataclasses.replace(r, lo=lo, hi=hi)
        warnings.warn(
            f"{r.where}: float values computed from an integer run as a "
            f"lookup table over [{lo}, {hi}] (calibration saw "
            f"[{int(rec['min'])}, {int(rec['max'])}]); integers outside "
            f"it are clamped. Bound the integer in the model (e.g. "
            f"jnp.clip(pos, 0, MAX_LEN - 1)) to size the table from the "
            f"graph instead", stacklevel=4)
      if new.hi - new.lo + 1 > MAX_TABLE_ROWS:
        raise UnsupportedOpError(
            f"{r.where}: float values computed from an integer in "
            f"[{new.lo}, {new.hi}] need a {new.hi - new.lo + 1}-row lookup "
            f"table, more than {MAX_TABLE_ROWS}; bound the integer in the "
            f"model (e.g. jnp.clip(pos, 0, MAX_LEN - 1)) or keep the module "
            f"in float with a rule act_qtype=None and strict=False")
      done[r.source] = new
    out[i] = done[r.source]
  return out


def exact_cast_range(graph, region: Region, var: int):
  """``(lo, lo + 255)`` when exit ``var`` of resolved ``region`` is the
  integer itself (a plain cast) and its range fits int8 at scale 1, else
  None."""
  node = graph.producer[var]
  if node.name != "convert_element_type" or node.inputs[0] != region.source:
    return None
  if not region.resolved or region.hi - region.lo > 255:
    return None
  return float(region.lo), float(region.lo + 255)


class _Lookup:
  """A region value while the converted model is built: ``index`` (int32,
  the value's shape: which table row each element reads) and ``rows``
  (numpy, ``(hi - lo + 1, *shape)``: the value for every integer)."""

  def __init__(self, index, rows):
    self.index = index
    self.rows = rows


def _eager(fn, *args):
  with jax.ensure_compile_time_eval():
    return fn(*args)


def lower(region: Region, node, invals: list) -> list:
  """The outputs of region node ``node`` in the converted model: a
  :class:`_Lookup` for values the region reads on, a GATHER from the
  table for its exits."""
  from qlite.trace.graph import bind       # (layer 3: below ops)
  n_rows = region.hi - region.lo + 1
  if node.name == "convert_element_type" and node.inputs[0] == region.source:
    shape = tuple(np.shape(invals[0]))
    dtype = np.dtype(node.params["new_dtype"])
    index = jnp.clip(invals[0], region.lo, region.hi).astype(jnp.int32) - \
        np.int32(region.lo)
    rows = np.broadcast_to(
        np.arange(region.lo, region.hi + 1).astype(dtype).reshape(
            (n_rows,) + (1,) * len(shape)), (n_rows,) + shape)
    outs = [_Lookup(index, rows)]
  else:
    looks = [v for v in invals if isinstance(v, _Lookup)]
    axes = tuple(0 if isinstance(v, _Lookup) else None for v in invals)
    args = [v.rows if isinstance(v, _Lookup) else v for v in invals]
    rows = _eager(lambda *a: jax.vmap(lambda *x: bind(node, list(x)),
                                      in_axes=axes)(*a), *args)
    if node.name in MOVES:
      index = bind(node, [looks[0].index if isinstance(v, _Lookup) else v
                          for v in invals])
      index = index[0]
    rows = rows if isinstance(rows, (list, tuple)) else [rows]
    if node.name not in MOVES:
      index = jnp.broadcast_to(looks[0].index, np.shape(rows[0])[1:])
    outs = [_Lookup(index, np.asarray(r)) for r in rows]
  return [_gather(o) if var in region.exits else o
          for var, o in zip(node.outputs, outs)]


def _gather(look: _Lookup):
  """``table[index]``: the table without the axes it is constant along."""
  rows = np.asarray(look.rows, np.float32)
  keep = []
  table = rows
  for axis in range(1, rows.ndim):
    first = np.take(table, [0], axis=axis)
    if np.all(table == first):
      table = first
    else:
      keep.append(axis)
  n = table.shape[0]
  cols = int(np.prod(table.shape[1:], dtype=np.int64))
  flat = jnp.asarray(table.reshape(n * cols))
  index = look.index
  if cols > 1:
    col = np.arange(cols, dtype=np.int32).reshape(table.shape[1:])
    index = index * np.int32(cols) + np.broadcast_to(col, index.shape)
  return flat.at[index].get(mode="promise_in_bounds").astype(
      look.rows.dtype)


class TableLookup(base.OpHandler):
  """``sin`` / ``cos`` (and any float op) of a bounded integer: the
  planner finds the :class:`Region` and the converted model reads a
  table (this handler only documents it: the region is graph-level)."""
  family = "int_lookup"
  primitives = frozenset({"sin", "cos"})
  litert_ops = ("GATHER",)
  notes = ("of a value computed from a bounded integer (positions, "
           "timesteps, int -> float casts): a lookup in a constant table "
           "quantized at the output's scale; of a float activation: float")


HANDLERS = (TableLookup(),)


def resolve_plan(plan, graph, stats) -> None:
  """Resolves ``plan``'s lookup regions in place (:func:`resolve`) and
  gives each exit that is the integer itself (a plain cast) the exact
  range of :func:`exact_cast_range` (a boundary sharing its range with
  others keeps the calibrated one). For the converted model only."""
  if not plan.lookups:
    return
  plan.lookups = resolve(plan.lookups, stats)
  for region in {id(r): r for r in plan.lookups.values()}.values():
    for var in region.exits:
      fixed = exact_cast_range(graph, region, var)
      b = plan.boundaries.get(var)
      if fixed is not None and b is not None and not b.shares_with and \
          b.fixed_range is None:
        plan.boundaries[var] = dataclasses.replace(b, fixed_range=fixed)
