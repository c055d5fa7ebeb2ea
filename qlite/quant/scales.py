"""Boundary scales from calibration statistics, shared by every backend
(LiteRT export, QAT, XLA static-range quantization)."""

from __future__ import annotations

from typing import Any

import numpy as np

from qlite.core import calibration, numerics, qtypes
from qlite.core.stats import QuantStats
from qlite.ops import softmax
from qlite.errors import CalibrationError

ZERO_RANGE_WIDTH = 1e-6
# Calibrated int16 (16x8) ranges are widened this many times: 2x costs 6 dB
# of the ~96 dB int16 resolution and stops held-out values just past the
# calibrated extremes from clipping (the zoo transformer's LayerNorm terms
# and logits: 31.1 -> see bench/RESULTS_int16.md).
INT16_RANGE_MARGIN = 2.0


def _own_range(b, stats: QuantStats | None) -> tuple[float, float]:
  """The calibrated ``(lo, hi)`` of boundary ``b`` alone: its fixed range, or
  the range its rule's method (else the calibration's ``method``) gives.

  Args:
    b: a plan boundary.
    stats: the calibration statistics.

  Returns:
    ``(lo, hi)`` python floats.

  Raises:
    CalibrationError: no record for ``b``, or the method cannot compute a
      range from it.
  """
  if b.fixed_range is not None:
    return b.fixed_range
  if b.derived_from is not None:      # a masked select: the value's range
    lo, hi = boundary_range(b.derived_from, stats)
    if b.derived_offset:              # the mask bias added to the logits
      return lo - hi - b.derived_margin, 0.0
    return lo - b.derived_margin, hi
  if stats is None or b.key not in stats:
    raise CalibrationError(
        f"no calibration statistics for `{b.key}` (op `{b.op}` in module "
        f"`{b.module_path or '<root>'}`, {b.source}); calibrate with the "
        f"same model and rules (qlite.calibrate) and pass those stats")
  method = b.rule.act_calibration_method or stats.meta.get("method",
                                                           "minmax")
  qt = qtypes.get_qtype(b.rule.act_qtype)
  # the registry hands a method that does not suit qt.kind to its fallback
  return calibration.activation_range(
      stats[b.key], method, aggregation=b.rule.act_aggregation,
      fixed_range=b.rule.act_fixed_range, levels=int(qt.qmax - qt.qmin),
      name=b.key, qtype_kind=qt.kind)


def boundary_range(b, stats: QuantStats | None) -> tuple[float, float]:
  """Returns the calibrated ``(lo, hi)`` of boundary ``b``: its fixed range,
  or its own calibrated range joined with those of the boundaries it
  ``shares_with`` (the union).

  Raises:
    CalibrationError: ``stats`` has no record for ``b`` or a boundary it
      shares with (names its key, module path and source line).
  """
  lo, hi = _own_range(b, stats)
  for other in b.shares_with:
    olo, ohi = _own_range(other, stats)
    lo, hi = min(lo, olo), max(hi, ohi)
  return lo, hi


def boundary_scale(b, stats: QuantStats | None):
  """Returns ``(scale, zero_point)`` 1-D numpy arrays of boundary ``b``
  (from :func:`boundary_range`).

  Raises:
    CalibrationError: ``stats`` has no record for ``b`` (names its key,
      module path and source line).
  """
  qt = b.rule.act_qtype
  lo, hi = boundary_range(b, stats)
  if symmetric_acts(qt) and b.fixed_range is not None and \
      b.fixed_range == softmax.FIXED_RANGES.get(b.op):
    lo, hi = softmax.FIXED_RANGES_INT16[b.op]   # LiteRT's 16x8 output scale
  elif symmetric_acts(qt) and b.calibrated:
    # int16 has 256x the levels of int8: a wider range costs little
    # resolution and keeps values past the calibrated extremes unclipped
    lo, hi = lo * INT16_RANGE_MARGIN, hi * INT16_RANGE_MARGIN
  if hi - lo < ZERO_RANGE_WIDTH:
    # A constant tensor (e.g. a dead relu): any scale represents it exactly,
    # but a tiny one makes the next layer's int32 bias (bias / (input scale *
    # weight scale)) overflow in LiteRT. Use a unit-wide range.
    hi = lo + 1.0
  s, z = numerics.scale_zero_point(np.float32(lo), np.float32(hi), qt,
                                   symmetric=boundary_symmetric(b),
                                   narrow_range=False)
  return np.asarray(s, np.float32).reshape(-1), np.asarray(z, np.int64).reshape(-1)


