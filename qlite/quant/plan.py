"""Decide, once per traced graph, where the quantization boundaries go.

The plan is shared by calibration (which records statistics at each boundary)
and conversion (which puts a ``quant.fake_quant`` composite there), so both
always agree on the set of boundaries and their keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlite.ops import op_table
from qlite.trace.graph import Graph, Lit, Node, bind
from qlite.rules import QuantizationRule, RuleMatcher


@dataclasses.dataclass(frozen=True)
class Boundary:
  """A per-tensor activation boundary: the value of ``var`` is quantized."""
  var: int
  key: str                 # stats key, e.g. "Conv_0/conv_general_dilated"
  rule: QuantizationRule
  rule_index: int
  module_path: str
  op: str                  # the op that produced the value (chain anchor)
  source: str
  fixed_range: tuple[float, float] | None = None
  # The other boundaries whose values meet this one at a same-scale op
  # (op_table.SAME_SCALE): all of them get the union of their ranges.
  shares_with: tuple["Boundary", ...] = ()
  # How LiteRT's kernel rounds this value ("half_away": the output of an
  # average pool, whose int8 kernel rounds code sum / count half away from
  # zero); the fake-quant model rounds the same way.
  rounding: str = "half_even"


@dataclasses.dataclass(frozen=True)
class WeightSpec:
  """A constant operand of a conv / dot_general, quantized per channel."""
  node: int
  operand: int
  channel_axis: int | None
  rule: QuantizationRule
  key: str


@dataclasses.dataclass(frozen=True)
class ConstSpec:
  """A constant operand of another op, quantized per tensor. ``reciprocal``:
  the op is a division by this constant, rewritten as a multiplication by
  its (quantized) reciprocal (LiteRT's int8 DIV is unreliable)."""
  node: int
  operand: int
  rule: QuantizationRule
  key: str
  reciprocal: bool = False


@dataclasses.dataclass
class Plan:
  boundaries: dict[int, Boundary]          # var -> boundary, in graph order
  weights: dict[tuple[int, int], WeightSpec]
  consts: dict[tuple[int, int], ConstSpec]
  quantized_nodes: set[int]
  fused_nodes: set[int] = dataclasses.field(default_factory=set)

  def boundary_by_key(self) -> dict[str, Boundary]:
    return {b.key: b for b in self.boundaries.values()}


def _param_free_constants(graph: Graph) -> dict[int, Any]:
  """Values of small static vars that do not depend on params (literal
  broadcasts and the like) and feed a max / min / clamp, for pattern
  matching (relu's 0, relu6's 6: :func:`op_table.relu_kind`). Computed in
  one jitted call (op-by-op evaluation compiled every primitive), and only
  for the vars those ops read (evaluating all of them compiled the UNet's
  resize index arithmetic too: 0.15 s)."""
  small = lambda v: np.prod(graph.avals[v].shape) <= 4096
  known = {k for k, v in graph.consts.items() if np.size(v) <= 4096}
  params = set(graph.param_vars)
  candidates = []
  for node in graph.nodes:
    if not all(o in graph.static for o in node.outputs):
      continue
    if any((not isinstance(a, Lit)) and (a in params or a not in known)
           for a in node.inputs):
      continue
    if not all(small(o) for o in node.outputs):
      continue
    candidates.append(node)
    known.update(node.outputs)
  # keep the candidates that a max / min / clamp operand depends on
  wanted = {a for n in graph.nodes if n.name in ("max", "min", "clamp")
            for a in n.inputs if not isinstance(a, Lit) and a in known}
  nodes = []
  for node in reversed(candidates):
    if any(o in wanted for o in node.outputs):
      nodes.append(node)
      wanted.update(a for a in node.inputs if not isinstance(a, Lit))
  nodes.reverse()
  outs = [o for n in nodes for o in n.outputs]

  def run():
    env = dict(graph.consts)
    for node in nodes:
      invals = [a.value if isinstance(a, Lit) else env[a] for a in node.inputs]
      for var, val in zip(node.outputs, bind(node, invals)):
        env[var] = val
    return [env[o] for o in outs]

  env: dict[int, Any] = {k: v for k, v in graph.consts.items()
                         if np.size(v) <= 4096}
  if outs:
    env.update(zip(outs, (np.asarray(v) for v in jax.jit(run)())))
  return env


class _Keys:
  def __init__(self):
    self.seen: dict[str, int] = {}

  def make(self, module_path: str, op: str) -> str:
    base = f"{module_path}/{op}" if module_path else op
    n = self.seen.get(base, 0)
    self.seen[base] = n + 1
    return base if n == 0 else f"{base}:{n}"


def build_plan(graph: Graph, matcher: RuleMatcher) -> Plan:
  """Returns the :class:`Plan` of ``graph`` under ``matcher``'s rules."""
  known = _param_free_constants(graph)
  keys = _Keys()
  const_keys = _Keys()

  def static_value(node: Node, i: int):
    a = node.inputs[i]
    if isinstance(a, Lit):
      return np.asarray(a.value)
    return known.get(a)

  def is_act(a) -> bool:
    return graph.is_activation(a)

  rules: dict[int, tuple[int, QuantizationRule]] = {}
  weights: dict[tuple[int, int], WeightSpec] = {}
  consts: dict[tuple[int, int], ConstSpec] = {}
  # anchor[var] = (anchor node, rule) of a fusable chain ending at var.
  anchor: dict[int, Node] = {}
  out_boundary: dict[int, Node] = {}      # var -> the node it is keyed by
  quantized: set[int] = set()
  fused_nodes: set[int] = set()     # bias / activation folded into a chain
  activated: set[int] = set()       # chain values already past a relu
  sum_scale: dict[int, Node] = {}   # div/mul node -> its reduce_sum producer

  def is_const_operand(node: Node, i: int) -> bool:
    a = node.inputs[i]
    if isinstance(a, Lit):
      return np.issubdtype(np.asarray(a.value).dtype, np.floating)
    return (not is_act(a)) and graph.is_float(a)

  for node in graph.nodes:
    act_outs = [o for o in node.outputs if is_act(o)]
    if not act_outs and node.name in op_table.COMPARE and any(
        is_act(a) for a in node.inputs):
      m = matcher.match(node.module_path, node.name)
      if m is not None and m[1].act_qtype is not None:
        rules[node.index] = m
        quantized.add(node.index)
        for i in range(len(node.inputs)):
          if is_const_operand(node, i):
            consts[(node.index, i)] = ConstSpec(
                node.index, i, m[1],
                const_keys.make(node.module_path, node.name) + f":const{i}")
      continue
    if not act_outs:
      continue
    m = matcher.match(node.module_path, node.name)
    if m is None:
      continue
    idx, rule = m
    rules[node.index] = m
    act_ins = [i for i, a in enumerate(node.inputs) if is_act(a)]
    static_float_ins = [i for i, a in enumerate(node.inputs)
                        if not isinstance(a, Lit) and not is_act(a)
                        and graph.is_float(a)]
    if rule.act_qtype is not None:
      quantized.add(node.index)
    name = node.name
    if name in op_table.WEIGHTED and len(act_ins) == 1 and static_float_ins:
      w = static_float_ins[0]
      if rule.weight_qtype is not None:
        ndim = len(graph.avals[node.inputs[w]].shape)
        weights[(node.index, w)] = WeightSpec(
            node.index, w, op_table.weight_channel_axis(node, w, ndim), rule,
            const_keys.make(node.module_path, name) + ":weight")
      anchor[node.outputs[0]] = node
      out_boundary[node.outputs[0]] = node
      continue
    if name in op_table.PASS_THROUGH:
      continue
    if name in op_table.SUM_THEN_SCALE and len(node.outputs) == 1:
      cons = graph.consumers.get(node.outputs[0], [])
      if len(cons) == 1 and cons[0].name in op_table.SCALE_BY_CONST and \
          node.outputs[0] not in graph.out_vars and \
          any(is_const_operand(cons[0], i) for i in range(2)):
        sum_scale[cons[0].index] = node
        continue      # the boundary goes after the scaling
    if node.index in sum_scale:
      fused_nodes.add(node.index)
      for o in act_outs:
        out_boundary[o] = node
      continue
    src = node.inputs[act_ins[0]] if len(act_ins) == 1 else None
    if src is not None and src in anchor and len(graph.consumers[src]) == 1 \
        and src not in graph.out_vars:
      chain = anchor[src]
      fused = False
      direct = graph.producer.get(src) is chain
      if name in op_table.AFFINE and static_float_ins and \
          src not in activated and ((name in op_table.BIAS and direct) or (
              chain.name == "conv_general_dilated" and _per_channel_const(
                  graph, node, static_float_ins[0], node.inputs[act_ins[0]]))):
        # bias, BatchNorm (sub mean, mul scale, add offset): the converter
        # folds per-channel affine ops into the conv / fully_connected.
        # (Not for a 1-D conv: the converter reshapes it to 2-D between
        # the conv and what follows; checked below.)
        fused = True
      elif op_table.relu_kind(node, lambda i: static_value(node, i)):
        kind = op_table.relu_kind(node, lambda i: static_value(node, i))
        prev = graph.producer.get(src)
        if kind in ("relu", "relu6") or (
            kind == "min6" and prev is not None and prev.name == "max"):
          fused = True
      if fused and _is_conv_1d(chain):
        fused = False
      if fused:
        fused_nodes.add(node.index)
        out_boundary.pop(src, None)
        if name not in op_table.AFFINE:
          activated.add(node.outputs[0])
        anchor[node.outputs[0]] = chain
        out_boundary[node.outputs[0]] = chain
        continue
    # A plain compute op: constants it reads are quantized per tensor
    # (relu's 0 and relu6's 6 excepted: the converter matches those).
    if name in op_table.ELEMENTWISE_WITH_CONST and not op_table.relu_kind(
        node, lambda i: static_value(node, i)):
      for i in range(len(node.inputs)):
        if not is_const_operand(node, i):
          continue
        consts[(node.index, i)] = ConstSpec(
            node.index, i, rule,
            const_keys.make(node.module_path, name) + f":const{i}",
            reciprocal=(name == "div" and i == 1))
    for o in act_outs:
      out_boundary[o] = node

  boundaries: dict[int, Boundary] = {}

  def add_boundary(var: int, keyed_by: Node | None, rule_m, op: str,
                   module_path: str, source: str, key: str | None = None):
    idx, rule = rule_m
    if rule.act_qtype is None or var in boundaries:
      return
    fixed = op_table.FIXED_RANGE.get(op) if keyed_by is not None else None
    if fixed is None and rule.act_calibration_method == "fixed":
      fixed = tuple(rule.act_fixed_range)
    boundaries[var] = Boundary(var, key or keys.make(module_path, op), rule,
                               idx, module_path, op, source, fixed)

  # Output boundaries, in graph order of the value's definition.
  for node in graph.nodes:
    for o in node.outputs:
      if o in out_boundary:
        key_node = out_boundary[o]
        op = node.name if node.name in op_table.FIXED_RANGE else key_node.name
        add_boundary(o, key_node, rules[key_node.index], op,
                     key_node.module_path, key_node.source)

  # Every activation input of a quantized op must itself be quantized:
  # walk back through pass-through ops to the value that carries the scale.
  arg_index = {v: i for i, v in enumerate(graph.arg_vars)}
  for node in graph.nodes:
    if node.index not in quantized or node.index in fused_nodes:
      continue
    for a in node.inputs:
      if not is_act(a):
        continue
      src = _scale_source(graph, a)
      if src in boundaries:
        continue
      if src in arg_index:
        add_boundary(src, None, rules[node.index], "input", "", "model input",
                     key=f"input{arg_index[src]}")
      else:
        prod = graph.producer[src]
        add_boundary(src, None, rules[node.index], prod.name,
                     prod.module_path, prod.source)
  for scale_index, summed in sum_scale.items():
    if summed.name != "reduce_window_sum":
      continue
    for o in graph.nodes[scale_index].outputs:
      b = boundaries.get(o)
      if b is not None and b.fixed_range is None:
        boundaries[o] = dataclasses.replace(b, rounding="half_away")
  _share_scales(graph, boundaries, quantized - fused_nodes,
                {s.index: graph.nodes[c] for c, s in sum_scale.items()},
                static_value)
  ordered = dict(sorted(boundaries.items(), key=lambda kv: kv[0]))
  return Plan(ordered, weights, consts, quantized, fused_nodes)


def _share_scales(graph: Graph, boundaries: dict[int, Boundary],
                  quantized: set[int], scaled_by: dict[int, Node],
                  static_value) -> None:
  """Joins the boundaries that meet at a same-scale op (op_table.SAME_SCALE:
  its output and, through pass-through ops, each activation input) into
  groups that share one range, in place: LiteRT's int8 CONCATENATION, PAD,
  MAXIMUM / MINIMUM and AVERAGE_POOL_2D need their inputs at the output's
  scale, so one range (the union: nothing that was representable is
  clipped) makes the converter insert no requantize and keeps the
  fake-quant model and the .tflite rounding at the same points.
  ``scaled_by``: reduce_window_sum node -> the division / multiplication
  that makes it an average pool; ``static_value(node, i)``: operand i's
  constant value or None. Boundaries with a fixed range (softmax,
  logistic, tanh, rule-fixed) keep it, and only boundaries of one qtype
  share."""
  parent: dict[int, int] = {}

  def find(v: int) -> int:
    while parent.get(v, v) != v:
      v = parent[v]
    return v

  for node in graph.nodes:
    if node.index not in quantized or node.name not in op_table.SAME_SCALE:
      continue
    acts = [a for a in node.inputs if graph.is_activation(a)]
    if node.name == "reduce_window_sum":
      if node.index not in scaled_by:
        continue                      # a plain windowed sum, not a pool
      out = scaled_by[node.index].outputs[0]
    elif node.name in ("max", "min") and len(acts) < 2:
      continue                        # relu clamps, max / min with a constant
    else:
      out = node.outputs[0]
    members = [out] + [_scale_source(graph, a) for a in acts]
    if node.name == "reduce_window_sum":
      # LiteRT fuses a following relu / relu6 into AVERAGE_POOL_2D, whose
      # output must keep the input's scale: the clamp's boundary joins too
      members += _fused_clamp_outputs(graph, out, static_value)
    members = [v for v in members if v in boundaries
               and boundaries[v].fixed_range is None]
    if len(members) < 2 or members[0] != out:
      continue
    qtype = boundaries[out].rule.act_qtype
    for v in members[1:]:
      if boundaries[v].rule.act_qtype == qtype:
        parent[find(v)] = find(out)

  groups: dict[int, list[int]] = {}
  for v in parent:
    groups.setdefault(find(v), []).append(v)
  for root, group in groups.items():
    group = sorted(set(group) | {root})
    own = {v: boundaries[v] for v in group}
    for v in group:
      boundaries[v] = dataclasses.replace(
          own[v], shares_with=tuple(own[o] for o in group if o != v))


def _fused_clamp_outputs(graph: Graph, var: int, static_value) -> list[int]:
  """Outputs of the chain of relu / relu6 clamps (op_table.relu_kind) that
  is ``var``'s only consumer, in order."""
  outs = []
  while var not in graph.out_vars:
    cons = graph.consumers.get(var, [])
    if len(cons) != 1:
      break
    node = cons[0]
    if not op_table.relu_kind(node, lambda i, n=node: static_value(n, i)):
      break
    var = node.outputs[0]
    outs.append(var)
  return outs


def _per_channel_const(graph: Graph, node: Node, const_pos: int,
                       act) -> bool:
  """True when the constant operand broadcasts along the last (channel)
  axis only: a scalar or shape (..., 1, C)."""
  a = node.inputs[const_pos]
  if isinstance(a, Lit):
    return np.size(a.value) == 1
  cshape = tuple(graph.avals[a].shape)
  ashape = tuple(graph.avals[act].shape)
  if int(np.prod(cshape)) == 1:
    return True
  if not cshape or cshape[-1] != ashape[-1]:
    return False
  if node.name == "sub" and const_pos == 0:   # c - x flips the sign: no
    return False
  if node.name == "div" and const_pos == 0:
    return False
  return all(d == 1 for d in cshape[:-1])


def _is_conv_1d(node: Node) -> bool:
  if node.name != "conv_general_dilated":
    return False
  return len(node.params["dimension_numbers"].lhs_spec) == 3


def _scale_source(graph: Graph, var: int) -> int:
  """Follows pass-through producers back to the value whose scale ``var``
  shares."""
  while True:
    node = graph.producer.get(var)
    if node is None or node.name not in op_table.PASS_THROUGH:
      return var
    acts = [a for a in node.inputs if graph.is_activation(a)]
    if len(acts) != 1:
      return var
    var = acts[0]


def quantize_operands(plan: Plan, node: Node, invals: list, *, weight,
                      const) -> list | None:
  """Runs ``node`` with its planned weight / constant operands replaced.

  ``weight(spec, value)`` and ``const(spec, value)`` return the replacement
  (or None to leave a constant as it is). Constants reach ``const`` as
  float32, already inverted for a division, which then runs as a
  multiplication by the quantized reciprocal (LiteRT's int8 DIV is
  unreliable). Returns the node's outputs, or None when nothing was planned.
  """
  hit = reciprocal = False
  for i, a in enumerate(node.inputs):
    wspec = plan.weights.get((node.index, i))
    if wspec is not None:
      invals[i] = weight(wspec, invals[i])
      hit = True
      continue
    cspec = plan.consts.get((node.index, i))
    if cspec is None:
      continue
    value = a.value if isinstance(a, Lit) else invals[i]
    # Concrete constants stay numpy (under a trace, jnp ops would stage them).
    xp = jnp if isinstance(value, jax.core.Tracer) else np
    value = xp.asarray(value, xp.float32)
    if cspec.reciprocal:
      value = xp.float32(1.0) / value
    q = const(cspec, value)
    if q is not None:
      invals[i] = q
      hit = True
      reciprocal |= cspec.reciprocal
  if reciprocal:
    return [jax.lax.mul_p.bind(*invals)]
  return bind(node, invals) if hit else None
