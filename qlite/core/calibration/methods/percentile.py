"""``"percentile"``: the means over batches of the per-batch
:data:`~qlite.core.calibration.stats.PERCENTILES` (whatever the
aggregation)."""

from __future__ import annotations

from typing import Mapping

from qlite.core.calibration import stats
from qlite.core.calibration.registry import CalibrationMethod, RangeContext


def percentile_range(record: Mapping[str, object], ctx: RangeContext
                     ) -> tuple[float, float]:
  """The mean per-batch percentiles.

  Args:
    record: an aggregated record (calibrated with percentiles).
    ctx: the range context (``name``).

  Returns:
    ``(lo, hi)`` python floats.

  Raises:
    CalibrationError: a missing statistic.
  """
  return stats.aggregated_range(record, "percentile", ctx.name)


METHOD = CalibrationMethod("percentile", percentile_range,
                           needs_percentiles=True)
