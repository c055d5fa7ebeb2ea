"""Activation statistics: per-batch (jittable), aggregated on the host, turned into ranges.

Flow: ``batch_stats(x)`` inside the jitted model for each batch ->
``aggregate(acc, batch)`` on the host (numpy) -> a *record* (one per
boundary, stored in :class:`qlite.core.stats.QuantStats`) ->
``activation_range(record, method, aggregation=...)`` -> ``(lo, hi)``.

A record keeps the statistics of every aggregation, so the aggregation can be
chosen when ranges are computed:

============  =================================================================
``min``        global minimum over all batches (float64)
``max``        global maximum (float64)
``absmax``     global max of ``|x|`` (float64)
``sumsq``      sum of ``x**2`` over all batches (float64)
``count``      number of elements seen (int64)
``ema_min``    moving average of per-batch minima, ``decay`` 0.9 (float64)
``ema_max``    moving average of per-batch maxima (float64)
``p_lo_sum``   sum over batches of the ``PERCENTILES[0]`` percentile (float64)
``p_hi_sum``   sum over batches of the ``PERCENTILES[1]`` percentile (float64)
``num_batches`` number of batches aggregated (int64)
``hist_pos``   counts of the positive values per logarithmic bin (int64,
               :data:`HIST_BINS`; only when recorded ``with_histogram``)
``hist_neg``   the same for the magnitudes of the negative values
============  =================================================================

The histograms have fixed bins (:data:`HIST_BINS_PER_OCTAVE` per octave of
``|x|`` from ``2**HIST_MIN_EXP`` up), so batches merge exactly by adding
counts, in one pass over the data; exact zeros are in neither (they are
``count`` minus both sums).

Global min/max is the default: per-batch moving averages gave much worse
int8 models in measurements (see DESIGN.md).
"""

from __future__ import annotations

import math
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from qlite.errors import CalibrationError

__all__ = [
    "PERCENTILES",
    "HIST_BINS",
    "HIST_BINS_PER_OCTAVE",
    "HIST_MIN_EXP",
    "HISTOGRAM_METHODS",
    "RMS_MULTIPLIER",
    "EMA_DECAY",
    "AGGREGATIONS",
    "CALIBRATION_METHODS",
    "batch_stats",
    "aggregate",
    "activation_range",
    "check_finite",
    "mse_range",
    "quantile_range",
    "QUANTILE_TAIL",
    "needs_histogram",
]

PERCENTILES = (0.01, 99.99)
"""Low / high percentiles (in percent) recorded by :func:`batch_stats`."""

RMS_MULTIPLIER = 4.0
"""Default ``k`` of the ``"rms"`` method: range ``[-k * rms, k * rms]``."""

EMA_DECAY = 0.9
"""Default decay of the ``"ema"`` aggregation: ``ema = decay * ema + (1 - decay) * batch``."""

HIST_BINS_PER_OCTAVE = 16
"""Histogram bins per factor of 2 of ``|x|`` (a bin is 4.4 % wide)."""

HIST_MIN_EXP = -32
"""The first bin starts at ``2**HIST_MIN_EXP``; smaller magnitudes count in it."""

HIST_BINS = 64 * HIST_BINS_PER_OCTAVE
"""Bins per sign: ``|x|`` from ``2**-32`` to ``2**32`` (larger ones count in
the last bin; the exact min / max are kept apart)."""

QUANTILE_TAIL = 1e-4
"""``"quantile"`` clips this fraction of all calibration values at each end."""

MSE_SEARCH_OCTAVES = 4
"""``"mse"`` tries clipping each end of the range down to ``1/2**4`` of it."""

AGGREGATIONS = ("global", "ema", "percentile")
CALIBRATION_METHODS = ("minmax", "absmax", "rms", "fixed", "percentile", "mse",
                       "quantile")
HISTOGRAM_METHODS = ("mse", "quantile")
"""Methods that need the ``hist_pos`` / ``hist_neg`` statistics."""

_FLOAT_KEYS = ("min", "max", "absmax", "sumsq")
_HIST_KEYS = ("hist_pos", "hist_neg")


def needs_histogram(method: str | None) -> bool:
  """True when calibration ``method`` reads the logarithmic histograms."""
  return method in HISTOGRAM_METHODS


def _log_histograms(xp, x):
  """``(hist_pos, hist_neg)`` int32 counts of one flat float32 batch."""
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


