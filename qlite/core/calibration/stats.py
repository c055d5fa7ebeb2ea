"""Batch statistics (jittable), their aggregation on the host into a
*record*, and the aggregations that turn a record into a ``(lo, hi)``.

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
               :data:`~qlite.core.calibration.histogram.HIST_BINS`; only when
               recorded ``with_histogram``)
``hist_neg``   the same for the magnitudes of the negative values
============  =================================================================

The aggregations (:data:`AGGREGATIONS`, defined here once):

* ``"global"``: min of the minima / max of the maxima (the default);
* ``"ema"``: moving averages of the per-batch minima / maxima;
* ``"percentile"``: means over batches of the per-batch :data:`PERCENTILES`.

Global min/max is the default: per-batch moving averages gave much worse
int8 models in measurements (see DESIGN.md).
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np

from qlite.core.calibration.histogram import HIST_KEYS, log_histograms
from qlite.errors import CalibrationError

__all__ = [
    "AGGREGATIONS",
    "EMA_DECAY",
    "PERCENTILES",
    "aggregate",
    "aggregated_range",
    "aggregation_needs_percentiles",
    "as_record",
    "batch_stats",
    "check_aggregation",
    "check_finite",
    "record_value",
]

PERCENTILES = (0.01, 99.99)
"""Low / high percentiles (in percent) recorded by :func:`batch_stats`."""

EMA_DECAY = 0.9
"""Default decay of the ``"ema"`` aggregation: ``ema = decay * ema + (1 - decay) * batch``."""

_FLOAT_KEYS = ("min", "max", "absmax", "sumsq")

# name -> (lo, hi) from a record's statistic getter
_AGGREGATION_RANGES: dict[str, Callable] = {
    "global": lambda get: (get("min"), get("max")),
    "ema": lambda get: (get("ema_min"), get("ema_max")),
    "percentile": lambda get: (get("p_lo_sum") / get("num_batches"),
                               get("p_hi_sum") / get("num_batches")),
}

AGGREGATIONS = tuple(_AGGREGATION_RANGES)
"""How per-batch statistics combine: ``("global", "ema", "percentile")``."""

_PERCENTILE_AGGREGATIONS = ("percentile",)


def check_aggregation(aggregation: str) -> None:
  """Checks an aggregation name.

  Args:
    aggregation: one of :data:`AGGREGATIONS`.

  Raises:
    CalibrationError: unknown ``aggregation`` (lists the valid ones).
  """
  if aggregation not in AGGREGATIONS:
    raise CalibrationError(
        f"Unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}.")


def aggregation_needs_percentiles(aggregation: str) -> bool:
  """Tells whether an aggregation reads the per-batch percentiles.

  Args:
    aggregation: one of :data:`AGGREGATIONS`.

  Returns:
    True when :func:`batch_stats` must compute ``p_lo`` / ``p_hi`` (a sort).
  """
  return aggregation in _PERCENTILE_AGGREGATIONS


def batch_stats(x, *, with_percentiles: bool = True,
                with_histogram: bool = False) -> dict:
  """Computes per-tensor statistics of one batch.

  Jittable for jax inputs (jax scalars); numpy inputs (e.g. tensors read back
  from LiteRT) give numpy scalars. NaN/Inf propagate (see :func:`check_finite`).

  Args:
    x: the batch's values (any shape; flattened, cast to float32).
    with_percentiles: compute the :data:`PERCENTILES` (a sort); when False
      ``p_lo`` / ``p_hi`` equal ``min`` / ``max``.
    with_histogram: also count the values in logarithmic bins
      (see :mod:`qlite.core.calibration.histogram`).

  Returns:
    A dict of scalars: ``min``, ``max``, ``absmax``, ``sumsq`` (float32),
    ``count`` (int32), ``p_lo``, ``p_hi``; with ``with_histogram`` also
    ``hist_pos`` / ``hist_neg`` (int32 arrays of ``HIST_BINS`` counts).
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
    out["hist_pos"], out["hist_neg"] = log_histograms(xp, x)
  return out


def _f64(v) -> np.ndarray:
  return np.asarray(v, dtype=np.float64)


def aggregate(acc: Mapping[str, np.ndarray] | None, batch: Mapping[str, object],
              *, aggregation: str = "global", decay: float = EMA_DECAY
              ) -> dict[str, np.ndarray]:
  """Updates a record with one batch's :func:`batch_stats` (numpy, host).

  Statistics for every aggregation are kept (see the module docstring), so
  ``aggregation`` only validates the name; the aggregation is picked when a
  range is computed. ``acc`` is not modified.

  Args:
    acc: the record so far, or None to start one from ``batch``.
    batch: one batch's statistics.
    aggregation: one of :data:`AGGREGATIONS` (validated only).
    decay: the ``"ema"`` decay, in [0, 1).

  Returns:
    The new record (a dict of numpy scalars / arrays).

  Raises:
    CalibrationError: unknown ``aggregation``, ``decay`` outside [0, 1), or
      ``batch`` missing one of min/max/absmax/sumsq/count.
  """
  check_aggregation(aggregation)
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
          for k in HIST_KEYS if k in batch}
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


def as_record(stats: Mapping[str, object]) -> Mapping[str, object]:
  """Returns ``stats`` as a record: an aggregated record unchanged, a single
  :func:`batch_stats` dict aggregated as one batch.

  Args:
    stats: a record or one batch's statistics.

  Returns:
    A record (has ``num_batches``).

  Raises:
    CalibrationError: ``stats`` lacks a statistic :func:`aggregate` needs.
  """
  return stats if "num_batches" in stats else aggregate(None, stats)


def check_finite(stats: Mapping[str, object], key: str) -> Mapping[str, object]:
  """Checks that every statistic is finite.

  Args:
    stats: a batch (from :func:`batch_stats`) or an aggregated record.
    key: the boundary name, used in the message.

  Returns:
    ``stats`` unchanged.

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


def record_value(record: Mapping[str, object], stat: str, name: str) -> float:
  """Reads one scalar statistic of a record.

  Args:
    record: an aggregated record.
    stat: the statistic's key (e.g. ``"max"``).
    name: the boundary, for the message.

  Returns:
    The statistic as a python float.

  Raises:
    CalibrationError: the record has no ``stat``.
  """
  if stat not in record:
    raise CalibrationError(
        f"Calibration record for {name!r} has no {stat!r} statistic "
        f"(it has {sorted(record)}); rebuild it with aggregate().")
  return float(np.asarray(record[stat]))


def aggregated_range(record: Mapping[str, object], aggregation: str,
                     name: str) -> tuple[float, float]:
  """The ``(lo, hi)`` of a record under one aggregation.

  Args:
    record: an aggregated record.
    aggregation: one of :data:`AGGREGATIONS`.
    name: the boundary, for messages.

  Returns:
    ``(lo, hi)`` python floats.

  Raises:
    CalibrationError: unknown ``aggregation``, or a statistic it reads is
      missing.
  """
  check_aggregation(aggregation)
  return _AGGREGATION_RANGES[aggregation](
      lambda stat: record_value(record, stat, name))
