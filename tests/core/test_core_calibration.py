"""Tests for qlite.core.calibration: batch statistics, aggregation, ranges."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlite.core import calibration
from qlite.core.calibration import (CALIBRATION_METHODS, activation_range,
                                    aggregate, batch_stats, check_finite)
from qlite.errors import CalibrationError


@pytest.fixture(scope="module")
def batches():
  rng = np.random.default_rng(0)
  return [(rng.normal(size=(8, 32)) * (1 + i) + i).astype(np.float32)
          for i in range(5)]


def _run(batches, **kw):
  stats_fn = jax.jit(batch_stats)
  acc = None
  for b in batches:
    acc = aggregate(acc, stats_fn(b), **kw)
  return acc


def test_batch_stats_values_and_jit():
  x = np.array([[-3.0, 1.0], [2.0, 0.5]], np.float32)
  s = jax.jit(batch_stats)(x)
  assert set(s) == {"min", "max", "absmax", "sumsq", "count", "p_lo", "p_hi"}
  assert float(s["min"]) == -3.0 and float(s["max"]) == 2.0
  assert float(s["absmax"]) == 3.0 and float(s["sumsq"]) == 14.25
  assert int(s["count"]) == 4
  np.testing.assert_allclose(
      [float(s["p_lo"]), float(s["p_hi"])],
      np.percentile(x, calibration.PERCENTILES), rtol=1e-5)


def test_global_equals_numpy_over_concatenated(batches):
  rec = _run(batches)
  allx = np.concatenate([b.ravel() for b in batches]).astype(np.float64)
  assert rec["min"] == allx.min() and rec["max"] == allx.max()
  assert rec["absmax"] == np.abs(allx).max()
  assert rec["count"] == allx.size and rec["num_batches"] == 5
  np.testing.assert_allclose(rec["sumsq"], np.sum(allx**2), rtol=1e-6)
  assert activation_range(rec) == (allx.min(), allx.max())
  assert activation_range(rec, "absmax") == (-np.abs(allx).max(), np.abs(allx).max())


def test_ema_matches_hand_computation_and_differs(batches):
  rec = _run(batches)
  mins = [float(b.min()) for b in batches]
  maxs = [float(b.max()) for b in batches]
  ema_lo, ema_hi = mins[0], maxs[0]
  for lo, hi in zip(mins[1:], maxs[1:]):
    ema_lo = 0.9 * ema_lo + 0.1 * lo
    ema_hi = 0.9 * ema_hi + 0.1 * hi
  lo, hi = activation_range(rec, "minmax", aggregation="ema")
  assert lo == pytest.approx(ema_lo, rel=1e-12)
  assert hi == pytest.approx(ema_hi, rel=1e-12)
  assert (lo, hi) != activation_range(rec, "minmax", aggregation="global")
  # Custom decay.
  rec5 = _run(batches[:2], decay=0.5)
  assert rec5["ema_max"] == pytest.approx(0.5 * maxs[0] + 0.5 * maxs[1])


def test_percentile_is_mean_over_batches(batches):
  rec = _run(batches)
  p = np.array([np.percentile(b, calibration.PERCENTILES) for b in batches])
  lo, hi = activation_range(rec, "percentile")
  assert lo == pytest.approx(p[:, 0].mean(), rel=1e-5)
  assert hi == pytest.approx(p[:, 1].mean(), rel=1e-5)
  assert activation_range(rec, "minmax", aggregation="percentile") == (lo, hi)


def test_rms_and_fixed(batches):
  rec = _run(batches)
  allx = np.concatenate([b.ravel() for b in batches]).astype(np.float64)
  rms = math.sqrt(np.mean(allx**2))
  lo, hi = activation_range(rec, "rms")
  assert hi == pytest.approx(calibration.RMS_MULTIPLIER * rms, rel=1e-6)
  assert lo == -hi
  assert activation_range(rec, "rms", rms_multiplier=2.0)[1] == pytest.approx(2 * rms, rel=1e-6)
  assert activation_range(rec, "fixed", fixed_range=(-1, 6)) == (-1.0, 6.0)
  with pytest.raises(CalibrationError, match="fixed_range"):
    activation_range(rec, "fixed")
  with pytest.raises(CalibrationError, match="lo <= hi"):
    activation_range(rec, "fixed", fixed_range=(2, 1))


def test_single_batch_dict_accepted():
  s = batch_stats(np.array([-1.0, 2.0], np.float32))
  assert activation_range(s) == (-1.0, 2.0)


def test_unknown_method_and_aggregation():
  rec = aggregate(None, batch_stats(jnp.ones(4)))
  with pytest.raises(CalibrationError) as e:
    activation_range(rec, "kl", name="Dense_0:out")
  msg = str(e.value)
  assert "'kl'" in msg and "Dense_0:out" in msg
  assert all(m in msg for m in CALIBRATION_METHODS)
  with pytest.raises(CalibrationError, match="aggregation"):
    activation_range(rec, aggregation="median")
  with pytest.raises(CalibrationError, match="aggregation"):
    aggregate(None, batch_stats(jnp.ones(4)), aggregation="median")
  with pytest.raises(CalibrationError, match="decay"):
    aggregate(None, batch_stats(jnp.ones(4)), decay=1.5)


def test_nan_is_reported_with_boundary_name():
  s = jax.jit(batch_stats)(jnp.array([1.0, jnp.nan]))
  with pytest.raises(CalibrationError, match=r"'Conv_0/conv:out'.*NaN/Inf"):
    check_finite(s, "Conv_0/conv:out")
  rec = aggregate(None, batch_stats(jnp.array([1.0, jnp.inf])))
  with pytest.raises(CalibrationError, match=r"'blk'.*NaN/Inf"):
    activation_range(rec, name="blk")
  ok = batch_stats(jnp.ones(3))
  assert check_finite(ok, "x") is ok


def test_aggregate_does_not_mutate():
  a = aggregate(None, batch_stats(jnp.ones(3)))
  before = {k: v.copy() for k, v in a.items()}
  aggregate(a, batch_stats(jnp.full(3, 5.0)))
  assert all(np.array_equal(a[k], before[k]) for k in a)
