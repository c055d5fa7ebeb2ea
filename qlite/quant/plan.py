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

from qlite import ops
from qlite.ops import int_lookup, softmax
from qlite.core import calibration
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
  # (a same-scale op, qlite.ops): all of them get the union of their ranges.
  shares_with: tuple["Boundary", ...] = ()
  # How LiteRT's kernel rounds this value ("half_away": the output of an
  # average pool, whose int8 kernel rounds code sum / count half away from
  # zero; "none": never rounded, an ADD whose relu fuses into its kernel);
  # the fake-quant model rounds the same way.
  rounding: str = "half_even"
  # Not calibrated on its own: the range of ``derived_from`` widened by
  # ``derived_margin`` below its minimum (a select masking attention logits
  # with a fill int8 cannot hold: qlite.ops.masking).
  derived_from: "Boundary | None" = None
  derived_margin: float = 0.0
  # The mask bias added to the logits instead (``where(mask, 0, fill)``):
  # range (lo - hi - margin, 0) of ``derived_from``'s (lo, hi).
  derived_offset: bool = False
  # An op reading this value wants zero point 0 (the right-hand side of a
  # product of two activations, ``OpHandler.zero_point_operands``): the
  # value is quantized symmetric, with the boundaries it shares a range with.
  zero_point_zero: bool = False

  @property
  def calibrated(self) -> bool:
    """True when calibration records statistics for this boundary."""
    return self.fixed_range is None and self.derived_from is None


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
  # The value var whose boundary the constant is clipped to and quantized
  # with (a mask fill: qlite.ops.masking), or None for its own range.
  clamp_to: int | None = None
  # A constant the op does not have as an operand: it runs as a
  # multiplication of its input by this (``neg``: -1); ``operand`` is then
  # one past the op's inputs.
  value: float | None = None


@dataclasses.dataclass
class Plan:
  """Where the quantization boundaries of one traced model go
  (:func:`build_plan`), shared by calibration, the LiteRT export, QAT and
  XLA static-range quantization.

  Attributes:
    boundaries: activation boundaries by graph var, in graph order.
    weights: the per-channel quantized constant operands of conv /
      dot_general ops, by ``(node, operand)``.
    consts: the per-tensor quantized constant operands of other ops, by
      ``(node, operand)``.
    quantized_nodes: the nodes a rule quantizes.
    fused_nodes: the nodes fused into the conv / fully-connected op before
      them (no boundary of their own).
    lookups: float values computed from one bounded integer, by node (the
      converted model reads them from a table).
    probes: integer vars whose range calibration records, by stats key.
    swapped: products of two activations whose right-hand side has a
      fixed range (a softmax's probabilities): LiteRT computes them with
      the operands swapped (``OpHandler.lower_swapped``), so that the other
      operand, quantized at zero point 0, is the kernel's right-hand side.
  """
  boundaries: dict[int, Boundary]          # var -> boundary, in graph order
  weights: dict[tuple[int, int], WeightSpec]
  consts: dict[tuple[int, int], ConstSpec]
  quantized_nodes: set[int]
  fused_nodes: set[int] = dataclasses.field(default_factory=set)
  # Float values computed from one bounded integer (qlite.ops.int_lookup):
  # node index -> its Region; the converted model reads them from a table.
  lookups: dict[int, Any] = dataclasses.field(default_factory=dict)
  # integer var -> the stats key calibration records its range under (the
  # regions the graph does not bound).
  probes: dict[int, str] = dataclasses.field(default_factory=dict)
  swapped: set[int] = dataclasses.field(default_factory=set)

  def boundary_by_key(self) -> dict[str, Boundary]:
    """The boundaries by stats key (``"Dense_0/dot_general"``)."""
    return {b.key: b for b in self.boundaries.values()}


# The largest param-free constant the planner evaluates for pattern matching:
# a causal attention mask over 2048 tokens (4M elements). It was 4096, and
# an additive mask over more than 64 tokens (``logits + (1 - tril) * -1e9``)
# went unrecognised: the add took the -1e9 constant's range and every logit
# rounded to one code (fuzz seeds 147 / 184: 0.4 dB at 134 tokens, LiteRT
# equal to the fake-quant model, i.e. silently wrong).
_CONST_MAX_SIZE = 1 << 22


