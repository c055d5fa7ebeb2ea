"""``"minmax"``: the range of the chosen aggregation (the default method).

``"global"`` gives the min of the minima and the max of the maxima, ``"ema"``
their moving averages, ``"percentile"`` the means over batches of the
per-batch percentiles.
"""

from __future__ import annotations

from typing import Mapping

from qlite.core.calibration import stats
from qlite.core.calibration.registry import CalibrationMethod, RangeContext


def minmax_range(record: Mapping[str, object], ctx: RangeContext
                 ) -> tuple[float, float]:
  """The ``(lo, hi)`` of ``ctx.aggregation``.

  Args:
    record: an aggregated record.
    ctx: the range context (``aggregation``, ``name``).

  Returns:
    ``(lo, hi)`` python floats.

  Raises:
    CalibrationError: unknown aggregation or a missing statistic.
  """
  return stats.aggregated_range(record, ctx.aggregation, ctx.name)


METHOD = CalibrationMethod("minmax", minmax_range)
