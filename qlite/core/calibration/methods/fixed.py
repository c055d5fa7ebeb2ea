"""``"fixed"``: the rule's ``act_fixed_range``, as given; reads no
statistics."""

from __future__ import annotations

import math
from typing import Mapping

from qlite.core.calibration.registry import CalibrationMethod, RangeContext
from qlite.errors import CalibrationError


def fixed_range(record: Mapping[str, object] | None, ctx: RangeContext
                ) -> tuple[float, float]:
  """``ctx.fixed_range`` as python floats.

  Args:
    record: ignored.
    ctx: the range context (``fixed_range``, ``name``).

  Returns:
    ``(lo, hi)`` python floats.

  Raises:
    CalibrationError: no ``fixed_range``, not two numbers, not finite, or
      ``lo > hi``.
  """
  del record
  name, given = ctx.name, ctx.fixed_range
  if given is None:
    raise CalibrationError(
        f"Calibration method 'fixed' for {name!r} needs fixed_range=(lo, hi).")
  try:
    lo, hi = (float(v) for v in given)
  except (TypeError, ValueError) as e:
    raise CalibrationError(
        f"fixed_range for {name!r} must be two numbers (lo, hi), got "
        f"{given!r}.") from e
  if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
    raise CalibrationError(
        f"fixed_range for {name!r} must be finite with lo <= hi, got "
        f"{given!r}.")
  return lo, hi


METHOD = CalibrationMethod("fixed", fixed_range, reads_statistics=False,
                           needs_fixed_range=True)
