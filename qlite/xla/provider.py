"""``PtqProvider``: run a Flax model on XLA with real quantized weights.

The provider evaluates the traced graph and replaces every ``dot_general`` /
``conv_general_dilated`` whose weight operand is computed from params only
(and that a rule quantizes) by a quantized op (:mod:`qlite.xla.matmul`):

* ``rule.act_qtype is None``: weight-only;
* ``act_static_scale=False``: dynamic-range (DRQ), activations quantized per
  row on the fly;
* ``act_static_scale=True``: static-range (SRQ), per-tensor activation
  scales from the same :class:`qlite.QuantStats` (the same plan, the same
  keys) the ODML export uses.

Params may be float (the provider quantizes them once and caches them) or
pre-quantized by :func:`qlite.xla.quantize_params` (run them with
:class:`PtqModel`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qlite.trace import graph as graph_lib
from qlite.quant.plan import Plan, build_plan
from qlite.quant import plan as plan_lib
from qlite.quant.scales import as_quant_stats, boundary_scale
from qlite.core import qtypes as qt_lib
from qlite.core.qarray import QArray, quantize
from qlite.core.stats import QuantStats
from qlite.errors import QliteError
from qlite.quant.provider import Provider, QuantizedModel
from qlite.rules import QuantizationRule, RuleMatcher
from qlite.xla import matmul
from qlite.xla import pallas as pallas_lib
from qlite.xla import sharding as sharding_lib

__all__ = ["PtqProvider", "PtqModel", "QuantizedOp", "quantize_model",
           "scale_source"]

# Ops between a param and a weight operand that keep it the same array.
_IDENTITY_OPS = frozenset({"convert_element_type", "copy", "copy_p"})


def scale_source(graph: graph_lib.Graph, var: int) -> int:
  """Returns the var whose quantization scale ``var`` shares: follows
  pass-through producers (reshape, transpose, ...) back, as the ODML plan
  does. Public alias of the plan's walk."""
  return plan_lib.scale_source(graph, var)


@dataclasses.dataclass(frozen=True)
class QuantizedOp:
  """One dot / conv the provider quantizes.

  Attributes:
    node: node index in the graph.
    weight_operand: operand index of the weight.
    rule: the matching rule.
    mode: ``"weight_only"``, ``"drq"`` or ``"srq"``.
    channel_axes: weight axes with one scale per index.
    tile_sizes: ``{axis: tile}`` (sub-channel) or ``{}``.
    param_index: index of the flat param the weight is (up to casts), or
      None when the weight is computed from params (quantized per call).
    act_scale: SRQ: ``(scale, zero_point, act_qtype)``; else None.
    stats_key: SRQ: the QuantStats key the scale came from.
  """
  node: int
  weight_operand: int
  rule: QuantizationRule
  mode: str
  channel_axes: tuple
  tile_sizes: dict
  param_index: int | None
  act_scale: tuple | None = None
  stats_key: str | None = None

  def quantize_weight(self, w) -> QArray:
    """Returns weight ``w`` quantized as this op expects."""
    r = self.rule
    return quantize(w, r.weight_qtype, channel_axes=self.channel_axes,
                    tile_sizes=self.tile_sizes or None,
                    method=r.weight_calibration_method,
                    narrow_range=qt_lib.get_qtype(r.weight_qtype).is_int)


@dataclasses.dataclass
class PtqState:
  """Per-graph state: the plan and the ops to quantize (by node index)."""
  plan: Plan
  ops: dict[int, QuantizedOp]

  def param_ops(self) -> dict[int, QuantizedOp]:
    """``{flat param index: op}`` for weights that are params (first wins)."""
    out: dict[int, QuantizedOp] = {}
    for op in self.ops.values():
      if op.param_index is not None and op.param_index not in out:
        out[op.param_index] = op
    return out


def _param_of(graph: graph_lib.Graph, var) -> int | None:
  """Flat index of the param that ``var`` is (through dtype casts)."""
  shape = tuple(graph.avals[var].shape)
  while True:
    if var in graph.param_vars:
      return graph.param_vars.index(var)
    node = graph.producer.get(var)
    if node is None or node.name not in _IDENTITY_OPS or \
        len(node.inputs) != 1 or isinstance(node.inputs[0], graph_lib.Lit):
      return None
    var = node.inputs[0]
    if tuple(graph.avals[var].shape) != shape:
      return None


