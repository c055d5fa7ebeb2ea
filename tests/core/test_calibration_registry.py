"""The calibration method registry: every built-in method gives the ranges
the if-chain it replaced gave (numbers recorded from that code), a method
registered here works end to end, unknown names are named errors."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import qlite
from qlite.core import calibration as C
from qlite.core import numerics
from qlite.core.calibration import registry
from qlite.errors import CalibrationError


def _record(batches):
  rec = None
  for b in batches:
    rec = C.aggregate(rec, C.batch_stats(b, with_histogram=True))
  return rec


@pytest.fixture(scope="module")
def records():
  rng = np.random.default_rng(0)
  gauss = [(rng.normal(size=256) * s + o).astype(np.float32)
           for s, o in ((1.0, 0.0), (2.0, 0.5), (0.5, -1.0))]
  rng = np.random.default_rng(1)
  heavy = [rng.standard_t(2, size=2048).astype(np.float32) for _ in range(2)]
  return {"gauss": _record(gauss),
          "relu": _record([np.maximum(b, 0) for b in gauss]),
          "heavy": _record(heavy)}


# (record, method, aggregation, extra kwargs) -> (lo, hi), recorded from the
# activation_range if-chain of qlite/core/calibration.py before the registry.
BEFORE = {
    ("gauss", "minmax", "global", ()): (-7.2988433837890625, 6.01161527633667),
    ("gauss", "minmax", "ema", ()): (-3.3988457274436947, 3.0441193294525144),
    ("gauss", "minmax", "percentile", ()): (-4.212534666061401, 3.079795782764753),
    ("gauss", "absmax", "global", ()): (-7.2988433837890625, 7.2988433837890625),
    ("gauss", "absmax", "ema", ()): (-3.3988457274436947, 3.3988457274436947),
    ("gauss", "absmax", "percentile", ()): (-4.212534666061401, 4.212534666061401),
    ("gauss", "rms", "global", ()): (-5.881053862643923, 5.881053862643923),
    ("gauss", "percentile", "global", ()): (-4.212534666061401, 3.079795782764753),
    ("gauss", "mse", "global", ()): (-7.2988433837890625, 6.01161527633667),
    ("gauss", "quantile", "global", ()): (-7.288328129684901, 6.003604215146628),
    ("gauss", "mse", "global", (("levels", 15),)):
        (-5.907304583757997, 4.362030930661031),
    ("gauss", "rms", "global", (("rms_multiplier", 2.0),)):
        (-2.9405269313219615, 2.9405269313219615),
    ("gauss", "fixed", "ema", (("fixed_range", (-1, 6)),)): (-1.0, 6.0),
    ("relu", "minmax", "global", ()): (0.0, 6.01161527633667),
    ("relu", "minmax", "ema", ()): (0.0, 3.0441193294525144),
    ("relu", "minmax", "percentile", ()): (0.0, 3.079795782764753),
    ("relu", "absmax", "global", ()): (-6.01161527633667, 6.01161527633667),
    ("relu", "absmax", "ema", ()): (-3.0441193294525144, 3.0441193294525144),
    ("relu", "absmax", "percentile", ()): (-3.079795782764753, 3.079795782764753),
    ("relu", "rms", "global", ()): (-4.112593328533928, 4.112593328533928),
    ("relu", "percentile", "global", ()): (0.0, 3.079795782764753),
    ("relu", "mse", "global", ()): (0.0, 6.01161527633667),
    ("relu", "quantile", "global", ()): (0.0, 6.003604215146628),
    ("relu", "mse", "global", (("levels", 15),)): (0.0, 5.417022187747571),
    ("heavy", "minmax", "global", ()): (-122.07252502441406, 96.99213409423828),
    ("heavy", "mse", "global", ()): (-117.37651753019792, 94.51687334012796),
    ("heavy", "quantile", "global", ()): (-120.14904035478312, 95.97826728935469),
}


@pytest.mark.parametrize("case", sorted(BEFORE, key=repr), ids=repr)
def test_builtin_methods_give_the_ranges_they_gave_before(records, case):
  rec, method, aggregation, kw = case
  got = C.activation_range(records[rec], method, aggregation=aggregation,
                           name=rec, **dict(kw))
  assert got == pytest.approx(BEFORE[case], rel=1e-12, abs=0.0)


def test_every_builtin_is_registered_and_covered():
  assert C.method_names()[:7] == ("minmax", "absmax", "rms", "fixed",
                                  "percentile", "mse", "quantile")
  assert set(C.CALIBRATION_METHODS) == set(C.method_names())
  assert {m for _, m, _, _ in BEFORE} == set(C.method_names()[:7])
  assert C.HISTOGRAM_METHODS == ("mse", "quantile")


def test_methods_declare_the_statistics_they_need():
  assert C.needs_histogram("mse") and C.needs_histogram("quantile")
  assert not C.needs_histogram("minmax") and not C.needs_histogram(None)
  assert C.needs_percentiles("percentile")
  assert not C.needs_percentiles("minmax")
  assert C.needs_percentiles("minmax", "percentile")   # the aggregation reads them
  assert C.get_method("fixed").needs_fixed_range
  assert not C.get_method("fixed").reads_statistics


def test_mse_falls_back_to_minmax_for_non_int_qtypes(records):
  rec = records["heavy"]
  assert registry.resolve("mse", "int").name == "mse"
  assert registry.resolve("mse", "float").name == "minmax"
  assert registry.resolve("mse", None).name == "mse"
  assert registry.resolve("quantile", "float").name == "quantile"
  assert C.activation_range(rec, "mse", qtype_kind="float") == (
      -122.07252502441406, 96.99213409423828)
  assert C.activation_range(rec, "mse", qtype_kind="int") == pytest.approx(
      (-117.37651753019792, 94.51687334012796), rel=1e-12)


def test_unknown_method_names_the_valid_ones(records):
  for call in (lambda: registry.get("kl"),
               lambda: C.activation_range(records["gauss"], "kl", name="D:out"),
               lambda: qlite.annotate.CalibrationProvider([], method="kl")):
    with pytest.raises(CalibrationError) as e:
      call()
    msg = str(e.value)
    assert "'kl'" in msg
    assert all(m in msg for m in C.method_names())
  with pytest.raises(qlite.RuleError, match="'kl'.*minmax.*quantile"):
    qlite.QuantizationRule(act_calibration_method="kl")


def test_register_rejects_duplicates_and_non_methods():
  with pytest.raises(CalibrationError, match="already registered"):
    C.register(C.CalibrationMethod("minmax", lambda r, c: (0.0, 1.0)))
  with pytest.raises(CalibrationError, match="CalibrationMethod"):
    C.register("minmax")
  with pytest.raises(CalibrationError, match="'nope'"):
    C.unregister("nope")


def _half_range(record, ctx):
  lo, hi = C.aggregated_range(record, ctx.aggregation, ctx.name)
  return lo / 2, hi / 2


@pytest.fixture
def half_method():
  method = C.register(C.CalibrationMethod("half", _half_range,
                                          needs_histogram=True))
  try:
    yield method
  finally:
    C.unregister("half")
  assert "half" not in C.method_names()


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(nn.relu(nn.Dense(8)(x)))


def _input_scale(blob):
  info = qlite.inspect_tflite(blob)
  assert info.full_integer
  quant = [op for op in info.ops if op.name == "QUANTIZE"]
  t = info.tensor(quant[0].outputs[0])
  return float(t.scale[0]), int(t.zero_point[0])


def test_registered_method_works_end_to_end(half_method):
  rng = np.random.default_rng(0)
  batches = [rng.normal(size=(4, 6)).astype(np.float32) for _ in range(3)]
  model = MLP()
  variables = model.init(jax.random.PRNGKey(0), batches[0])
  assert "half" in C.CALIBRATION_METHODS and "half" in qlite.core.CALIBRATION_METHODS

  # as the calibration's method: it asked for histograms, so they are recorded
  default = [qlite.QuantizationRule()]
  stats = qlite.calibrate(model, default, batches, variables=variables,
                          method="half", progress=False)
  assert stats.meta["method"] == "half"
  assert all("hist_pos" in stats[k] for k in stats.keys())
  blob = qlite.export_tflite(model, default, stats, batches[0],
                             variables=variables)

  # the same range as the rule's method, calibrated with the default method
  by_rule = [qlite.QuantizationRule(act_calibration_method="half")]
  stats_m = qlite.calibrate(model, by_rule, batches, variables=variables,
                            progress=False)
  assert stats_m.meta["method"] == "minmax"
  assert qlite.export_tflite(model, by_rule, stats_m, batches[0],
                             variables=variables) == blob

  # the input's scale is that of half its calibrated min / max
  allx = np.concatenate(batches)
  s, z = numerics.scale_zero_point(np.float32(allx.min() / 2),
                                   np.float32(allx.max() / 2), "int8",
                                   symmetric=False, narrow_range=False)
  assert _input_scale(blob) == (pytest.approx(float(np.ravel(s)[0]), rel=1e-6),
                                int(np.ravel(z)[0]))
  plain = qlite.export_tflite(
      model, default, qlite.calibrate(model, default, batches,
                                      variables=variables, progress=False),
      batches[0], variables=variables)
  assert _input_scale(plain)[0] == pytest.approx(2 * _input_scale(blob)[0],
                                                 rel=1e-3)
