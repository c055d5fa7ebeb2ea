"""Activation statistics: per-batch (jittable), aggregated on the host, turned
into ranges by a registered calibration method.

Flow: ``batch_stats(x)`` inside the jitted model for each batch ->
``aggregate(acc, batch)`` on the host (numpy) -> a *record* (one per
boundary, stored in :class:`qlite.core.stats.QuantStats`) ->
``activation_range(record, method, aggregation=...)`` -> ``(lo, hi)``.

Modules:

* :mod:`~qlite.core.calibration.stats`: batch statistics, aggregation, the
  record layout and the aggregations (``global``, ``ema``, ``percentile``);
* :mod:`~qlite.core.calibration.histogram`: the logarithmic histograms;
* :mod:`~qlite.core.calibration.registry`: :class:`CalibrationMethod` and
  the registry of methods by name;
* :mod:`~qlite.core.calibration.methods`: one module per built-in method
  (``minmax``, ``absmax``, ``rms``, ``fixed``, ``percentile``, ``mse``,
  ``quantile``).

``CALIBRATION_METHODS`` / ``HISTOGRAM_METHODS`` read the registry when
accessed, so they include methods registered later.
"""

from __future__ import annotations

from typing import Mapping

from qlite.core.calibration import methods as _methods
from qlite.core.calibration import registry
from qlite.core.calibration.histogram import (HIST_BINS, HIST_BINS_PER_OCTAVE,
                                              HIST_MIN_EXP)
from qlite.core.calibration.methods.mse import MSE_SEARCH_OCTAVES, mse_range
from qlite.core.calibration.methods.quantile import (QUANTILE_TAIL,
                                                     quantile_range)
from qlite.core.calibration.methods.rms import RMS_MULTIPLIER
from qlite.core.calibration.registry import (CalibrationMethod, RangeContext,
                                             register, unregister)
from qlite.core.calibration.stats import (AGGREGATIONS, EMA_DECAY, PERCENTILES,
                                          aggregate, aggregated_range,
                                          aggregation_needs_percentiles,
                                          batch_stats, check_finite,
                                          record_value)

__all__ = [
    "AGGREGATIONS",
    "CALIBRATION_METHODS",
    "CalibrationMethod",
    "EMA_DECAY",
    "HISTOGRAM_METHODS",
    "HIST_BINS",
    "HIST_BINS_PER_OCTAVE",
    "HIST_MIN_EXP",
    "MSE_SEARCH_OCTAVES",
    "PERCENTILES",
    "QUANTILE_TAIL",
    "RMS_MULTIPLIER",
    "RangeContext",
    "activation_range",
    "aggregate",
    "aggregated_range",
    "batch_stats",
    "check_finite",
    "get_method",
    "method_names",
    "mse_range",
    "needs_histogram",
    "needs_percentiles",
    "quantile_range",
    "record_value",
    "register",
    "unregister",
]

for _m in _methods.BUILTIN:
  register(_m)

get_method = registry.get
method_names = registry.names

CALIBRATION_METHODS: tuple[str, ...]  # documented only: __getattr__ serves it
"""Names of the registered calibration methods, read from the registry when
accessed (includes methods registered later with :func:`register`)."""
HISTOGRAM_METHODS: tuple[str, ...]  # documented only: __getattr__ serves it
"""Names of the registered methods that read the logarithmic histograms
(``"mse"``, ``"quantile"``), read from the registry when accessed."""


def __getattr__(name: str):
  # live views of the registry (PEP 562)
  if name == "CALIBRATION_METHODS":
    return registry.names()
  if name == "HISTOGRAM_METHODS":
    return tuple(n for n in registry.names() if registry.get(n).needs_histogram)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def needs_histogram(method: str | None) -> bool:
  """Tells whether a calibration method reads the logarithmic histograms.

  Args:
    method: a method name, or None (no method: False).

  Returns:
    True when calibration must record ``hist_pos`` / ``hist_neg``.

  Raises:
    CalibrationError: an unknown method name.
  """
  return method is not None and registry.get(method).needs_histogram


def needs_percentiles(method: str | None, aggregation: str = "global") -> bool:
  """Tells whether a method (with an aggregation) reads the per-batch
  percentiles.

  Args:
    method: a method name, or None (only the aggregation counts).
    aggregation: the rule's aggregation.

  Returns:
    True when calibration must record ``p_lo`` / ``p_hi``.

  Raises:
    CalibrationError: an unknown method name.
  """
  return ((method is not None and registry.get(method).needs_percentiles)
          or aggregation_needs_percentiles(aggregation))


def activation_range(record: Mapping[str, object], method: str = "minmax", *,
                     aggregation: str = "global",
                     fixed_range: tuple[float, float] | None = None,
                     rms_multiplier: float = RMS_MULTIPLIER,
                     levels: int = 255,
                     name: str | None = None,
                     qtype_kind: str | None = None) -> tuple[float, float]:
  """Computes the ``(lo, hi)`` range of one calibrated boundary with a
  registered method (see :mod:`qlite.core.calibration.methods`).

  Args:
    record: an aggregated record, or a single :func:`batch_stats` dict
      (treated as one batch).
    method: a registered method name (:func:`method_names`).
    aggregation: one of :data:`AGGREGATIONS` (read by ``minmax`` /
      ``absmax``).
    fixed_range: ``(lo, hi)`` for ``"fixed"``.
    rms_multiplier: ``k`` of ``"rms"``.
    levels: quantization steps (``"mse"``; 255 for int8).
    name: the boundary, only used in error messages.
    qtype_kind: the activation qtype's kind; a method that does not suit it
      hands over to its declared fallback (``"mse"`` -> ``"minmax"`` for
      non-int qtypes). None: no fallback.

  Returns:
    ``(lo, hi)`` python floats.

  Raises:
    CalibrationError: unknown method or aggregation; ``"fixed"`` without a
      valid ``fixed_range``; a missing statistic; NaN/Inf statistics.
  """
  name = name or "<unnamed boundary>"
  m = registry.resolve(method, qtype_kind, boundary=name)
  ctx = RangeContext(aggregation=aggregation, fixed_range=fixed_range,
                     levels=levels, name=name, qtype_kind=qtype_kind,
                     options={"rms_multiplier": rms_multiplier})
  return m.range(record, ctx)
