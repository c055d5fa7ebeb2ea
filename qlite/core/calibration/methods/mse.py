"""``"mse"``: the range of least squared quantization error to ``levels``
steps, from the global logarithmic histograms.

Its noise model is that of a uniform int grid, so the method declares it
suits int qtypes only: for any other qtype kind ``"minmax"`` stands in.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from qlite.core import qtypes
from qlite.core.calibration import stats
from qlite.core.calibration.histogram import (HIST_CENTERS, HIST_EDGES,
                                              check_histograms)
from qlite.core.calibration.registry import CalibrationMethod, RangeContext

MSE_SEARCH_OCTAVES = 4
"""``"mse"`` tries clipping each end of the range down to ``1/2**4`` of it."""


def _side(hist: np.ndarray, end: float):
  """Candidate clip points of one side of the range (magnitudes, ascending,
  ending with ``end``) and, per candidate, the count of values above it and
  their squared clipping error; plus the occupied bins' values / counts."""
  hist = np.asarray(hist, np.float64)
  occupied = np.nonzero(hist)[0]
  values = np.minimum(HIST_CENTERS[occupied], end)
  counts = hist[occupied]
  if end <= 0.0:
    cand = np.zeros(1)
  else:
    edges = HIST_EDGES[(HIST_EDGES < end) &
                       (HIST_EDGES >= end / 2.0 ** MSE_SEARCH_OCTAVES)]
    cand = np.append(edges, end)
  over = np.maximum(values[None, :] - cand[:, None], 0.0)
  clip_sq = np.sum(counts * over * over, axis=1)
  clipped = np.sum(counts * (over > 0), axis=1)
  return cand, clipped, clip_sq, values, counts


def mse_range(record: Mapping[str, object], *, levels: int = 255,
              name: str | None = None) -> tuple[float, float]:
  """The ``(lo, hi)`` that minimises the expected squared error of
  quantizing the calibration data to ``levels`` steps.

  The error of a range is the rounding noise of the values inside it
  (``min(x**2, step**2 / 12)`` each, ``step = (hi - lo) / levels``; exact
  zeros cost nothing) plus ``(x - hi)**2`` / ``(lo - x)**2`` for the values
  clipped. It is evaluated on the record's logarithmic histograms (one value
  per bin) for every pair of candidate ends: the global min / max and the
  bin edges down to ``1 / 2**MSE_SEARCH_OCTAVES`` of them. An end that is 0
  stays 0 (a ReLU output keeps ``lo = 0``).

  Args:
    record: an aggregated record with histograms.
    levels: quantization steps (255 for int8).
    name: the boundary, for messages.

  Returns:
    ``(lo, hi)`` python floats.

  Raises:
    CalibrationError: the record has no histograms (calibrate with method
      ``"mse"``) or lacks a statistic.
  """
  name = name or "<unnamed boundary>"
  check_histograms(record, name, "mse")
  lo = min(stats.record_value(record, "min", name), 0.0)
  hi = max(stats.record_value(record, "max", name), 0.0)
  if hi - lo <= 0.0:
    return lo, hi
  hi_c, hi_n, hi_e, hi_v, hi_h = _side(record["hist_pos"], hi)
  lo_c, lo_n, lo_e, lo_v, lo_h = _side(record["hist_neg"], -lo)
  # sum of min(x**2, q) over every nonzero value, for any q: prefix sums
  # over the values sorted by square
  sq = np.concatenate([hi_v, lo_v]) ** 2
  counts = np.concatenate([hi_h, lo_h])
  order = np.argsort(sq, kind="stable")
  sq, counts = sq[order], counts[order]
  below_sq = np.concatenate([[0.0], np.cumsum(counts * sq)])
  below_n = np.concatenate([[0.0], np.cumsum(counts)])
  q = ((hi_c[:, None] + lo_c[None, :]) / float(levels)) ** 2 / 12.0
  k = np.searchsorted(sq, q)
  noise = below_sq[k] + q * (below_n[-1] - below_n[k])
  # clipped values: their clipping error instead of rounding noise
  err = (noise - (hi_n[:, None] + lo_n[None, :]) * q
         + hi_e[:, None] + lo_e[None, :])
  i, j = np.unravel_index(np.argmin(err), err.shape)
  return -float(lo_c[j]), float(hi_c[i])


def _range(record: Mapping[str, object], ctx: RangeContext
           ) -> tuple[float, float]:
  return mse_range(record, levels=ctx.levels, name=ctx.name)


METHOD = CalibrationMethod("mse", _range, needs_histogram=True,
                           qtype_kinds=(qtypes.INT,), fallback="minmax")
