"""``"rms"``: ``(-k * rms, k * rms)`` with ``rms = sqrt(sumsq / count)`` over
every calibration value, ``k`` the ``rms_multiplier`` option (default
:data:`RMS_MULTIPLIER`)."""

from __future__ import annotations

import math
from typing import Mapping

from qlite.core.calibration import stats
from qlite.core.calibration.registry import CalibrationMethod, RangeContext
from qlite.errors import CalibrationError

RMS_MULTIPLIER = 4.0
"""Default ``k`` of the ``"rms"`` method: range ``[-k * rms, k * rms]``."""


def rms_range(record: Mapping[str, object], ctx: RangeContext
              ) -> tuple[float, float]:
  """The ``k * rms`` symmetric range.

  Args:
    record: an aggregated record.
    ctx: the range context (``name``; ``options["rms_multiplier"]``).

  Returns:
    ``(-r, r)`` python floats.

  Raises:
    CalibrationError: a missing statistic, or ``count`` 0.
  """
  count = stats.record_value(record, "count", ctx.name)
  if count <= 0:
    raise CalibrationError(f"Calibration record for {ctx.name!r} has count 0.")
  k = ctx.options.get("rms_multiplier", RMS_MULTIPLIER)
  r = k * math.sqrt(stats.record_value(record, "sumsq", ctx.name) / count)
  return -r, r


METHOD = CalibrationMethod("rms", rms_range)