class PtqProvider(Provider):
  """XLA post-training quantization provider: quantized dots and convs.

  Every ``dot_general`` / ``conv_general_dilated`` whose weight a rule
  quantizes runs as a quantized op: weight-only (``act_qtype=None``),
  dynamic-range (``act_static_scale=False``: activations quantized per row
  on the fly) or static-range (``act_static_scale=True``: per-tensor
  activation scales from ``stats``, the boundaries of the LiteRT export).
  Float params are quantized once and cached; pre-quantized ones
  (:func:`qlite.xla.quantize_params`) are used as they are. Use it through
  :func:`qlite.xla.quantize_model`.

  Args:
    rules: the :class:`qlite.QuantizationRule` list (first match wins).
    stats: SRQ activation statistics (:func:`qlite.calibrate`); needed when
      a rule has ``act_static_scale=True`` and ``act_qtype`` set.

  Raises:
    RuleError: an element of ``rules`` is not a ``QuantizationRule``.
    CalibrationError: ``stats`` is not a statistics object; at trace time,
      SRQ without statistics for a boundary (names the key).
    QliteError: at trace time, a ``weight_tile_size`` that does not divide
      the contraction length.

  Example:
    >>> import jax, numpy as np, flax.linen as nn, qlite
    >>> from qlite import xla
    >>> model, x = nn.Dense(4), np.ones((1, 8), np.float32)
    >>> variables = model.init(jax.random.key(0), x)
    >>> rules = [qlite.QuantizationRule()]          # int8 weights, SRQ
    >>> stats = qlite.calibrate(model, rules, [x, -x], variables=variables,
    ...                         progress=False)
    >>> qm = xla.quantize_model(model, xla.PtqProvider(rules, stats),
    ...                         variables=variables)
    >>> qm.apply(variables, x).shape
    (1, 4)
  """

  def __init__(self, rules: Sequence[QuantizationRule],
               stats: QuantStats | None = None):
    self.matcher = RuleMatcher(rules)
    self.stats = None if stats is None else as_quant_stats(stats)
    self._fns: dict = {}
    self._qcache: dict = {}
    self._activation_scales = True   # False: weight layout only (no stats)

  @property
  def rules(self):
    """The provider's :class:`qlite.QuantizationRule` list."""
    return self.matcher.rules

  # -- planning -------------------------------------------------------------
  def prepare(self, graph: graph_lib.Graph) -> PtqState:
    plan = build_plan(graph, self.matcher)
    ops: dict[int, QuantizedOp] = {}
    for (ni, wi), spec in plan.weights.items():
      node = graph.nodes[ni]
      rule = spec.rule
      acts = [i for i, a in enumerate(node.inputs)
              if graph.is_activation(a)]
      if len(acts) != 1 or wi not in (0, 1):
        continue
      wvar = node.inputs[wi]
      wshape = tuple(graph.avals[wvar].shape)
      tiles: dict = {}
      if node.name == "dot_general":
        lay = matmul.dot_layout(node.params["dimension_numbers"],
                                len(graph.avals[node.inputs[acts[0]]].shape),
                                len(wshape), wi)
        axes = lay.channel_axes
        if rule.weight_tile_size and len(lay.w_contract) == 1:
          k = wshape[lay.w_contract[0]]
          t = int(rule.weight_tile_size)
          if k % t:
            raise QliteError(
                f"{node.where()}: weight_tile_size={t} does not divide the "
                f"contraction length {k}; choose a divisor of {k} in rule "
                f"module_path={rule.module_path!r}")
          if t < k:
            tiles = {lay.w_contract[0]: t}
      else:
        dn = node.params["dimension_numbers"]
        axes = (int(dn.rhs_spec[0]),) if wi == 1 else ()
      if rule.act_qtype is None:
        mode = "weight_only"
      elif rule.act_static_scale:
        mode = "srq"
      else:
        mode = "drq"
      act_scale = key = None
      if mode == "srq":
        src = scale_source(graph, node.inputs[acts[0]])
        b = plan.boundaries.get(src)
        if b is None:
          mode = "drq"     # no boundary (e.g. a rule excluded it): on the fly
        elif self._activation_scales:
          s, z = boundary_scale(b, self.stats)
          act_scale = (float(s[0]), int(z[0]), rule.act_qtype)
          key = b.key
      ops[ni] = QuantizedOp(ni, wi, rule, mode, tuple(axes), tiles,
                            _param_of(graph, wvar), act_scale, key)
    return PtqState(plan, ops)

  # -- running --------------------------------------------------------------
  def function(self, graph: graph_lib.Graph, state: PtqState):
    """Returns ``f(flat_params, flat_args) -> flat outputs`` (jittable).

    ``flat_params`` may hold :class:`QArray` leaves (pre-quantized weights)
    in place of the float params of the quantized ops, or (fastest) the
    :class:`qlite.xla.matmul.PackedWeight` leaves of
    :meth:`prepare_flat_params`.
    """
    def f(flat_params, flat_args):
      env_params = [p.dequantize(p.dtype) if isinstance(
          p, (QArray, matmul.PackedWeight, pallas_lib.PallasWeight)) else p
                    for p in flat_params]       # dead (removed) when unused

      def on_node(node, invals):
        op = state.ops.get(node.index)
        if op is None:
          return None
        pw = None if op.param_index is None else flat_params[op.param_index]
        qw = pw if isinstance(pw, (QArray, matmul.PackedWeight,
                                   pallas_lib.PallasWeight)) else \
            op.quantize_weight(invals[op.weight_operand])
        x = invals[1 - op.weight_operand]
        out_dtype = graph.avals[node.outputs[0]].dtype
        if isinstance(qw, pallas_lib.PallasWeight):
          if node.name != "dot_general":
            qw = qw.to_qarray()
          else:                      # planned for Pallas (GPU / TPU)
            return [pallas_lib.quantized_dot(
                x, qw, node.params["dimension_numbers"], op.weight_operand,
                mode=op.mode, act_qtype=op.rule.act_qtype,
                act_scale=op.act_scale, out_dtype=out_dtype)]
        if node.name == "dot_general":
          y = matmul.quantized_dot(
              x, qw, node.params["dimension_numbers"], op.weight_operand,
              mode=op.mode, act_qtype=op.rule.act_qtype,
              act_scale=op.act_scale, out_dtype=out_dtype)
        else:
          y = matmul.quantized_conv(
              x, qw, node.params, mode=op.mode, act_qtype=op.rule.act_qtype,
              act_scale=op.act_scale, out_dtype=out_dtype)
        return [y]

      return graph_lib.evaluate(graph, env_params, flat_args, on_node=on_node)
    return f

  def quantize_flat_params(self, state: PtqState, flat_params: list) -> list:
    """Returns ``flat_params`` with each quantized weight param as a QArray."""
    out = list(flat_params)
    for i, op in state.param_ops().items():
      if not isinstance(out[i], QArray):   # keeps the weight's mesh layout
        out[i] = sharding_lib.follow(op.quantize_weight(out[i]), out[i])
    return out

  def prepare_flat_params(self, graph: graph_lib.Graph, state: PtqState,
                          flat_params: list) -> list:
    """Returns ``flat_params`` quantized (:meth:`quantize_flat_params`) and
    with each integer-path dot weight packed in the layout its dot wants
    (:func:`qlite.xla.matmul.pack_weight`: ``[N, K]``, contracting last;
    int4 two values a byte). Run once, outside jit; feed the result to
    :meth:`function`. QArrays stay the interchange format
    (``quantize_params``, orbax); this is the provider's private layout."""
    out = self.quantize_flat_params(state, flat_params)
    for i, op in state.param_ops().items():
      node = graph.nodes[op.node]
      if node.name != "dot_general" or not isinstance(out[i], QArray):
        continue
      x = node.inputs[1 - op.weight_operand]
      dn, xa = node.params["dimension_numbers"], graph.avals[x]
      pp = pallas_lib.plan(out[i], dn, tuple(xa.shape), xa.dtype,
                           op.weight_operand, op.mode, op.rule.act_qtype)
      if pp is not None:                     # Pallas kernels (GPU / TPU)
        out[i] = pallas_lib.pack(out[i], dn, len(xa.shape), op.weight_operand,
                                 pp)
        continue
      out[i] = matmul.pack_weight(out[i], node.params["dimension_numbers"],
                                  len(graph.avals[x].shape),
                                  op.weight_operand,
                                  act_int8=op.mode != "weight_only")
    return out

  def run(self, qmodel, graph, state, flat_params, flat_args):
    key = id(graph)
    if key not in self._fns:
      self._fns[key] = (graph, jax.jit(self.function(graph, state)))
    fn = self._fns[key][1]
    if any(isinstance(p, jax.core.Tracer) for p in flat_params):
      return self.function(graph, state)(
          self.quantize_flat_params(state, flat_params), flat_args)
    ids = (key,) + tuple(id(p) for p in flat_params)
    if ids not in self._qcache:
      self._qcache.clear()
      self._qcache[ids] = (list(flat_params), self.prepare_flat_params(
          graph, state, sharding_lib.auto_axes(list(flat_params))))
    return fn(self._qcache[ids][1], sharding_lib.auto_axes(list(flat_args)))