def _param_free_constants(graph: Graph, registry: ops.Registry
                          ) -> dict[int, Any]:
  """Values of small static vars that do not depend on params (literal
  broadcasts and the like) and feed a max / min / clamp, for pattern
  matching (relu's 0, relu6's 6: handlers that ``reads_constant_values``). Computed in
  one jitted call (op-by-op evaluation compiled every primitive), and only
  for the vars those ops read (evaluating all of them compiled the UNet's
  resize index arithmetic too: 0.15 s)."""
  small = lambda v: np.prod(graph.avals[v].shape) <= _CONST_MAX_SIZE
  known = {k for k, v in graph.consts.items()
           if np.size(v) <= _CONST_MAX_SIZE}
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
  wanted = {a for n in graph.nodes
            if registry[n.name].reads_constant_values()
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
                         if np.size(v) <= _CONST_MAX_SIZE}
  if outs:
    # PRNG keys (jax.random.key in the model) have no numpy form: skipped
    env.update((o, np.asarray(v)) for o, v in zip(outs, jax.jit(run)())
               if not jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key))
  return env


class _Keys:
  def __init__(self):
    self.seen: dict[str, int] = {}

  def make(self, module_path: str, op: str) -> str:
    base = f"{module_path}/{op}" if module_path else op
    n = self.seen.get(base, 0)
    self.seen[base] = n + 1
    return base if n == 0 else f"{base}:{n}"


def build_plan(graph: Graph, matcher: RuleMatcher,
               registry: ops.Registry = ops.REGISTRY) -> Plan:
  """Returns the :class:`Plan` of ``graph`` under ``matcher``'s rules.

  Args:
    graph: the traced model.
    matcher: the quantization rules.
    registry: the op handlers to ask (default: every handler qlite has).
  """
  return _Planner(graph, matcher, registry).plan()