def boundary_symmetric(b) -> bool:
  """True when boundary ``b`` is quantized symmetric (zero point 0): an
  int16 boundary (:func:`symmetric_acts`), or one that an op (or a boundary
  it shares a range with) reads at zero point 0 (``Boundary.zero_point_zero``:
  the right-hand side of a product of two activations)."""
  return symmetric_acts(b.rule.act_qtype) or b.zero_point_zero or any(
      o.zero_point_zero for o in b.shares_with)


def symmetric_acts(qtype) -> bool:
  """True for activation qtypes LiteRT needs symmetric (zero point 0):
  int16 (its 16x8 kernels)."""
  return qtype is not None and qtypes.get_qtype(qtype).name == "int16"



def as_quant_stats(stats: Any) -> QuantStats:
  """Returns ``stats`` as a :class:`QuantStats` (accepts a QuantStats or a
  ``{key: record}`` mapping).

  Raises:
    CalibrationError: anything else.
  """
  if isinstance(stats, QuantStats):
    return stats
  if isinstance(stats, dict) and "quant_stats" in stats:
    stats = stats["quant_stats"]          # a QAT variables dict
  if isinstance(stats, dict) and stats and all(
      isinstance(v, dict) and set(v) == {"min", "max", "count"}
      for v in stats.values()):      # a QAT quant_stats collection
    never = [k for k, v in stats.items() if int(np.asarray(v["count"])) == 0]
    if never:
      raise CalibrationError(f"quant_stats[{never[0]!r}] was never updated: "
                             f"run qat.apply(..., mutable=['quant_stats'])")
    return QuantStats.from_ranges(
        {k: (np.asarray(v["min"]), np.asarray(v["max"]))
         for k, v in stats.items()}, {"source": "qat"})
  if isinstance(stats, dict) and all(isinstance(v, dict)
                                     for v in stats.values()):
    return QuantStats({k: dict(v) for k, v in stats.items()}, {})
  raise CalibrationError(f"stats must be a qlite.QuantStats (from "
                         f"qlite.calibrate or QuantStats.load), got "
                         f"{type(stats).__name__}")


# A range whose int8 step exceeds the values' RMS this many times over keeps
# most values within one code (measured on the zoo / fuzz: < 20x).
OUTLIER_STEP_OVER_RMS = 1.0


def range_warnings(plan, stats: QuantStats | None) -> list[str]:
  """Returns one line per boundary whose calibrated range int8 cannot use
  well: a model input narrower than what an int32 bias can follow
  (quantized as a constant) or constant over all calibration data; any
  boundary so wide next to the values' RMS that one int8 step exceeds it
  (outliers or a mask fill set the range). Intermediate values that are
  constant up to float rounding (the mean of a normalized signal) are
  common and not reported. Boundaries with a fixed range are skipped."""
  if stats is None:
    return []
  lines = []
  for b in plan.boundaries.values():
    if not b.calibrated or b.key not in stats:
      continue
    record = stats[b.key]
    lo, hi = (float(np.asarray(record["min"])), float(np.asarray(record["max"])))
    where = f"`{b.key}` ({b.source})"
    width = hi - lo
    if b.op != "input" and width < ZERO_RANGE_WIDTH:
      continue
    if width == 0:
      lines.append(f"{where} is constant ({lo:g}) over all calibration data")
    elif width < ZERO_RANGE_WIDTH:
      lines.append(f"{where} spans only {width:.3g} ({lo:.3g} .. {hi:.3g}): "
                   f"too narrow for int8 with an int32 bias, it is quantized "
                   f"as a constant; rescale the model's inputs or weights")
    elif "sumsq" in record and "count" in record and \
        float(np.asarray(record["count"])) > 0:
      rms = float(np.sqrt(np.asarray(record["sumsq"], np.float64)
                          / np.asarray(record["count"], np.float64)))
      step = width / 255.0
      if np.isfinite(rms) and rms > 0 and step > OUTLIER_STEP_OVER_RMS * rms:
        lines.append(f"{where}: range {lo:.3g} .. {hi:.3g} gives an int8 "
                     f"step of {step:.3g}, above the values' RMS {rms:.3g}: "
                     f"outliers or a mask fill set the range; most values "
                     f"round to a few codes")
  return lines