def batch_stats(x, *, with_percentiles: bool = True,
                with_histogram: bool = False) -> dict:
  """Returns per-tensor statistics of one batch as a dict of scalars.

  Jittable for jax inputs (jax scalars); numpy inputs (e.g. tensors read back
  from LiteRT) give numpy scalars. Keys: ``min``, ``max``, ``absmax``,
  ``sumsq`` (float32), ``count`` (int32), ``p_lo``, ``p_hi`` (the
  :data:`PERCENTILES`; with ``with_percentiles=False`` the sort is skipped and
  they equal ``min`` / ``max``); with ``with_histogram=True`` also
  ``hist_pos`` / ``hist_neg`` (int32 arrays of :data:`HIST_BINS` counts, see
  the module docstring). NaN/Inf propagate (see :func:`check_finite`).
  """
  xp = np if isinstance(x, np.ndarray) else jnp
  x = xp.ravel(xp.asarray(x)).astype(xp.float32)
  lo, hi = xp.min(x), xp.max(x)
  if with_percentiles:
    p_lo, p_hi = xp.percentile(x, xp.asarray(PERCENTILES, dtype=xp.float32))
  else:
    p_lo, p_hi = lo, hi
  out = {
      "min": lo,
      "max": hi,
      "absmax": xp.max(xp.abs(x)),
      "sumsq": xp.sum(x * x),
      "count": xp.asarray(x.size, dtype=xp.int32),
      "p_lo": p_lo,
      "p_hi": p_hi,
  }
  if with_histogram:
    out["hist_pos"], out["hist_neg"] = _log_histograms(xp, x)
  return out


def _check_aggregation(aggregation: str) -> None:
  if aggregation not in AGGREGATIONS:
    raise CalibrationError(
        f"Unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}.")


def _f64(v) -> np.ndarray:
  return np.asarray(v, dtype=np.float64)


def aggregate(acc: Mapping[str, np.ndarray] | None, batch: Mapping[str, object],
              *, aggregation: str = "global", decay: float = EMA_DECAY
              ) -> dict[str, np.ndarray]:
  """Returns the record ``acc`` updated with one batch's :func:`batch_stats` (numpy, host).

  ``acc=None`` starts a record from ``batch``. Statistics for every
  aggregation are kept (see the module docstring), so ``aggregation`` only
  validates the name; pick the aggregation in :func:`activation_range`.
  ``acc`` is not modified.

  Raises:
    CalibrationError: unknown ``aggregation``, ``decay`` outside [0, 1), or
      ``batch`` missing one of min/max/absmax/sumsq/count.
  """
  _check_aggregation(aggregation)
  if not 0.0 <= decay < 1.0:
    raise CalibrationError(f"EMA decay must be in [0, 1), got {decay!r}.")
  missing = [k for k in (*_FLOAT_KEYS, "count") if k not in batch]
  if missing:
    raise CalibrationError(
        f"batch statistics are missing {missing}; build them with batch_stats().")
  b = {k: _f64(batch[k]) for k in _FLOAT_KEYS}
  count = np.asarray(batch["count"], dtype=np.int64)
  has_p = "p_lo" in batch and "p_hi" in batch
  p_lo = _f64(batch["p_lo"]) if has_p else b["min"]
  p_hi = _f64(batch["p_hi"]) if has_p else b["max"]
  hist = {k: np.asarray(batch[k], dtype=np.int64)
          for k in _HIST_KEYS if k in batch}
  if acc is None:
    return {
        **b,
        **hist,
        "count": count,
        "ema_min": b["min"],
        "ema_max": b["max"],
        "p_lo_sum": p_lo,
        "p_hi_sum": p_hi,
        "num_batches": np.asarray(1, dtype=np.int64),
    }
  d = np.float64(decay)
  # a histogram survives only while every batch recorded one
  hist = {k: np.asarray(acc[k], np.int64) + v for k, v in hist.items()
          if k in acc}
  return {
      **hist,
      "min": np.minimum(acc["min"], b["min"]),
      "max": np.maximum(acc["max"], b["max"]),
      "absmax": np.maximum(acc["absmax"], b["absmax"]),
      "sumsq": acc["sumsq"] + b["sumsq"],
      "count": acc["count"] + count,
      "ema_min": d * acc["ema_min"] + (1 - d) * b["min"],
      "ema_max": d * acc["ema_max"] + (1 - d) * b["max"],
      "p_lo_sum": acc["p_lo_sum"] + p_lo,
      "p_hi_sum": acc["p_hi_sum"] + p_hi,
      "num_batches": acc["num_batches"] + 1,
  }