class _Planner:
  """One pass over the graph in order; every op-specific decision is the
  op handler's (:mod:`qlite.ops`)."""

  def __init__(self, graph: Graph, matcher: RuleMatcher,
               registry: ops.Registry):
    self.graph = graph
    self.matcher = matcher
    self.registry = registry
    self.known = _param_free_constants(graph, registry)
    self.ctx = ops.PlanContext(graph, registry, self.static_value,
                               self.is_const_operand, self.known.get)
    self.keys = _Keys()
    self.const_keys = _Keys()
    self.rules: dict[int, tuple[int, QuantizationRule]] = {}
    self.weights: dict[tuple[int, int], WeightSpec] = {}
    self.consts: dict[tuple[int, int], ConstSpec] = {}
    # anchor[var]: the conv / dot_general of a fusable chain ending at var
    self.anchor: dict[int, Node] = {}
    self.out_boundary: dict[int, Node] = {}   # var -> the node it is keyed by
    self.quantized: set[int] = set()
    self.fused: set[int] = set()      # bias / activation folded into a chain
    self.activated: set[int] = set()  # chain values already past a relu
    self.sum_scale: dict[int, Node] = {}  # scaling node -> its sum producer
    self.boundaries: dict[int, Boundary] = {}
    # select output -> (masked value var, margin)
    self.masked: dict[int, tuple[int, float]] = {}
    self.swapped: set[int] = set()
    # mask bias var -> (the logits var it is added to, margin)
    self.mask_bias: dict[int, tuple[int, float]] = {}
    regions = int_lookup.find_regions(
        graph, lambda n: registry[n.name].role(n))
    self.lookups = {i: r for r in regions for i in r.nodes}
    self.probes = {r.source: r.probe_key for r in regions if not r.bounded}

  # -- operand classification
  def static_value(self, node: Node, i: int):
    a = node.inputs[i]
    if isinstance(a, Lit):
      return np.asarray(a.value)
    return self.known.get(a)

  def is_const_operand(self, node: Node, i: int) -> bool:
    a = node.inputs[i]
    if isinstance(a, Lit):
      return np.issubdtype(np.asarray(a.value).dtype, np.floating)
    return (not self.graph.is_activation(a)) and self.graph.is_float(a)

  def _add_virtual_consts(self, node: Node, handler, rule) -> bool:
    """ConstSpecs (operands past the node's inputs) for the constants a
    handler lowers the op with; True when there are any."""
    values = handler.virtual_constants(node, self.ctx)
    for k, value in enumerate(values):
      i = len(node.inputs) + k
      self.consts[(node.index, i)] = ConstSpec(
          node.index, i, rule,
          self.const_keys.make(node.module_path, node.name) + f":const{i}",
          value=float(value))
    return bool(values)

  def _add_consts(self, node: Node, rule) -> None:
    handler = self.registry[node.name]
    self._add_virtual_consts(node, handler, rule)
    masked = handler.masked_fill(node, self.ctx)
    if masked is not None:
      self.masked[node.outputs[0]] = (node.inputs[masked[1]],
                                      handler.mask_margin)
      fill = node.inputs[masked[0]]
      if not isinstance(fill, Lit) and self.graph.is_activation(fill):
        self.mask_bias[scale_source(self.graph, fill, self.registry)] = (
            node.inputs[masked[1]], handler.mask_margin)
    for i, reciprocal in handler.quantized_constants(node, self.ctx):
      clamp = node.outputs[0] if masked is not None and i == masked[0] \
          else None
      self.consts[(node.index, i)] = ConstSpec(
          node.index, i, rule,
          self.const_keys.make(node.module_path, node.name) + f":const{i}",
          reciprocal=reciprocal, clamp_to=clamp)

  # -- the pass
  def plan(self) -> Plan:
    for node in self.graph.nodes:
      self._visit(node)
    self._output_boundaries()
    self._input_boundaries()
    self._rounding()
    self._derive_masked()
    self._zero_points()
    _share_scales(self.graph, self.boundaries, self.quantized - self.fused,
                  {s.index: self.graph.nodes[c]
                   for c, s in self.sum_scale.items()}, self.ctx)
    ordered = dict(sorted(self.boundaries.items(), key=lambda kv: kv[0]))
    return Plan(ordered, self.weights, self.consts, self.quantized,
                self.fused, self.lookups, self.probes, self.swapped)

  def _visit(self, node: Node) -> None:
    graph, handler = self.graph, self.registry[node.name]
    region = self.lookups.get(node.index)
    if region is not None:    # looked up: a boundary on its exits only
      m = self.matcher.match(node.module_path, node.name)
      exits = [o for o in node.outputs if o in region.exits]
      if m is not None and exits:
        self.rules[node.index] = m
        for o in exits:
          self.out_boundary[o] = node
      return
    act_outs = [o for o in node.outputs if graph.is_activation(o)]
    if not act_outs:
      if handler.quantizes_without_float_output(node) and any(
          graph.is_activation(a) for a in node.inputs):
        m = self.matcher.match(node.module_path, node.name)
        if m is not None and m[1].act_qtype is not None:
          self.rules[node.index] = m
          self.quantized.add(node.index)
          self._add_consts(node, m[1])
      return
    m = self.matcher.match(node.module_path, node.name)
    if m is None:
      return
    rule = m[1]
    self.rules[node.index] = m
    act_ins = [i for i, a in enumerate(node.inputs) if graph.is_activation(a)]
    static_float_ins = [i for i, a in enumerate(node.inputs)
                        if not isinstance(a, Lit)
                        and not graph.is_activation(a) and graph.is_float(a)]
    if rule.act_qtype is not None:
      self.quantized.add(node.index)
    role = handler.role(node)
    if role == ops.WEIGHTED and len(act_ins) == 1 and static_float_ins:
      w = static_float_ins[0]
      if rule.weight_qtype is not None:
        ndim = len(graph.avals[node.inputs[w]].shape)
        self.weights[(node.index, w)] = WeightSpec(
            node.index, w, handler.weight_axis(node, w, ndim), rule,
            self.const_keys.make(node.module_path, node.name) + ":weight")
      self.anchor[node.outputs[0]] = node
      self.out_boundary[node.outputs[0]] = node
      return
    if role == ops.PASS_THROUGH:
      if self._add_virtual_consts(node, handler, rule):   # e.g. a bool cast
        for o in act_outs:
          self.out_boundary[o] = node
      return
    if len(node.outputs) == 1:
      cons = graph.consumers.get(node.outputs[0], [])
      if len(cons) == 1 and node.outputs[0] not in graph.out_vars and \
          handler.scale_fuses_into(node, cons[0], self.ctx):
        self.sum_scale[cons[0].index] = node
        return      # the boundary goes after the scaling
    if node.index in self.sum_scale:
      self.fused.add(node.index)
      for o in act_outs:
        self.out_boundary[o] = node
      return
    if len(act_ins) == 1 and self._fuse_into_chain(node, handler,
                                                   node.inputs[act_ins[0]]):
      return
    # A plain compute op: the constants it reads are quantized per tensor
    # (as its handler says: relu's 0 and relu6's 6 are left to the converter);
    # an op a rule keeps float reads them float.
    if rule.act_qtype is not None:
      self._add_consts(node, rule)
    for o in act_outs:
      self.out_boundary[o] = node

  def _fuse_into_chain(self, node: Node, handler, src: int) -> bool:
    graph = self.graph
    if src not in self.anchor or len(graph.consumers[src]) != 1 or \
        src in graph.out_vars:
      return False
    chain = self.anchor[src]
    direct = graph.producer.get(src) is chain
    kind = handler.chain_fusion(node, self.ctx, chain, direct,
                                src in self.activated)
    if kind is None or not self.registry[chain.name].accepts_fusion(chain):
      return False
    self.fused.add(node.index)
    self.out_boundary.pop(src, None)
    if kind == "activation":
      self.activated.add(node.outputs[0])
    self.anchor[node.outputs[0]] = chain
    self.out_boundary[node.outputs[0]] = chain
    return True

  # -- boundaries
  def _add_boundary(self, var: int, keyed_by: Node | None, rule_m, op: str,
                    module_path: str, source: str, key: str | None = None):
    idx, rule = rule_m
    if rule.act_qtype is None or var in self.boundaries or \
        int(np.prod(self.graph.avals[var].shape)) == 0:
      return                # (a zero-size value, e.g. in associative_scan)
    fixed = self.registry[op].fixed_range(op) if keyed_by is not None \
        else None
    if fixed is None and rule.act_calibration_method is not None and \
        calibration.get_method(rule.act_calibration_method).needs_fixed_range:
      fixed = tuple(rule.act_fixed_range)
    self.boundaries[var] = Boundary(
        var, key or self.keys.make(module_path, op), rule, idx, module_path,
        op, source, fixed)

  def _output_boundaries(self) -> None:
    """Output boundaries, in graph order of the value's definition."""
    for node in self.graph.nodes:
      for o in node.outputs:
        if o in self.out_boundary:
          key_node = self.out_boundary[o]
          op = node.name if self.registry[node.name].fixed_range(node.name) \
              is not None else key_node.name
          self._add_boundary(o, key_node, self.rules[key_node.index], op,
                             key_node.module_path, key_node.source)

  def _input_boundaries(self) -> None:
    """Every activation input of a quantized op is itself quantized: walk
    back through pass-through ops to the value that carries the scale."""
    graph = self.graph
    arg_index = {v: i for i, v in enumerate(graph.arg_vars)}
    for node in graph.nodes:
      if node.index not in self.quantized or node.index in self.fused:
        continue
      for a in node.inputs:
        if not graph.is_activation(a):
          continue
        src = scale_source(graph, a, self.registry)
        if src in self.boundaries:
          continue
        if src in arg_index:
          self._add_boundary(src, None, self.rules[node.index], "input", "",
                             "model input", key=f"input{arg_index[src]}")
        else:
          prod = graph.producer[src]
          self._add_boundary(src, None, self.rules[node.index], prod.name,
                             prod.module_path, prod.source)

  def _derive_masked(self) -> None:
    """Masked selects take the range of the value they mask (widened)."""
    for out, (value, margin) in self.masked.items():
      src = scale_source(self.graph, value, self.registry)
      b, source = self.boundaries.get(out), self.boundaries.get(src)
      if b is None or source is None or b.fixed_range is not None:
        continue
      self.boundaries[out] = dataclasses.replace(
          b, derived_from=source, derived_margin=margin)
    self._masked_value_inputs()
    for bias, (value, margin) in self.mask_bias.items():
      src = scale_source(self.graph, value, self.registry)
      b, source = self.boundaries.get(bias), self.boundaries.get(src)
      if b is None or source is None or b.fixed_range is not None:
        continue
      self.boundaries[bias] = dataclasses.replace(
          b, derived_from=source, derived_margin=margin, derived_offset=True)
      select = self.graph.producer[bias]     # its fill / zero: into range
      for key, spec in list(self.consts.items()):
        if spec.node == select.index:
          self.consts[key] = dataclasses.replace(spec, clamp_to=bias)

  def _masked_value_inputs(self) -> None:
    """The int8 logits a masked select (``where(mask, logits, fill)`` before
    a softmax) reads as its only reader: litert-converter has their op write
    them straight at the select's scale (the select needs its value at its
    output's), so their own boundary is never rounded (rounding "none"). Its
    fake-quant rounding there put the fake-quant model 5 output LSB from
    the .tflite (fuzz seeds 40 / 54 / 199)."""
    graph = self.graph
    for out, (value, _) in self.masked.items():
      b = self.boundaries.get(value)
      sel = self.boundaries.get(out)
      if b is None or sel is None or sel.derived_from is None or \
          sel.derived_from.var != value or b.fixed_range is not None or \
          b.rule.act_qtype != "int8" or sel.rule.act_qtype != "int8" or \
          value in graph.out_vars or len(graph.consumers.get(value, [])) != 1:
        continue
      self.boundaries[value] = dataclasses.replace(b, rounding="none")

  def _zero_points(self) -> None:
    """Marks the calibrated boundaries an op reads at zero point 0; an
    operand with a fixed range (a softmax's) swaps places with the other
    operand when the op can compute with them swapped."""
    for node in self.graph.nodes:
      if node.index not in self.quantized or node.index in self.fused:
        continue
      handler = self.registry[node.name]
      for i in handler.zero_point_operands(node, self.ctx):
        b = self.boundaries.get(
            scale_source(self.graph, node.inputs[i], self.registry))
        if b is not None and (b.fixed_range is not None or
                              softmax.is_exp_form_output(self.graph, b.var)):
          j = handler.swap_operand(node, i)
          other = None if j is None else self.boundaries.get(
              scale_source(self.graph, node.inputs[j], self.registry))
          if other is not None and other.fixed_range is None:
            self.swapped.add(node.index)
            b = other
        if b is not None and b.fixed_range is None:
          self.boundaries[b.var] = dataclasses.replace(b,
                                                       zero_point_zero=True)

  def _rounding(self) -> None:
    self._fused_activation_inputs()
    for scale_index, summed in self.sum_scale.items():
      rounding = self.registry[summed.name].output_rounding(summed)
      if rounding is None:
        continue
      for o in self.graph.nodes[scale_index].outputs:
        b = self.boundaries.get(o)
        if b is not None and b.fixed_range is None:
          self.boundaries[o] = dataclasses.replace(b, rounding=rounding)


  def _fused_activation_inputs(self) -> None:
    """An int8 op whose handler ``fuses_activation`` (ADD / SUB / MUL), read
    by one relu / relu6 only: litert-converter fuses the relu into its kernel,
    which requantizes its result straight to the relu's output scale, so the
    op's own boundary is never rounded (rounding "none"). Its fake-quant
    rounding there put tcn's fake-quant model 3.4 dB below its .tflite."""
    graph = self.graph
    for var, b in self.boundaries.items():
      node = graph.producer.get(var)
      if node is None or b.fixed_range is not None or \
          node.index not in self.quantized or node.index in self.fused or \
          not getattr(self.registry[node.name], "fuses_activation", False) or \
          len(node.outputs) != 1 or var in graph.out_vars:
        continue
      cons = graph.consumers.get(var, [])
      if len(cons) != 1 or cons[0].index not in self.quantized:
        continue
      act = cons[0]
      relu = self.boundaries.get(act.outputs[0])
      if relu is None or relu.rule.act_qtype != "int8" or \
          b.rule.act_qtype != "int8" or self.registry[act.name].activation_kind(
              act, self.ctx) not in ("relu", "relu6"):
        continue
      self.boundaries[var] = dataclasses.replace(b, rounding="none")
      # relu6 as min(max(x, 0), 6): the RELU fuses, the MINIMUM stays and
      # reads the fused op's output at its own scale (the max's boundary is
      # never rounded either)
      after = graph.consumers.get(act.outputs[0], [])
      if len(after) == 1 and after[0].index in self.quantized and \
          act.outputs[0] not in graph.out_vars and \
          after[0].outputs[0] in self.boundaries and \
          self.boundaries[after[0].outputs[0]].rule.act_qtype == "int8" and \
          self.registry[after[0].name].activation_kind(
              after[0], self.ctx) == "min6":
        self.boundaries[act.outputs[0]] = dataclasses.replace(
            relu, rounding="none")


