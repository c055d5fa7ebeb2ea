"""Tests for the histogram range estimators of qlite.core.calibration
(``"mse"`` and ``"quantile"``): one-pass histograms, exact merging, and the
ranges they pick (with the SQNR those ranges give)."""

import jax
import numpy as np
import pytest

from qlite.core import calibration as C
from qlite.core import numerics
from qlite.errors import CalibrationError
from qlite.metrics import sqnr_db


def _record(batches):
  rec = None
  for b in batches:
    rec = C.aggregate(rec, C.batch_stats(b, with_histogram=True))
  return rec


def _int8_sqnr(x, lo, hi):
  s, z = numerics.scale_zero_point(np.float32(lo), np.float32(hi), "int8",
                                   symmetric=False, narrow_range=False)
  return sqnr_db(x, numerics.fake_quant(x, s, z, "int8"))


def test_histogram_jit_equals_numpy_and_merges_exactly():
  rng = np.random.default_rng(0)
  bs = [rng.standard_t(3, size=(16, 64)).astype(np.float32) for _ in range(3)]
  bs[0][0, :5] = 0.0
  got = jax.jit(lambda v: C.batch_stats(v, with_histogram=True))(bs[0])
  ref = C.batch_stats(bs[0], with_histogram=True)
  for k in ("hist_pos", "hist_neg"):
    np.testing.assert_array_equal(np.asarray(got[k]), ref[k])
  # exact zeros are in neither histogram
  assert ref["hist_pos"].sum() + ref["hist_neg"].sum() == bs[0].size - 5
  rec = _record(bs)
  whole = C.batch_stats(np.concatenate([b.ravel() for b in bs]),
                        with_histogram=True)
  for k in ("hist_pos", "hist_neg"):
    np.testing.assert_array_equal(rec[k], whole[k])
  assert rec["hist_pos"].dtype == np.int64
  # batch_stats without the flag records no histogram (and mse says so)
  plain = C.aggregate(None, C.batch_stats(bs[0]))
  assert "hist_pos" not in plain
  with pytest.raises(CalibrationError, match="no 'hist_pos'.*'mse'"):
    C.activation_range(plain, "mse", name="x")


def test_mse_clips_a_rare_outlier_and_gains_snr():
  # 262,144 N(0, 1) values and one at 10: min/max spends the int8 grid on
  # the outlier; clipping it to ~6.4 costs (10 - 6.4)**2 but saves more
  # rounding noise over all the other values.
  rng = np.random.default_rng(1)
  x = rng.normal(size=262_144).astype(np.float32)
  x[123] = 10.0
  rec = _record(np.split(x, 8))
  lo, hi = C.activation_range(rec, "minmax")
  mlo, mhi = C.activation_range(rec, "mse")
  assert hi == pytest.approx(10.0) and 5.0 < mhi < 7.0 and mlo >= lo
  gain = _int8_sqnr(x, mlo, mhi) - _int8_sqnr(x, lo, hi)
  assert gain > 1.2, gain          # measured +1.45 dB (35.9 -> 37.3)


def test_mse_on_gaussian_is_tighter_and_better():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(8, 4096)).astype(np.float32)
  rec = _record(x)
  lo, hi = C.activation_range(rec, "minmax")
  mlo, mhi = C.activation_range(rec, "mse")
  assert 3.5 < -mlo < -lo and 3.5 < mhi < hi       # picks ~4 sigma
  gain = _int8_sqnr(x, mlo, mhi) - _int8_sqnr(x, lo, hi)
  assert gain > 0.25, gain         # measured +0.34 dB


def test_mse_keeps_relu_zero_and_heavy_tails():
  rng = np.random.default_rng(3)
  relu = np.maximum(rng.normal(size=(8, 4096)), 0).astype(np.float32)
  lo, hi = C.activation_range(_record(relu), "mse")
  assert lo == 0.0 and 3.5 < hi <= relu.max()
  # Student-t(3): the tails carry much of the energy; clipping them hard
  # (the 0.01 % quantiles) loses 5 dB, mse stays at least as good as min/max
  t3 = rng.standard_t(3, size=(8, 4096)).astype(np.float32)
  rec = _record(t3)
  snr = {m: _int8_sqnr(t3, *C.activation_range(rec, m))
         for m in ("minmax", "mse", "quantile")}
  assert snr["mse"] >= snr["minmax"]
  assert snr["quantile"] < snr["minmax"] - 3.0, snr


def test_quantile_matches_numpy_within_a_bin():
  rng = np.random.default_rng(4)
  x = rng.laplace(size=(16, 8192)).astype(np.float32)
  lo, hi = C.activation_range(_record(x), "quantile")
  qlo, qhi = np.quantile(x, [C.QUANTILE_TAIL, 1 - C.QUANTILE_TAIL])
  assert lo == pytest.approx(qlo, rel=0.045)    # a bin is 4.4 % wide
  assert hi == pytest.approx(qhi, rel=0.045)
  assert hi < x.max() and lo > x.min()


def test_constant_and_one_sided_records():
  zeros = _record([np.zeros((4, 4), np.float32)])
  assert C.activation_range(zeros, "mse") == (0.0, 0.0)
  assert C.activation_range(zeros, "quantile") == (0.0, 0.0)
  neg = -np.abs(np.random.default_rng(5).normal(size=4096)).astype(np.float32)
  lo, hi = C.activation_range(_record([neg]), "mse")
  assert hi == 0.0 and neg.min() <= lo < -3.0
