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
============  =================================================================

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
    "RMS_MULTIPLIER",
    "EMA_DECAY",
    "AGGREGATIONS",
    "CALIBRATION_METHODS",
    "batch_stats",
    "aggregate",
    "activation_range",
    "check_finite",
]

PERCENTILES = (0.01, 99.99)
"""Low / high percentiles (in percent) recorded by :func:`batch_stats`."""

RMS_MULTIPLIER = 4.0
"""Default ``k`` of the ``"rms"`` method: range ``[-k * rms, k * rms]``."""

EMA_DECAY = 0.9
"""Default decay of the ``"ema"`` aggregation: ``ema = decay * ema + (1 - decay) * batch``."""

AGGREGATIONS = ("global", "ema", "percentile")
CALIBRATION_METHODS = ("minmax", "absmax", "rms", "fixed", "percentile")

_FLOAT_KEYS = ("min", "max", "absmax", "sumsq")


def batch_stats(x, *, with_percentiles: bool = True) -> dict:
  """Returns per-tensor statistics of one batch as a dict of scalars.

  Jittable for jax inputs (jax scalars); numpy inputs (e.g. tensors read back
  from LiteRT) give numpy scalars. Keys: ``min``, ``max``, ``absmax``,
  ``sumsq`` (float32), ``count`` (int32), ``p_lo``, ``p_hi`` (the
  :data:`PERCENTILES`; with ``with_percentiles=False`` the sort is skipped and
  they equal ``min`` / ``max``). NaN/Inf propagate (see :func:`check_finite`).
  """
  xp = np if isinstance(x, np.ndarray) else jnp
  x = xp.ravel(xp.asarray(x)).astype(xp.float32)
  lo, hi = xp.min(x), xp.max(x)
  if with_percentiles:
    p_lo, p_hi = xp.percentile(x, xp.asarray(PERCENTILES, dtype=xp.float32))
  else:
    p_lo, p_hi = lo, hi
  return {
      "min": lo,
      "max": hi,
      "absmax": xp.max(xp.abs(x)),
      "sumsq": xp.sum(x * x),
      "count": xp.asarray(x.size, dtype=xp.int32),
      "p_lo": p_lo,
      "p_hi": p_hi,
  }


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
  if acc is None:
    return {
        **b,
        "count": count,
        "ema_min": b["min"],
        "ema_max": b["max"],
        "p_lo_sum": p_lo,
        "p_hi_sum": p_hi,
        "num_batches": np.asarray(1, dtype=np.int64),
    }
  d = np.float64(decay)
  return {
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
