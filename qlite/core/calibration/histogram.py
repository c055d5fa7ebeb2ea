"""Logarithmic histograms of ``|x|``: recorded by :func:`batch_stats`, read
by the histogram range methods (``"mse"``, ``"quantile"``).

The bins are fixed (:data:`HIST_BINS_PER_OCTAVE` per octave of ``|x|`` from
``2**HIST_MIN_EXP`` up), so batches merge exactly by adding counts, in one
pass over the data. Positive values count in ``hist_pos``, the magnitudes of
negative ones in ``hist_neg``; exact zeros are in neither (they are
``count`` minus both sums).
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np

from qlite.errors import CalibrationError

__all__ = [
    "HIST_BINS",
    "HIST_BINS_PER_OCTAVE",
    "HIST_CENTERS",
    "HIST_EDGES",
    "HIST_KEYS",
    "HIST_MIN_EXP",
    "check_histograms",
    "log_histograms",
]

HIST_BINS_PER_OCTAVE = 16
"""Histogram bins per factor of 2 of ``|x|`` (a bin is 4.4 % wide)."""

HIST_MIN_EXP = -32
"""The first bin starts at ``2**HIST_MIN_EXP``; smaller magnitudes count in it."""

HIST_BINS = 64 * HIST_BINS_PER_OCTAVE
"""Bins per sign: ``|x|`` from ``2**-32`` to ``2**32`` (larger ones count in
the last bin; the exact min / max are kept apart)."""

HIST_KEYS = ("hist_pos", "hist_neg")
"""The record keys of the two histograms."""

HIST_EDGES = 2.0 ** (HIST_MIN_EXP +
                     np.arange(HIST_BINS + 1) / HIST_BINS_PER_OCTAVE)
"""The ``HIST_BINS + 1`` bin edges (float64 magnitudes, ascending)."""

HIST_CENTERS = np.sqrt(HIST_EDGES[:-1] * HIST_EDGES[1:])
"""The geometric centre of each bin: the value a bin's counts stand for."""


def log_histograms(xp, x):
  """Counts one batch's values per logarithmic bin.

  Args:
    xp: the array module of ``x`` (``numpy`` or ``jax.numpy``); with
      ``jax.numpy`` the function is jittable.
    x: a flat float32 array.

  Returns:
    ``(hist_pos, hist_neg)``: int32 arrays of :data:`HIST_BINS` counts of the
    positive values and of the magnitudes of the negative values.
  """
  mag = xp.abs(x)
  pos_mag = xp.where(mag > 0, mag, xp.float32(1.0))
  idx = xp.floor((xp.log2(pos_mag) - HIST_MIN_EXP) * HIST_BINS_PER_OCTAVE)
  idx = xp.clip(idx, 0, HIST_BINS - 1).astype(xp.int32)
  spare = xp.int32(HIST_BINS)            # values that belong to the other side

  def counts(select):
    where = xp.where(select, idx, spare)
    if xp is np:
      return np.bincount(where, minlength=HIST_BINS + 1)[:HIST_BINS].astype(
          np.int32)
    return jnp.bincount(where, length=HIST_BINS + 1)[:HIST_BINS].astype(
        jnp.int32)
  return counts(x > 0), counts(x < 0)


def check_histograms(record: Mapping[str, object], name: str,
                     method: str) -> None:
  """Checks that ``record`` holds both histograms.

  Args:
    record: an aggregated calibration record.
    name: the boundary, for the message.
    method: the range method that needs them, for the message.

  Raises:
    CalibrationError: ``hist_pos`` or ``hist_neg`` is missing (the record was
      calibrated with a method that does not record histograms).
  """
  for k in HIST_KEYS:
    if k not in record:
      raise CalibrationError(
          f"Calibration record for {name!r} has no {k!r} statistic: the "
          f"{method!r} method needs the histograms that qlite.calibrate(..., "
          f"method={method!r}) records.")
