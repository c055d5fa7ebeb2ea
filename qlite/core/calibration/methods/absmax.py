"""``"absmax"``: the symmetric range ``(-a, a)``, ``a`` the largest magnitude
of the chosen aggregation's range (the global max of ``|x|`` for
``"global"``)."""

from __future__ import annotations

from typing import Mapping

from qlite.core.calibration import stats
from qlite.core.calibration.registry import CalibrationMethod, RangeContext


def absmax_range(record: Mapping[str, object], ctx: RangeContext
                 ) -> tuple[float, float]:
  """The symmetric ``(-a, a)`` range.

  Args:
    record: an aggregated record.
    ctx: the range context (``aggregation``, ``name``).

  Returns:
    ``(-a, a)`` python floats.

  Raises:
    CalibrationError: unknown aggregation or a missing statistic.
  """
  lo, hi = stats.aggregated_range(record, ctx.aggregation, ctx.name)
  if ctx.aggregation == "global":
    a = stats.record_value(record, "absmax", ctx.name)
  else:
    a = max(abs(lo), abs(hi))
  return -a, a


METHOD = CalibrationMethod("absmax", absmax_range)
