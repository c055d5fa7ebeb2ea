"""Quantization-aware training: the model's forward pass fake-quantizes
weights and activations exactly as the exported model will (same plan, same
scales, same fused boundaries), gradients flow by a clipped straight-through
estimator, and activation ranges are moving averages kept in a
``quant_stats`` collection, ready for :func:`qlite.export_tflite`.

    qat = qlite.quantize_model(model, qlite.QatProvider(rules))
    variables = qat.init(key, x)                 # model vars + "quant_stats"
    y, upd = qat.apply(variables, x, mutable=["quant_stats"])   # training
    y = qat.apply(variables, x)                  # eval: frozen ranges
    qlite.export_tflite(model, rules, variables["quant_stats"], x, variables=...)
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qlite.trace import graph as graph_lib
from qlite.litert import fake_quant as fq
from qlite.quant.plan import Plan, build_plan, quantize_operands
from qlite.core import numerics
from qlite.core.qtypes import get_qtype
from qlite.core.stats import QuantStats
from qlite.errors import QliteError
from qlite.trace.flax_hooks import model_function
from qlite.quant.provider import Provider
from qlite.rules import QuantizationRule, RuleMatcher

STATS = "quant_stats"


def fake_quant_ste(x, scale, zero_point, qtype, *, narrow_range=False,
                   rounding="half_even"):
  """Fake-quantizes ``x``; the gradient is 1 where ``x`` is inside the
  representable range and 0 outside (clipped straight-through estimator).
  ``rounding``: as :func:`qlite.core.numerics.fake_quant` (a boundary's
  ``rounding``: LiteRT's average pool rounds half away from zero; an ADD
  whose relu fuses into its kernel is never rounded at its own scale)."""
  qt = get_qtype(qtype)
  scale = jax.lax.stop_gradient(scale)
  zero_point = jax.lax.stop_gradient(zero_point)
  qmin = qt.narrow_qmin(narrow_range)
  lo = (qmin - zero_point.astype(jnp.float32)) * scale
  hi = (qt.qmax - zero_point.astype(jnp.float32)) * scale
  clipped = jnp.clip(x, lo, hi)
  q = numerics.fake_quant(x, scale, zero_point, qt, narrow_range=narrow_range,
                         rounding=rounding)
  return clipped + jax.lax.stop_gradient(q - clipped)


class QatProvider(Provider):
  """Quantization-aware training: fake-quant forward, clipped STE backward.

  The forward pass fake-quantizes weights and activations with the plan and
  numerics of the LiteRT export (per-channel symmetric weights, per-tensor
  asymmetric activations, LiteRT's fixed ranges), so the exported model
  computes what the trained one does. Activation ranges are moving
  averages of each batch's min / max, kept in a ``"quant_stats"``
  collection. Use it through :func:`qlite.quantize_model`, which returns a
  :class:`QatModel`.

  Args:
    rules: the :class:`qlite.QuantizationRule` list (or one rule); the first
      match applies. Export with the same rules.
    ema_decay: moving-average decay of the activation min / max (the first
      update takes the batch's range).

  Raises:
    RuleError: an element of ``rules`` is not a ``QuantizationRule``.

  Example:
    >>> import jax, numpy as np, flax.linen as nn, qlite
    >>> model, x = nn.Dense(4), np.ones((1, 8), np.float32)
    >>> rules = [qlite.QuantizationRule()]
    >>> qat = qlite.quantize_model(model, qlite.QatProvider(rules))
    >>> qvars = qat.init(jax.random.key(0), x)          # + "quant_stats"
    >>> y, upd = qat.apply(qvars, x, mutable=["quant_stats"])
    >>> qvars = {**qvars, **upd}
    >>> blob = qlite.export_tflite(model, rules, qvars["quant_stats"], x,
    ...                            variables={"params": qvars["params"]})
  """

  def __init__(self, rules: Sequence[QuantizationRule], *,
               ema_decay: float = 0.99):
    self.matcher = RuleMatcher(rules)
    self.ema_decay = float(ema_decay)

  def prepare(self, graph):
    return build_plan(graph, self.matcher)

  def wrap_model(self, model, variables=None) -> "QatModel":
    """Returns the :class:`QatModel` of ``model`` (called by
    :func:`qlite.quantize_model`)."""
    return QatModel(model, self, variables)

  def forward(self, graph: graph_lib.Graph, plan: Plan, flat_params,
              flat_args, stats: dict, update: bool):
    """Returns ``(flat outputs, new stats)``; traceable and differentiable."""
    new_stats = dict(stats)
    decay = self.ema_decay

    def on_value(var, val):
      b = plan.boundaries.get(var)
      if b is None:
        return val
      if b.fixed_range is not None:
        lo, hi = (jnp.float32(v) for v in b.fixed_range)
      elif b.derived_from is not None:    # a masked select: the logits' range
        src = new_stats.get(b.derived_from.key, stats[b.derived_from.key])
        lo, hi = src["min"] - b.derived_margin, src["max"]
        if b.derived_offset:           # the mask bias added to the logits
          lo, hi = lo - hi, jnp.float32(0.0)
      else:
        rec = stats[b.key]
        lo, hi = rec["min"], rec["max"]
        if update:
          v = jax.lax.stop_gradient(val)
          bmin, bmax = jnp.min(v), jnp.max(v)
          first = rec["count"] == 0
          lo = jnp.where(first, bmin, decay * lo + (1 - decay) * bmin)
          hi = jnp.where(first, bmax, decay * hi + (1 - decay) * bmax)
          new_stats[b.key] = {"min": lo, "max": hi, "count": rec["count"] + 1}
        # The plan's shared range (plan.boundary_range): the union with the
        # boundaries this one meets at a same-scale op (their last ranges).
        for other in b.shares_with:
          o = stats[other.key]
          seen = o["count"] > 0
          lo = jnp.where(seen, jnp.minimum(lo, o["min"]), lo)
          hi = jnp.where(seen, jnp.maximum(hi, o["max"]), hi)
      s, z = numerics.scale_zero_point(lo, hi, b.rule.act_qtype,
                                       symmetric=b.zero_point_zero or any(
                                           o.zero_point_zero
                                           for o in b.shares_with),
                                       narrow_range=False)
      return fake_quant_ste(val, s, z, b.rule.act_qtype, rounding=b.rounding)

    def weight(spec, w):
      s, z = fq.channel_scale(
          jax.lax.stop_gradient(w), spec.rule.weight_qtype,
          spec.channel_axis, spec.rule.weight_calibration_method)
      return fake_quant_ste(
          w, s, z, spec.rule.weight_qtype,
          narrow_range=spec.rule.weight_calibration_method == "absmax")

    def const(spec, c):
      s, z = numerics.scale_zero_point(
          jax.lax.stop_gradient(jnp.min(c)),
          jax.lax.stop_gradient(jnp.max(c)), spec.rule.act_qtype,
          symmetric=False, narrow_range=False)
      return fake_quant_ste(c, s, z, spec.rule.act_qtype)

    def on_node(node, invals):
      return quantize_operands(plan, node, invals, weight=weight, const=const)

    outs = graph_lib.evaluate(graph, flat_params, flat_args,
                              on_value=on_value, on_node=on_node)
    return outs, new_stats


class QatModel:
  """A model wrapped for QAT: Linen-style ``init`` / ``apply`` (Linen and NNX).

  What :func:`qlite.quantize_model` returns for a :class:`QatProvider`. For
  NNX, ``variables["params"]`` holds the module's state (an ``nnx.State``;
  write trained values back with ``nnx.update(model, variables["params"])``
  before exporting).

  Args:
    model: a ``flax.linen.Module`` or ``flax.nnx.Module``.
    provider: the :class:`QatProvider`.
    variables: not used for Linen (:meth:`init` makes the variables,
      :meth:`apply` takes them); None for NNX.

  Raises:
    QliteError: ``model`` is not a Flax module; an NNX model with
      ``variables``.

  Example:
    >>> import numpy as np, qlite
    >>> from flax import nnx
    >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    >>> x = np.ones((1, 8), np.float32)
    >>> rules = [qlite.QuantizationRule()]
    >>> qat = qlite.quantize_model(model, qlite.QatProvider(rules))
    >>> qvars = qat.init(None, x)       # {"params": State, "quant_stats": ...}
    >>> y, upd = qat.apply(qvars, x, mutable=["quant_stats"])
    >>> y.shape
    (1, 4)
  """

  def __init__(self, model, provider: QatProvider, variables=None):
    self.model = model
    self.provider = provider
    self.mf = model_function(model, variables, require_variables=False)
    self._cache: dict = {}

  def _split(self, variables):
    if not isinstance(variables, dict) or STATS not in variables:
      raise QliteError(f"QAT variables need a '{STATS}' collection (from "
                       f"qat.init)")
    stats = variables[STATS]
    if self.mf.framework == "nnx":
      return variables["params"], stats
    return {k: v for k, v in variables.items() if k != STATS}, stats

  def _traced(self, params, args):
    flat_args = jax.tree.leaves(tuple(args))
    key = tuple((tuple(np.shape(a)), str(jnp.asarray(a).dtype))
                for a in flat_args)
    if key not in self._cache:
      mf = self.mf.__class__(self.mf.fn, params, self.mf.framework,
                             self.mf.root_name, self.mf.description)
      g = graph_lib.trace(mf, args)
      self._cache[key] = (g, self.provider.prepare(g))
    return self._cache[key]

  def init(self, key, *args) -> dict:
    """Returns the model's variables plus a zeroed ``"quant_stats"`` collection.

    The first training step (``apply(..., mutable=["quant_stats"])``) sets
    each range from its batch. Linen: ``model.init(key, *args)`` (fresh
    params: to fine-tune trained ones, replace ``variables["params"]``);
    NNX: ``{"params": the module's current state}``.

    Args:
      key: the ``jax.random`` key of Linen's ``model.init`` (not used for
        NNX).
      *args: example inputs (the shapes and dtypes of training batches).

    Returns:
      ``{**model variables, "quant_stats": {boundary: {"min", "max",
      "count"}}}``.

    Raises:
      QliteError: tracing the model on ``args`` failed.

    Example:
      >>> qvars = qat.init(None, x)     # qat, x: the class example's
      >>> sorted(qvars["quant_stats"])
      ['dot_general', 'input0']
    """
    if self.mf.framework == "nnx":
      params = self.mf.params
      variables = {"params": params}
    else:
      variables = self.model.init(key, *args)
      params = variables
    g, plan = self._traced(params, args)
    stats = {b.key: {"min": jnp.float32(0.0), "max": jnp.float32(0.0),
                     "count": jnp.int32(0)}
             for b in plan.boundaries.values() if b.calibrated}
    return {**variables, STATS: stats}

  def apply(self, variables, *args, mutable=False):
    """Runs the fake-quant forward pass (differentiable: clipped STE).

    Args:
      variables: what :meth:`init` returned (model variables plus
        ``"quant_stats"``), with the current params.
      *args: the model's positional inputs.
      mutable: ``["quant_stats"]`` (or True) updates the moving-average
        ranges from this batch (training); False (default), or a list
        without ``"quant_stats"``, uses the ranges as they are
        (evaluation).

    Returns:
      The model's outputs; when updating, ``(outputs, {"quant_stats":
      updated})`` to merge into ``variables``.

    Raises:
      QliteError: ``variables`` has no ``"quant_stats"`` collection, or
        tracing the model failed.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> def loss(params, qvars, x):      # qat, qvars, x: as above
      ...   y, upd = qat.apply({**qvars, "params": params}, x,
      ...                      mutable=["quant_stats"])
      ...   return jnp.mean(y ** 2), upd
      >>> grads, upd = jax.grad(loss, has_aux=True)(qvars["params"], qvars, x)
      >>> qvars = {**qvars, **upd}
    """
    params, stats = self._split(variables)
    update = bool(mutable) and (mutable is True or STATS in mutable)
    g, plan = self._traced(params, args)
    outs, new_stats = self.provider.forward(
        g, plan, jax.tree.leaves(params), jax.tree.leaves(tuple(args)),
        stats, update)
    out = jax.tree.unflatten(g.out_tree, outs)
    if update:
      return out, {STATS: new_stats}
    return out

  def model_variables(self, variables):
    """The wrapped model's own variables (without ``quant_stats``)."""
    return self._split(variables)[0]