def check_finite(stats: Mapping[str, object], key: str) -> Mapping[str, object]:
  """Returns ``stats`` unchanged if every value is finite.

  ``stats`` is a batch (from :func:`batch_stats`) or an aggregated record;
  ``key`` is the boundary name, used in the message.
  Raises:
    CalibrationError: a statistic is NaN or Inf (names ``key`` and the statistic).
  """
  for stat, value in stats.items():
    arr = np.asarray(value)
    if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
      raise CalibrationError(
          f"Calibration statistics for {key!r} contain NaN/Inf ({stat}={arr}): "
          "the calibration data (or the model's values at this boundary) "
          "contains NaN/Inf. Check the calibration batches and the model "
          "parameters.")
  return stats


def _record_value(record: Mapping[str, object], stat: str, name: str) -> float:
  if stat not in record:
    raise CalibrationError(
        f"Calibration record for {name!r} has no {stat!r} statistic "
        f"(it has {sorted(record)}); rebuild it with aggregate().")
  return float(np.asarray(record[stat]))


def activation_range(record: Mapping[str, object], method: str = "minmax", *,
                     aggregation: str = "global",
                     fixed_range: tuple[float, float] | None = None,
                     rms_multiplier: float = RMS_MULTIPLIER,
                     levels: int = 255,
                     name: str | None = None) -> tuple[float, float]:
  """Returns the ``(lo, hi)`` range (python floats) of one calibrated boundary.

  ``record`` is an aggregated record (or a single :func:`batch_stats` dict,
  treated as one batch). Methods:

  * ``"minmax"``: ``(min, max)`` of the chosen ``aggregation``: ``"global"``
    (min of minima / max of maxima), ``"ema"`` (moving averages) or
    ``"percentile"`` (mean over batches of the percentiles).
  * ``"absmax"``: ``(-a, a)`` with ``a`` the largest magnitude of the above.
  * ``"rms"``: ``(-k * rms, k * rms)``, ``rms = sqrt(sumsq / count)``,
    ``k = rms_multiplier`` (default :data:`RMS_MULTIPLIER` = 4.0).
  * ``"fixed"``: ``fixed_range`` as given.
  * ``"percentile"``: mean over batches of the ``PERCENTILES``.
  * ``"quantile"``: the global :data:`QUANTILE_TAIL` and
    ``1 - QUANTILE_TAIL`` quantiles of all values, from the histograms
    (:func:`quantile_range`).
  * ``"mse"``: the range of least squared quantization error to ``levels``
    steps, from the global histograms (:func:`mse_range`).

  ``name`` (the boundary) is only used in error messages.
  Raises:
    CalibrationError: unknown method or aggregation; ``"fixed"`` without a
      valid ``fixed_range``; a missing statistic; NaN/Inf statistics.
  """
  name = name or "<unnamed boundary>"
  if method not in CALIBRATION_METHODS:
    raise CalibrationError(
        f"Unknown calibration method {method!r} for {name!r}; valid: "
        f"{', '.join(CALIBRATION_METHODS)}.")
  _check_aggregation(aggregation)
  if method == "fixed":
    if fixed_range is None:
      raise CalibrationError(
          f"Calibration method 'fixed' for {name!r} needs fixed_range=(lo, hi).")
    try:
      lo, hi = (float(v) for v in fixed_range)
    except (TypeError, ValueError) as e:
      raise CalibrationError(
          f"fixed_range for {name!r} must be two numbers (lo, hi), got "
          f"{fixed_range!r}.") from e
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
      raise CalibrationError(
          f"fixed_range for {name!r} must be finite with lo <= hi, got "
          f"{fixed_range!r}.")
    return lo, hi

  if "num_batches" not in record:
    record = aggregate(None, record)
  check_finite(record, name)
  get = lambda stat: _record_value(record, stat, name)

  if method == "mse":
    return mse_range(record, levels=levels, name=name)
  if method == "quantile":
    return quantile_range(record, name=name)
  if method == "rms":
    count = get("count")
    if count <= 0:
      raise CalibrationError(f"Calibration record for {name!r} has count 0.")
    r = rms_multiplier * math.sqrt(get("sumsq") / count)
    return -r, r
  n = get("num_batches")
  percentile = (get("p_lo_sum") / n, get("p_hi_sum") / n)
  if method == "percentile":
    return percentile
  if aggregation == "global":
    lo, hi = get("min"), get("max")
  elif aggregation == "ema":
    lo, hi = get("ema_min"), get("ema_max")
  else:
    lo, hi = percentile
  if method == "absmax":
    a = get("absmax") if aggregation == "global" else max(abs(lo), abs(hi))
    return -a, a
  return lo, hi


