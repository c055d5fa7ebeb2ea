"""The ODML providers: calibration (collect activation statistics at every
boundary of the plan) and conversion (emit ``quant.fake_quant`` composites
with static scales, weights baked in as constants)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np

from qlite.ops import int_lookup
from qlite.trace import graph as graph_lib
from qlite.litert import fake_quant as fq
from qlite.quant.plan import Plan, build_plan, quantize_operands
from qlite.quant.scales import (as_quant_stats, boundary_range,
                                boundary_scale)
from qlite.core import calibration, numerics
from qlite.core.stats import QuantStats
from qlite.errors import CalibrationError, QTypeError, RuleError
from qlite.litert.rule_check import check_rules_for_litert
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
    def on_value(var, val):
      b = plan.boundaries.get(var)
      if b is None:
        return val
      s, z = scales[var]
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
              spec.rule.act_qtype, symmetric=False, narrow_range=False)
          s, z = np.reshape(s, -1), np.reshape(z, -1)
        else:                                        # a select's fill
          c = xp.clip(xp.nan_to_num(c, neginf=lo, posinf=hi), lo, hi)
          s, z = scales[spec.clamp_to]
        return fq.fake_quant(jax.numpy.asarray(c, jax.numpy.float32), s, z,
                             spec.rule.act_qtype)
      if not np.all(np.isfinite(c)):
        return None   # e.g. a -inf mask value: left float, strict export names it
      s, z = numerics.scale_zero_point(
          np.float32(np.min(c)), np.float32(np.max(c)), spec.rule.act_qtype,
          symmetric=False, narrow_range=False)
      return fq.fake_quant(jax.numpy.asarray(c), np.reshape(s, -1),
                           np.reshape(z, -1), spec.rule.act_qtype)

    def on_node(node, invals):
      return quantize_operands(plan, node, invals, weight=weight, const=const)

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


def _qtype(name, b):
  try:
    from qlite.core.qtypes import get_qtype
    return get_qtype(name)
  except QTypeError as e:
    raise QTypeError(f"`{b.key}`: {e}") from None