def stats_from_qat(qat_stats: dict, meta: dict | None = None) -> QuantStats:
  """Returns the :class:`QuantStats` of a QAT ``quant_stats`` collection.

  Each boundary's range is the collection's moving-average min / max, so an
  export with these stats uses the trained scales.
  (:func:`qlite.export_tflite` also takes the collection itself; this gives
  a stats object to save or inspect.)

  Args:
    qat_stats: ``variables["quant_stats"]`` of a :class:`QatModel`, after
      training steps.
    meta: extra JSON-serialisable ``meta`` entries (``"source": "qat"`` and
      ``"method": "minmax"`` are set).

  Returns:
    A :class:`QuantStats` with one record per boundary.

  Raises:
    QliteError: a range was never updated by a training step (its count is
      0), or ``meta`` is not JSON-serialisable.

  Example:
    >>> stats = qlite.stats_from_qat(qvars["quant_stats"])   # qvars: trained
    >>> stats.meta["source"]
    'qat'
    >>> stats.save("qat_stats.npz")
  """
  for key, rec in qat_stats.items():
    if int(np.asarray(rec.get("count", 1))) == 0:
      raise QliteError(f"quant_stats[{key!r}] was never updated: run "
                       f"qat.apply(..., mutable=['quant_stats']) first")
  return QuantStats.from_ranges(
      {k: (np.asarray(r["min"]), np.asarray(r["max"]))
       for k, r in qat_stats.items()}, {"source": "qat", **(meta or {})})


def qat_stats_from(stats: QuantStats, qat_variables: dict) -> dict:
  """Returns a ``quant_stats`` collection initialised from calibrated
  ``stats`` (global min / max): QAT then starts from the PTQ ranges, and
  ``qat.apply`` with it (no training) is the PTQ model."""
  out = {}
  for key, rec in qat_variables[STATS].items():
    if key not in stats:
      raise QliteError(f"calibration stats have no record for `{key}`")
    r = stats[key]
    out[key] = {"min": jnp.float32(np.asarray(r["min"])),
                "max": jnp.float32(np.asarray(r["max"])),
                "count": jnp.int32(1)}
  return out