_HIST_EDGES = 2.0 ** (HIST_MIN_EXP +
                      np.arange(HIST_BINS + 1) / HIST_BINS_PER_OCTAVE)
_HIST_CENTERS = np.sqrt(_HIST_EDGES[:-1] * _HIST_EDGES[1:])


def _side(hist: np.ndarray, end: float):
  """Candidate clip points of one side of the range (magnitudes, ascending,
  ending with ``end``) and, per candidate, the count of values above it and
  their squared clipping error; plus the occupied bins' values / counts."""
  hist = np.asarray(hist, np.float64)
  occupied = np.nonzero(hist)[0]
  values = np.minimum(_HIST_CENTERS[occupied], end)
  counts = hist[occupied]
  if end <= 0.0:
    cand = np.zeros(1)
  else:
    edges = _HIST_EDGES[(_HIST_EDGES < end) &
                        (_HIST_EDGES >= end / 2.0 ** MSE_SEARCH_OCTAVES)]
    cand = np.append(edges, end)
  over = np.maximum(values[None, :] - cand[:, None], 0.0)
  clip_sq = np.sum(counts * over * over, axis=1)
  clipped = np.sum(counts * (over > 0), axis=1)
  return cand, clipped, clip_sq, values, counts


def _check_histograms(record, name: str, method: str) -> None:
  for k in _HIST_KEYS:
    if k not in record:
      raise CalibrationError(
          f"Calibration record for {name!r} has no {k!r} statistic: the "
          f"{method!r} method needs the histograms that qlite.calibrate(..., "
          f"method={method!r}) records.")


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
  lo_edge, hi_edge = _HIST_EDGES[k], min(_HIST_EDGES[k + 1], end)
  return float(min(end, hi_edge - (tail - above) / hist[k] *
                   (hi_edge - lo_edge)))


def quantile_range(record: Mapping[str, object], *,
                   tail: float = QUANTILE_TAIL,
                   name: str | None = None) -> tuple[float, float]:
  """Returns ``(lo, hi)`` leaving out the ``tail`` fraction of all
  calibration values at each end: the global quantiles over every batch
  (unlike ``"percentile"``, a mean of per-batch percentiles), read from the
  record's logarithmic histograms. The range always contains 0.

  Raises:
    CalibrationError: the record has no histograms (calibrate with method
      ``"quantile"``) or holds NaN / Inf.
  """
  name = name or "<unnamed boundary>"
  _check_histograms(record, name, "quantile")
  n = _record_value(record, "count", name) * tail
  hi = max(_record_value(record, "max", name), 0.0)
  lo = min(_record_value(record, "min", name), 0.0)
  return (-_tail_point(record["hist_neg"], -lo, n),
          _tail_point(record["hist_pos"], hi, n))


def mse_range(record: Mapping[str, object], *, levels: int = 255,
              name: str | None = None) -> tuple[float, float]:
  """Returns the ``(lo, hi)`` that minimises the expected squared error of
  quantizing the calibration data to ``levels`` steps (255 for int8).

  The error of a range is the rounding noise of the values inside it
  (``min(x**2, step**2 / 12)`` each, ``step = (hi - lo) / levels``; exact
  zeros cost nothing) plus ``(x - hi)**2`` / ``(lo - x)**2`` for the values
  clipped. It is evaluated on the record's logarithmic histograms
  (``hist_pos`` / ``hist_neg``, one value per bin) for every pair of
  candidate ends: the global min / max and the bin edges down to
  ``1 / 2**MSE_SEARCH_OCTAVES`` of them. An end that is 0 stays 0 (a ReLU
  output keeps ``lo = 0``).

  Raises:
    CalibrationError: the record has no histograms (calibrate with method
      ``"mse"``) or holds NaN / Inf.
  """
  name = name or "<unnamed boundary>"
  _check_histograms(record, name, "mse")
  lo = min(_record_value(record, "min", name), 0.0)
  hi = max(_record_value(record, "max", name), 0.0)
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