def _share_scales(graph: Graph, boundaries: dict[int, Boundary],
                  quantized: set[int], scaled_by: dict[int, Node],
                  ctx: ops.PlanContext) -> None:
  """Joins the boundaries that meet at a same-scale op (its handler's
  ``same_scale_output``: its output and, through pass-through ops, each
  activation input) into groups that share one range, in place: LiteRT's
  int8 CONCATENATION, PAD, MAXIMUM / MINIMUM, AVERAGE_POOL_2D and
  RESIZE_BILINEAR need their inputs at the output's scale, so one range
  (the union: nothing that was representable is clipped) makes the
  converter insert no requantize and keeps the fake-quant model and the
  .tflite rounding at the same points. ``scaled_by``: reduce_window_sum
  node -> the division / multiplication that makes it an average pool.
  Boundaries with a fixed range (softmax, logistic, tanh, rule-fixed) keep
  it, and only boundaries of one qtype share."""
  parent: dict[int, int] = {}

  def find(v: int) -> int:
    while parent.get(v, v) != v:
      v = parent[v]
    return v

  for node in graph.nodes:
    if node.index not in quantized:
      continue
    outs = ctx.handler(node).same_scale_output(node, ctx, scaled_by)
    if not outs:
      continue
    out = outs[0]
    acts = [a for a in node.inputs if graph.is_activation(a)]
    members = [out] + [scale_source(graph, a, ctx.registry) for a in acts] \
        + outs[1:]
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


def scale_source(graph: Graph, var: int,
                 registry: ops.Registry = ops.REGISTRY) -> int:
  """Returns the value whose scale ``var`` shares: ``var`` itself, or what
  its pass-through producers (reshape, transpose, max pool...) read."""
  while True:
    node = graph.producer.get(var)
    if node is None or registry[node.name].role(node) != ops.PASS_THROUGH:
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
  region = plan.lookups.get(node.index)
  if region is not None and region.resolved:
    return int_lookup.lower(region, node, invals)
  virtual = []
  while (node.index, len(node.inputs) + len(virtual)) in plan.consts:
    virtual.append(plan.consts[(node.index, len(node.inputs) + len(virtual))])
  if virtual:
    qs = [const(spec, np.float32(spec.value)) for spec in virtual]
    if all(q is not None for q in qs):
      return ops.REGISTRY[node.name].lower(node, list(invals), qs)
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
