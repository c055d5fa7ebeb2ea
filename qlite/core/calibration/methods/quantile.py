"""``"quantile"``: the global :data:`QUANTILE_TAIL` and ``1 - QUANTILE_TAIL``
quantiles of all calibration values, read from the logarithmic histograms
(unlike ``"percentile"``, a mean of per-batch percentiles)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from qlite.core.calibration import stats
from qlite.core.calibration.histogram import HIST_EDGES, check_histograms
from qlite.core.calibration.registry import CalibrationMethod, RangeContext

QUANTILE_TAIL = 1e-4
"""``"quantile"`` clips this fraction of all calibration values at each end."""


def _tail_point(hist, end: float, tail: float) -> float:
  """The magnitude above which ``tail`` values (a count) of one side lie,
  interpolated linearly inside its bin; at most ``end``."""
  hist = np.asarray(hist, np.float64)
  at_or_above = np.cumsum(hist[::-1])[::-1]
  k = np.nonzero(at_or_above > tail)[0]
  if end <= 0.0 or tail <= 0.0 or k.size == 0:
    return end
  k = k[-1]
  above = at_or_above[k + 1] if k + 1 < hist.size else 0.0
  lo_edge, hi_edge = HIST_EDGES[k], min(HIST_EDGES[k + 1], end)
  return float(min(end, hi_edge - (tail - above) / hist[k] *
                   (hi_edge - lo_edge)))


def quantile_range(record: Mapping[str, object], *,
                   tail: float = QUANTILE_TAIL,
                   name: str | None = None) -> tuple[float, float]:
  """The range leaving out the ``tail`` fraction of all calibration values
  at each end: the global quantiles over every batch, read from the record's
  logarithmic histograms. The range always contains 0.

  Args:
    record: an aggregated record with histograms.
    tail: the fraction clipped at each end.
    name: the boundary, for messages.

  Returns:
    ``(lo, hi)`` python floats.

  Raises:
    CalibrationError: the record has no histograms (calibrate with method
      ``"quantile"``) or lacks a statistic.
  """
  name = name or "<unnamed boundary>"
  check_histograms(record, name, "quantile")
  n = stats.record_value(record, "count", name) * tail
  hi = max(stats.record_value(record, "max", name), 0.0)
  lo = min(stats.record_value(record, "min", name), 0.0)
  return (-_tail_point(record["hist_neg"], -lo, n),
          _tail_point(record["hist_pos"], hi, n))


def _range(record: Mapping[str, object], ctx: RangeContext
           ) -> tuple[float, float]:
  return quantile_range(record, tail=ctx.options.get("tail", QUANTILE_TAIL),
                        name=ctx.name)


METHOD = CalibrationMethod("quantile", _range, needs_histogram=True)