class PtqModel(QuantizedModel):
  """A :class:`qlite.QuantizedModel` that also takes pre-quantized params.

  ``apply(params, *args)`` accepts float params or the output of
  :func:`qlite.xla.quantize_params` (QArray leaves), for Linen variables and
  NNX state alike; ``qmodel(*args)`` uses the model's own (float) variables.
  """

  def apply(self, params, *args):
    """Runs the quantized model with ``params`` (float or quantized).

    Args:
      params: the Linen variables or NNX state, float or with ``QArray``
        leaves (:func:`qlite.xla.quantize_params`,
        :func:`qlite.xla.restore_qparams`).
      *args: the model's positional inputs.

    Returns:
      The model's outputs.

    Raises:
      QliteError: ``params`` has another number of arrays than the model
        traced with, or tracing failed.

    Example:
      >>> qm.apply(qparams, x).shape   # qm, qparams: quantize_params' example
      (1, 4)
    """
    return self._run(params, args)


def quantize_model(model, provider: PtqProvider, *example_args,
                   variables=None) -> PtqModel:
  """Wraps ``model`` for XLA post-training quantization by ``provider``.

  Args:
    model: a ``flax.linen.Module`` or ``flax.nnx.Module``, unmodified.
    provider: a :class:`PtqProvider`.
    *example_args: optional example inputs: the model is traced on them
      now, so errors show up here rather than at the first call.
    variables: the float Linen variables (needed for ``qm(*args)`` and with
      ``example_args``); None for NNX.

  Returns:
    A :class:`PtqModel`: ``qm.apply(params, *args)`` with float or quantized
    params, ``qm(*args)`` with the model's own variables.

  Raises:
    QliteError: ``model`` is not a Flax module; ``provider`` is not a qlite
      provider; ``example_args`` given for a Linen model without
      ``variables``; tracing failed; a ``weight_tile_size`` that does not
      divide the contraction length.
    CalibrationError: with ``example_args``, an SRQ rule and no statistics
      for a boundary.

  Example:
    >>> import jax, numpy as np, flax.linen as nn, qlite
    >>> from qlite import xla
    >>> model, x = nn.Dense(4), np.ones((1, 8), np.float32)
    >>> variables = model.init(jax.random.key(0), x)
    >>> rules = [qlite.QuantizationRule(act_static_scale=False)]   # DRQ
    >>> qm = xla.quantize_model(model, xla.PtqProvider(rules), x,
    ...                         variables=variables)
    >>> qm.apply(variables, x).shape
    (1, 4)
  """
  qm = PtqModel(model, provider, variables)
  if example_args:
    if qm.mf.params is None:
      raise QliteError(f"{qm.mf.description} is a Linen module: pass "
                       f"variables=... to trace it on the example args")
    qm.traced(example_args)
  return qm
