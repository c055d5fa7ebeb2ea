"""The ODML providers: calibration (collect activation statistics at every
boundary of the plan) and conversion (emit ``quant.fake_quant`` composites
with static scales, weights baked in as constants)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np

from qlite.ops import int_lookup
from qlite.trace import graph as graph_lib
from qlite.litert import fake_quant as fq
from qlite.quant import plan as plan_lib
from qlite.quant.plan import Plan, build_plan, quantize_operands
from qlite.quant.scales import (as_quant_stats, boundary_range,
                                boundary_scale, symmetric_acts)
from qlite.core import calibration, numerics
from qlite.core.stats import QuantStats
from qlite import ops
from qlite.errors import (CalibrationError, QTypeError, RuleError,
                          UnsupportedOpError)
from qlite.litert.rule_check import (NO_16X8_KERNEL, check_rules_for_litert,
                                     no_16x8_kernel_message)
from qlite.quant.provider import Provider
from qlite.rules import QuantizationRule, RuleMatcher, aggregation_ignored


class _PlannedProvider(Provider):
  def __init__(self, rules: Sequence[QuantizationRule]):
    self.matcher = RuleMatcher(rules)

  @property
  def rules(self):
    return self.matcher.rules

  def prepare(self, graph):
    return build_plan(graph, self.matcher)

  def unmatched_rules(self):
    """Returns ``(index, rule)`` of rules that matched no op so far."""
    return self.matcher.unmatched_rules()


# Calibration runs a few dozen batches: XLA's backend optimisations cost more
# compile time than they save (measured on the zoo transformer / MobileNet).
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


class CalibrationProvider(_PlannedProvider):
  """Runs the float model and records statistics at every boundary.

  Each call is jitted (once per input signature) and aggregates its batch
  into ``provider.stats`` on the host. :func:`qlite.calibrate` drives this
  provider for you.

  Args:
    rules: the :class:`qlite.QuantizationRule` list (or one rule); the first
      match applies.
    method: the default range method, stored in ``stats.meta["method"]``
      (see :func:`qlite.calibrate`).

  Attributes:
    stats: the :class:`QuantStats` aggregated so far.
    num_batches: the number of batches recorded.
    method: the default range method.

  Raises:
    CalibrationError: an unknown ``method`` (the message lists the valid
      names); while running, an activation with NaN / Inf (names the
      boundary).
    RuleError: an element of ``rules`` is not a ``QuantizationRule``.

  Example:
    >>> import jax, numpy as np, flax.linen as nn, qlite
    >>> model, x = nn.Dense(4), np.ones((1, 8), np.float32)
    >>> variables = model.init(jax.random.key(0), x)
    >>> rules = [qlite.QuantizationRule()]
    >>> provider = qlite.annotate.CalibrationProvider(rules)
    >>> qm = qlite.quantize_model(model, provider, variables=variables)
    >>> for batch in (x, -x):
    ...   _ = qm.apply(variables, batch)
    >>> provider.stats
    QuantStats(2 records, 2 batches, method='minmax')
  """

  def __init__(self, rules: Sequence[QuantizationRule], *,
               method: str = "minmax"):
    super().__init__(rules)
    calibration.get_method(method)   # CalibrationError naming the valid ones
    # No LiteRT-only checks here (qlite.litert.rule_check): the statistics
    # also serve the XLA backend. An aggregation the calibrate() method
    # ignores is wrong for every backend.
    for i, r in enumerate(self.matcher.rules):
      problem = None if r.act_calibration_method is not None else \
          aggregation_ignored(r, method)
      if problem:
        raise RuleError(f"rules[{i}] (module_path={r.module_path!r}) under "
                        f"calibrate(method={method!r}): {problem}")
    self.method = method
    self.records: dict[str, dict] = {}
    self.num_batches = 0
    self._steps: dict = {}

  def _step(self, graph: graph_lib.Graph, plan: Plan):
    if id(graph) not in self._steps:
      need_pct = {b.var for b in plan.boundaries.values()
                  if self.needs_percentiles(b)}
      need_hist = {b.var for b in plan.boundaries.values()
                   if self.needs_histogram(b)}
      def step(flat_params, flat_args):
        stats = {}
        def on_value(var, val):
          b = plan.boundaries.get(var)
          if b is not None and b.calibrated:
            stats[b.key] = calibration.batch_stats(
                val, with_percentiles=var in need_pct,
                with_histogram=var in need_hist)
          elif var in plan.probes:     # an integer a lookup table reads
            stats[plan.probes[var]] = int_lookup.probe_stats(val)
          return val
        outs = graph_lib.evaluate(graph, flat_params, flat_args,
                                  on_value=on_value)
        return outs, stats
      self._steps[id(graph)] = (graph, jax.jit(step, compiler_options=_FAST_COMPILE))
    return self._steps[id(graph)][1]

  def run(self, qmodel, graph, plan, flat_params, flat_args):
    outs, stats = self._step(graph, plan)(flat_params, flat_args)
    self.record(plan, jax.device_get(stats))
    return outs

  def needs_percentiles(self, b) -> bool:
    """True when boundary ``b``'s range method or aggregation reads the
    per-batch percentiles (the registered method declares it)."""
    return calibration.needs_percentiles(
        b.rule.act_calibration_method or self.method, b.rule.act_aggregation)

  def needs_histogram(self, b) -> bool:
    """True when boundary ``b``'s range method reads the histograms (the
    registered method declares it)."""
    return calibration.needs_histogram(b.rule.act_calibration_method
                                       or self.method)

  def record(self, plan: Plan, stats: dict) -> None:
    """Aggregates one batch's ``{key: batch_stats}`` into the records.

    Raises:
      CalibrationError: a statistic is NaN / Inf (names the boundary).
    """
    by_key = plan.boundary_by_key()
    for key, batch in stats.items():
      if key not in by_key:          # a probe: the integer's min / max
        self.records[key] = int_lookup.merge_probe(self.records.get(key),
                                                   batch)
        continue
      b = by_key[key]
      # NaN / Inf anywhere in the tensor shows in its min or max
      if not (math.isfinite(float(batch["min"]))
              and math.isfinite(float(batch["max"]))):
        raise CalibrationError(
            f"calibration batch {self.num_batches}: the activation at "
            f"`{key}` ({b.source}) contains NaN or Inf; check the calibration "
            f"data (and the model) for non-finite values")
      self.records[key] = calibration.aggregate(
          self.records.get(key), batch, aggregation=b.rule.act_aggregation)
    self.num_batches += 1

  @property
  def stats(self) -> QuantStats:
    """The statistics aggregated so far."""
    return QuantStats(dict(self.records), {"num_batches": self.num_batches,
                                           "method": self.method})


class ConversionProvider(_PlannedProvider):
  """Runs the model as qlite's fake-quant model (the ``.tflite``'s numerics).

  Emits ``quant.fake_quant`` composites: weights per channel (symmetric,
  narrow range), activations per tensor from ``stats``. Params are folded in
  as constants, so call it with concrete variables (not under ``jit``).
  Running it in JAX gives qlite's fake-quant model; exporting it
  (:func:`qlite.export_tflite`) gives the full-integer ``.tflite``.

  Args:
    rules: the :class:`qlite.QuantizationRule` list used to calibrate.
    stats: the :class:`QuantStats` (or a QAT ``quant_stats`` collection);
      None only when no boundary needs calibrated statistics.

  Attributes:
    stats: the statistics, as a :class:`QuantStats`.

  Raises:
    CalibrationError: ``stats`` is not a statistics object; when tracing, a
      boundary has no statistics (names it).
    QTypeError: when tracing, a rule's qtype LiteRT cannot run.
    RuleError: an element of ``rules`` is not a ``QuantizationRule``.

  Example:
    >>> import jax, numpy as np, flax.linen as nn, qlite
    >>> model, x = nn.Dense(4), np.ones((1, 8), np.float32)
    >>> variables = model.init(jax.random.key(0), x)
    >>> rules = [qlite.QuantizationRule()]
    >>> stats = qlite.calibrate(model, rules, [x, -x], variables=variables,
    ...                         progress=False)
    >>> provider = qlite.annotate.ConversionProvider(rules, stats)
    >>> fq = qlite.quantize_model(model, provider, x, variables=variables)
    >>> fq.apply(variables, x).shape     # what the exported .tflite computes
    (1, 4)
  """

  def __init__(self, rules: Sequence[QuantizationRule],
               stats: QuantStats | None = None):
    super().__init__(rules)
    # RuleError for options the LiteRT export ignores or cannot honour
    check_rules_for_litert(self.matcher.rules)
    if stats is not None and not isinstance(stats, QuantStats):
      stats = as_quant_stats(stats)
    self.stats = stats

  def prepare(self, graph):
    plan = build_plan(graph, self.matcher)
    _check_16x8_kernels(graph, plan, self.matcher)
    _int8_lookup_tables(plan)
    int_lookup.resolve_plan(plan, graph, self.stats)   # tables' ranges
    for b in plan.boundaries.values():
      try:
        fq.mlir_dtype(_qtype(b.rule.act_qtype, b))
      except QTypeError as e:
        raise QTypeError(
            f"rules[{b.rule_index}] (module_path={b.rule.module_path!r}) "
            f"act_qtype at `{b.key}` ({b.source}): {e}") from None
      boundary_scale(b, self.stats)     # fail early on missing stats
    for spec in plan.weights.values():
      try:
        fq.mlir_dtype(_qtype(spec.rule.weight_qtype, spec))
      except QTypeError as e:
        raise QTypeError(f"weight_qtype at `{spec.key}`: {e}") from None
    return plan

  def function(self, graph: graph_lib.Graph, plan: Plan, flat_params):
    """Returns ``f(*flat_args) -> flat outputs`` with the params folded in."""
    folded = graph_lib.fold_static(graph, flat_params)
    _unsplat_fused_constants(graph, plan, folded)
    scales = {var: boundary_scale(b, self.stats)
              for var, b in plan.boundaries.items()}
    float_made = _float_produced(graph, plan, self.matcher)

    def on_value(var, val):
      b = plan.boundaries.get(var)
      if b is None:
        return val
      s, z = scales[var]
      if var in float_made:
        # kept float by a rule: the converter would otherwise fold the op
        # between the quantized boundaries into its int8 / int16 kernel at
        # the next boundary's scale (a float softmax became a SOFTMAX with
        # an output scale LiteRT refuses)
        val = jax.lax.optimization_barrier(val)
      return fq.fake_quant(val, s, z, b.rule.act_qtype, rounding=b.rounding)

    def weight(spec, w):
      s, z = fq.weight_scale(w, spec.rule.weight_qtype, spec.channel_axis,
                             spec.rule.weight_calibration_method)
      return fq.fake_quant(
          w, s, z, spec.rule.weight_qtype, axis=spec.channel_axis,
          narrow_range=spec.rule.weight_calibration_method == "absmax")

    def const(spec, c):
      if spec.clamp_to is not None and spec.clamp_to in scales:
        # a mask fill: clipped into the masked value's range, at its scale
        lo, hi = boundary_range(plan.boundaries[spec.clamp_to], self.stats)
        xp = jax.numpy if isinstance(c, jax.core.Tracer) else np
        if graph.nodes[spec.node].name == "add":    # an additive mask
          c = xp.clip(xp.nan_to_num(c, neginf=lo - hi), lo - hi, None)
          s, z = numerics.scale_zero_point(
              np.float32(np.min(c)), np.float32(max(np.max(c), 0.0)),
              spec.rule.act_qtype,
              symmetric=symmetric_acts(spec.rule.act_qtype),
              narrow_range=False)
          s, z = np.reshape(s, -1), np.reshape(z, -1)
        else:                                        # a select's fill
          c = xp.clip(xp.nan_to_num(c, neginf=lo, posinf=hi), lo, hi)
          s, z = scales[spec.clamp_to]
        return fq.fake_quant(jax.numpy.asarray(c, jax.numpy.float32), s, z,
                             spec.rule.act_qtype)
      if not np.all(np.isfinite(c)):
        return None   # e.g. a -inf mask value: left float, strict export names it
      lo, hi = np.float32(np.min(c)), np.float32(np.max(c))
      s, z = numerics.scale_zero_point(
          lo, hi, spec.rule.act_qtype,
          symmetric=symmetric_acts(spec.rule.act_qtype), narrow_range=False)
      floor = _xnnpack_const_scale_floor(graph, spec, scales)
      if floor is not None and float(np.max(s)) < floor:
        lo = min(lo, np.float32(0.0))
        s, z = numerics.scale_zero_point(
            lo, lo + np.float32(255.0 * floor), spec.rule.act_qtype,
            symmetric=False, narrow_range=False)
      return fq.fake_quant(jax.numpy.asarray(c), np.reshape(s, -1),
                           np.reshape(z, -1), spec.rule.act_qtype)

    requant = _requantized_operands(graph, plan, self.matcher)
    neg_operand = _int16_broadcast_add_acts(graph, plan, self.matcher)
    gelu16 = _int16_gelus(graph, plan, self.matcher)

    def on_node(node, invals):
      hit = False
      for i, qtype, target in requant.get(node.index, ()):
        # mixed int8 / int16: the operand at this op's qtype (a requantize),
        # at the op's output scale when its kernel reads it there
        if target is not None:
          s, z = scales[target]
        else:
          b = plan.boundaries[plan_lib.scale_source(graph, node.inputs[i])]
          s, z = _scale_as(b, qtype, self.stats)
        invals = list(invals)
        invals[i] = fq.fake_quant(
            jax.lax.optimization_barrier(invals[i]), s, z, qtype)
        hit = True
      if node.index in gelu16:     # no 16x8 GELU: its tanh form in int16
        b = plan.boundaries[plan_lib.scale_source(graph, node.inputs[0])]
        lo, hi = boundary_range(b, self.stats)
        return [_gelu_int16(invals[0], lo, hi)]
      j = neg_operand.get(node.index)
      if j is not None:            # x + y as y - (-x): x broadcast, int16
        b = plan.boundaries[plan_lib.scale_source(graph, node.inputs[j])]
        s, z = _scale_as(b, "int16", self.stats)
        minus = fq.fake_quant(np.float32(-1.0), [1.0 / 32767.0], [0],
                              "int16")
        neg = fq.fake_quant(jax.lax.mul(invals[j], minus), s, z, "int16")
        return [jax.lax.sub(invals[1 - j], neg)]
      i = _int16_broadcast_add(graph, plan, node)
      if i is not None:            # x + c as x - (-c)
        a = node.inputs[i]
        c = a.value if isinstance(a, graph_lib.Lit) else invals[i]
        xp = jax.numpy if isinstance(c, jax.core.Tracer) else np
        q = const(plan.consts[(node.index, i)], -xp.asarray(c, xp.float32))
        if q is not None:
          return [jax.lax.sub(invals[1 - i], q)]
      if node.index in plan.swapped:   # the zero-point-0 operand on the right
        return ops.REGISTRY[node.name].lower_swapped(node, list(invals))
      outs = quantize_operands(plan, node, invals, weight=weight,
                               const=const)
      if outs is None and hit:
        outs = graph_lib.bind(node, invals)
      return outs

    def f(*flat_args):
      return graph_lib.evaluate(graph, flat_params, flat_args,
                                on_value=on_value, on_node=on_node,
                                preset=folded)
    return f

  def run(self, qmodel, graph, plan, flat_params, flat_args):
    # Keyed by the identity of the param arrays (kept alive in the value).
    key = (id(graph), tuple(id(p) for p in flat_params))
    cache = qmodel.__dict__.setdefault("_conversion_fns", {})
    if key not in cache:
      if len(cache) >= 4:
        cache.clear()
      cache[key] = (list(flat_params),
                    jax.jit(self.function(graph, plan, flat_params)))
    return cache[key][1](*flat_args)


# XNNPACK runs an int8 ADD / SUB only when each input's scale is at least
# 2**-10 of the output's; a constant operand below that (a LayerNorm's eps,
# a zero beta: scales of 1e-9..1e-8) left the op to LiteRT's builtin kernel,
# splitting the delegated graph (a broadcast int8 SUB there: 0.48 ms at
# 196x384 against 0.01 ms). Such a constant is quantized at 2**-9 of the
# output scale instead: what it adds below that rounds away in the output.
_ADD_SCALE_RATIO = 2.0 ** -9


def _xnnpack_const_scale_floor(graph, spec, scales) -> float | None:
  """The smallest scale an int8 ADD / SUB constant operand gets (a ratio of
  the op's output scale), or None (another op, int16, no output scale)."""
  node = graph.nodes[spec.node]
  if node.name not in ("add", "sub") or symmetric_acts(spec.rule.act_qtype) \
      or spec.value is not None or node.outputs[0] not in scales:
    return None
  return float(np.min(scales[node.outputs[0]][0])) * _ADD_SCALE_RATIO


def _unsplat_fused_constants(graph, plan, folded) -> None:
  """litert-converter quantizes a *uniform* nonzero bias (every channel the
  same value, e.g. ``bias_init=constant(0.5)``) with the first channel's
  scale only, so channels 1.. come out wrong. Nudging one element by one ulp
  keeps the constant non-uniform; the numbers change by < 1e-7 relative."""
  for ni in plan.fused_nodes:
    node = graph.nodes[ni]
    for a in node.inputs:
      if isinstance(a, graph_lib.Lit) or a not in folded:
        continue
      c = folded[a]
      if c.size > 1 and np.issubdtype(c.dtype, np.floating) and \
          np.all(c == c.flat[0]) and c.flat[0] != 0:
        c = np.array(c, copy=True)
        c.flat[0] = np.nextafter(c.flat[0], np.inf, dtype=c.dtype)
        folded[a] = c


def _float_produced(graph, plan, matcher) -> set[int]:
  """Boundary vars whose producer op is kept float (a rule with
  act_qtype=None, or no rule): quantized only for the ops that read it."""
  out = set()
  for var in plan.boundaries:
    node = graph.producer.get(var)
    if node is None or node.index in plan.quantized_nodes:
      continue
    m = matcher.match(node.module_path, node.name)
    if m is None or m[1].act_qtype is None:
      out.add(var)
  return out


def _int8_lookup_tables(plan) -> None:
  """A table lookup's exit (qlite.ops.int_lookup) is a GATHER, which LiteRT
  has no 16x8 kernel for: an exit an int16 rule covers keeps its table in
  int8 (its own calibrated range) and the int16 ops that read it get a
  requantize, like any int8 -> int16 edge of a mixed model."""
  for region in {id(r): r for r in plan.lookups.values()}.values():
    for var in region.exits:
      b = plan.boundaries.get(var)
      if b is not None and symmetric_acts(b.rule.act_qtype):
        plan.boundaries[var] = dataclasses.replace(
            b, rule=dataclasses.replace(b.rule, act_qtype="int8"))


def _check_16x8_kernels(graph, plan, matcher) -> None:
  """Raises UnsupportedOpError for an op that runs at int16 (its rule, or
  for a pass-through op the value it reads) that LiteRT has no 16x8 kernel
  for (rule_check.NO_16X8_KERNEL)."""
  for node in graph.nodes:
    if node.name not in NO_16X8_KERNEL or \
        node.index not in plan.quantized_nodes:
      continue
    m = matcher.match(node.module_path, node.name)
    if m is None:
      continue
    index, qtype, reads = m[0], m[1].act_qtype, None
    if ops.REGISTRY[node.name].role(node) == ops.PASS_THROUGH:
      srcs = [plan.boundaries.get(plan_lib.scale_source(graph, a))
              for a in node.inputs
              if not isinstance(a, graph_lib.Lit) and graph.is_activation(a)]
      srcs = [b for b in srcs if b is not None]
      if srcs:
        b = srcs[0]
        index, qtype, reads = b.rule_index, b.rule.act_qtype, \
            (b.module_path, b.op)
    if symmetric_acts(qtype):
      raise UnsupportedOpError(no_16x8_kernel_message(
          node.name, node.module_path, node.source, index, reads))


def _requantized_operands(graph, plan, matcher) -> dict[int, list]:
  """``{node index: [(operand index, qtype, target)]}``: the activation
  operands of
  quantized ops whose boundary has another activation qtype than the op's
  rule (an int8 region next to an int16 one). Each is requantized to the
  op's qtype right before it (the converter emits a QUANTIZE int16 <->
  int8), from the same calibrated range, or at the scale of ``target``
  (the op's output var) for an op whose kernel reads its inputs at its
  output's scale (concatenate, max...), and for a masked select
  (``where(mask, logits, fill)`` before a softmax, qlite.ops.masking) of
  the other qtype's logits: its output takes the logits' range widened
  below (for int16 without the 2x margin), and litert-converter refuses an
  int8 or 16x8 SELECT whose requantized operand is at another scale
  ('tfl.select' op quantization parameters violate the same scale
  constraint); requantizing the logits straight to the select's output
  scale is what that SELECT reads anyway (int8 logits into an int16
  select, and int16 logits into an int8 one)."""
  out: dict[int, list] = {}
  qtypes = {b.rule.act_qtype for b in plan.boundaries.values()}
  if len(qtypes) < 2:
    return out
  for node in graph.nodes:
    if node.index not in plan.quantized_nodes or \
        node.index in plan.fused_nodes or \
        ops.REGISTRY[node.name].role(node) == ops.PASS_THROUGH:
      continue                  # a pass-through op runs at its input's
    m = matcher.match(node.module_path, node.name)
    if m is None or m[1].act_qtype is None:
      continue
    handler = ops.REGISTRY[node.name]
    own = plan.boundaries.get(node.outputs[0]) if node.outputs else None
    target = node.outputs[0] if own is not None and \
        own.rule.act_qtype == m[1].act_qtype and (
            type(handler).same_scale_output is not
            ops.base.OpHandler.same_scale_output or (
                own.derived_from is not None and
                not own.derived_offset)) else None
    for i, a in enumerate(node.inputs):
      if isinstance(a, graph_lib.Lit) or not graph.is_activation(a):
        continue
      b = plan.boundaries.get(plan_lib.scale_source(graph, a))
      if b is not None and b.rule.act_qtype != m[1].act_qtype:
        out.setdefault(node.index, []).append(
            (i, m[1].act_qtype, target))
  return out


def _scale_as(b, qtype, stats):
  """``(scale, zero_point)`` of boundary ``b``'s range in ``qtype``."""
  return boundary_scale(dataclasses.replace(
      b, rule=dataclasses.replace(b.rule, act_qtype=qtype)), stats)


def _int16_gelus(graph, plan, matcher) -> set[int]:
  """The ``aten.gelu.default`` nodes that run at int16 (see
  :func:`_gelu_int16`)."""
  out = set()
  for node in graph.nodes:
    if node.name != "aten.gelu.default" or \
        node.index not in plan.quantized_nodes:
      continue
    m = matcher.match(node.module_path, node.name)
    b = plan.boundaries.get(plan_lib.scale_source(graph, node.inputs[0])) \
        if not isinstance(node.inputs[0], graph_lib.Lit) else None
    if m is not None and symmetric_acts(m[1].act_qtype) and b is not None:
      out.add(node.index)
  return out


_GELU_A = float(np.sqrt(2.0 / np.pi))
_GELU_B = _GELU_A * 0.044715


def _sym16(v, lo: float, hi: float):
  """``v`` fake-quantized to symmetric int16 over ``[lo, hi]``."""
  m = max(abs(float(lo)), abs(float(hi)), 1e-6)
  return fq.fake_quant(v, [m / 32767.0], [0], "int16")


def _const16(c: float):
  """A scalar int16 constant (symmetric: exact up to 1 part in 32767)."""
  return fq.fake_quant(np.float32(c), [abs(c) / 32767.0], [0], "int16")


def _gelu_int16(x, lo: float, hi: float):
  """GELU of an int16 ``x`` in ``[lo, hi]`` from ops that have 16x8
  kernels (the converter has no int16 GELU): jax's tanh form written as
  ``x * sigmoid(2a x + 2b x^3)`` (the erf form differs from it by < 5e-4),
  each intermediate int16 over the range it takes on ``[lo, hi]``, the
  output at the node's calibrated boundary: MUL, a same-shape ADD (int16
  SUB with a constant does not prepare here), LOGISTIC."""
  a2, b2 = 2.0 * _GELU_A, 2.0 * _GELU_B
  x2 = _sym16(x * x, 0.0, max(lo * lo, hi * hi))
  x3 = _sym16(x2 * x, lo ** 3, hi ** 3)
  t1 = _sym16(x * _const16(a2), a2 * lo, a2 * hi)
  t3 = _sym16(x3 * _const16(b2), b2 * lo ** 3, b2 * hi ** 3)
  v = _sym16(t1 + t3, a2 * lo + b2 * lo ** 3, a2 * hi + b2 * hi ** 3)
  sig = fq.fake_quant(jax.nn.sigmoid(v), [1.0 / 32768.0], [0], "int16")
  return x * sig


def _int16_broadcast_add_acts(graph, plan, matcher) -> dict[int, int]:
  """``{node index: operand}`` of the int16 ``add`` s of two activations
  whose ``operand`` broadcasts to the other's shape: the converter refuses
  an int16 ADD whose operands differ in shape but takes a broadcasting
  int16 SUB, so ``x + y`` runs as ``y - (-x)``, ``-x`` a MUL by a
  quantized -1 at ``x``'s scale (exact: int16 is symmetric)."""
  out = {}
  for node in graph.nodes:
    if node.name != "add" or len(node.inputs) != 2 or \
        node.index not in plan.quantized_nodes or \
        any(isinstance(a, graph_lib.Lit) or not graph.is_activation(a)
            for a in node.inputs):
      continue
    m = matcher.match(node.module_path, node.name)
    if m is None or not symmetric_acts(m[1].act_qtype):
      continue
    shapes = [tuple(graph.avals[a].shape) for a in node.inputs]
    full = tuple(graph.avals[node.outputs[0]].shape)
    if shapes[0] != shapes[1] and full in shapes:
      out[node.index] = 1 - shapes.index(full)
  return out


def _int16_broadcast_add(graph, plan, node):
  """The index of the constant operand of an int16 ``add`` that broadcasts
  it to the output's shape, else None. The converter refuses an int16
  ADD whose operands differ in shape ('Operands should have valid
  shapes'), and shrinks a broadcast constant back, but accepts a
  broadcasting int16 SUB: ``x + c`` runs as ``x - (-c)``."""
  if node.name != "add" or len(node.inputs) != 2:
    return None
  out = tuple(graph.avals[node.outputs[0]].shape)
  for i in (0, 1):
    spec = plan.consts.get((node.index, i))
    if spec is None or spec.clamp_to is not None or \
        not symmetric_acts(spec.rule.act_qtype):
      continue
    a = node.inputs[i]
    shape = np.shape(a.value) if isinstance(a, graph_lib.Lit) else \
        tuple(graph.avals[a].shape)
    other = node.inputs[1 - i]
    if isinstance(other, graph_lib.Lit) or \
        tuple(graph.avals[other].shape) != out:
      return None
    return i if tuple(shape) != out else None
  return None


def _qtype(name, b):
  try:
    from qlite.core.qtypes import get_qtype
    return get_qtype(name)
  except QTypeError as e:
    raise QTypeError(f"`{b.key}`: {e}") from None
