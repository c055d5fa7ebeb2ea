"""Same-scale ops (concatenate, pad, maximum / minimum of two tensors,
average pool): their LiteRT int8 kernels need the inputs at the output's
scale, so the plan gives the boundaries that meet there one shared range.
The export then has no requantize (int8 -> int8 QUANTIZE) inside the graph
and stays faithful to the fake-quant model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import qlite
from qlite.annotate import ConversionProvider
from qlite.demo import run_tflite_batched
from qlite.metrics import sqnr_db
from qlite.quant.provider import QuantizedModel
from qlite.quant.scales import boundary_range, boundary_scale
from qlite.zoo import registry

RULES = [qlite.QuantizationRule(module_path=r".*", weight_qtype="int8",
                                act_qtype="int8")]


def _requantizes(info) -> list:
  """QUANTIZE ops that do not read a float tensor (the model input)."""
  return [op for op in info.ops if op.name == "QUANTIZE"
          and info.tensor(op.inputs[0]).dtype != "FLOAT32"]


def _output_lsb(info) -> float:
  last = info.ops[-1]
  assert last.name == "DEQUANTIZE"
  return float(info.tensor(last.inputs[0]).scale[0])


def _export(model, variables, batches):
  stats = qlite.calibrate(model, RULES, batches, variables=variables,
                          progress=False)
  blob = qlite.export_tflite(model, RULES, stats, batches[0][:1],
                             variables=variables)
  return stats, blob


def _max_lsb(model, variables, stats, blob, x) -> float:
  """max |LiteRT - fake-quant| over ``x`` in LSB of the output scale."""
  fq = qlite.quantize_model(model, ConversionProvider(RULES, stats),
                            variables=variables)
  fake = np.asarray(fq.apply(variables, x) if variables is not None
                    else fq(x))
  lite = run_tflite_batched(blob, x)
  return float(np.max(np.abs(fake - lite))) / _output_lsb(
      qlite.inspect_tflite(blob)) - 1e-3     # float rounding of the ratio


# -- zoo: the U-Net's skip concatenations, the TCN's average pool ----------

@pytest.mark.parametrize("name", ["unet/linen", "unet/nnx", "tcn/linen"])
def test_zoo_export_converts_only_at_the_interface(name):
  z = registry.get(name)
  stats = qlite.calibrate(z.model, RULES, z.batches, variables=z.variables,
                          progress=False)
  blob = qlite.export_tflite(z.model, RULES, stats, z.example_args,
                             variables=z.variables)
  info = qlite.inspect_tflite(blob)
  assert info.full_integer
  hist = info.op_histogram
  # One QUANTIZE of the float input, one DEQUANTIZE of the output.
  assert hist["QUANTIZE"] + hist["DEQUANTIZE"] == 2, hist
  assert hist["QUANTIZE"] == 1 and not _requantizes(info)
  if name.startswith("unet"):
    # The two skip concats; the bilinear 2x is one RESIZE_BILINEAR.
    assert hist["CONCATENATION"] == 2 and hist["RESIZE_BILINEAR"] == 1
  # (Before the shared ranges: 3 LSB on the U-Net, 5 on the NNX TCN.)
  x = np.concatenate(z.batches[:4])
  assert _max_lsb(z.model, z.variables, stats, blob, x) <= 2.0


def test_unet_skip_concat_boundaries_share_the_union_range():
  z = registry.get("unet/linen")
  stats = qlite.calibrate(z.model, RULES, z.batches, variables=z.variables,
                          progress=False)
  provider = ConversionProvider(RULES, stats)
  _, plan = QuantizedModel(z.model, provider, z.variables).traced(
      z.example_args)
  by_key = plan.boundary_by_key()
  # The first skip concat: upsampled bottleneck + enc2's output -> concat.
  group = [by_key[k] for k in ("bottleneck/conv_general_dilated",
                               "enc2/conv_general_dilated", "concatenate")]
  lo = min(float(stats[b.key]["min"]) for b in group)
  hi = max(float(stats[b.key]["max"]) for b in group)
  for b in group:
    assert {o.key for o in b.shares_with} == {g.key for g in group} - {b.key}
    assert boundary_range(b, stats) == pytest.approx((lo, hi))
    s, z0 = boundary_scale(b, stats)
    s0, zz = boundary_scale(group[0], stats)
    assert s[0] == s0[0] and z0[0] == zz[0]
  # The head has its own range.
  assert by_key["head/conv_general_dilated"].shares_with == ()


# -- small models: branches with very different ranges meet ----------------

class Branches(nn.Module):
  """Two conv branches, ~[0, 1] and ~[-50, 30], each through a max pool
  (the converter cannot move a scale back through it), then meeting at a
  same-scale op."""
  kind: str

  @nn.compact
  def __call__(self, x):
    small = nn.relu(nn.Conv(4, (3, 3), name="small")(x))
    big = 40.0 * nn.Conv(4, (3, 3), name="big")(x) - 10.0
    small = nn.max_pool(small, (2, 2), (2, 2))
    big = nn.max_pool(big, (2, 2), (2, 2))
    if self.kind == "concatenate":
      y = jnp.concatenate([small, big], axis=-1)
    elif self.kind == "maximum":
      y = jnp.maximum(small, big)
    elif self.kind == "pad":
      y = jnp.pad(big, ((0, 0), (1, 1), (1, 1), (0, 0)))
    else:
      y = nn.avg_pool(big, (2, 2), (1, 1))
    return nn.Conv(3, (1, 1), name="head")(y)


# LiteRT's AVERAGE_POOL_2D rounds ties of the mean up, fake-quant to even:
# one LSB of the pool's (wide) scale reaches the head as a few output LSB.
@pytest.mark.parametrize("kind,max_lsb", [("concatenate", 1.0),
                                          ("maximum", 1.0), ("pad", 1.0),
                                          ("avg_pool", 4.0)])
def test_branches_with_different_ranges_need_no_requantize(kind, max_lsb):
  rng = np.random.default_rng(0)
  batches = [rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
             for _ in range(4)]
  model = Branches(kind)
  variables = model.init(jax.random.key(0), batches[0])
  stats, blob = _export(model, variables, batches)
  if kind in ("concatenate", "maximum"):
    lo_s, hi_s = (float(stats["small/conv_general_dilated"][k])
                  for k in ("min", "max"))
    lo_b, hi_b = (float(stats["sub"][k]) for k in ("min", "max"))
    assert hi_s - lo_s < 0.1 * (hi_b - lo_b)     # very different ranges
  info = qlite.inspect_tflite(blob)
  assert info.full_integer
  assert not _requantizes(info), info.op_histogram
  assert info.op_histogram["QUANTIZE"] == 1
  x = np.concatenate(batches)
  assert _max_lsb(model, variables, stats, blob, x) <= max_lsb
  # And the export is as accurate as the float model allows.
  ref = np.asarray(model.apply(variables, x))
  assert sqnr_db(ref, run_tflite_batched(blob, x)) >= 30.0


def test_relu_after_add_keeps_its_own_range():
  """max(x, 0) is a relu (fused into the add), not a same-scale MAXIMUM:
  its output keeps the relu's range, not the union with the input's."""

  class AddRelu(nn.Module):
    @nn.compact
    def __call__(self, x):
      a = nn.Conv(4, (3, 3), name="a")(x)
      b = nn.Conv(4, (3, 3), name="b")(x)
      return nn.relu(a + b)

  rng = np.random.default_rng(1)
  batches = [rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
             for _ in range(2)]
  model = AddRelu()
  variables = model.init(jax.random.key(0), batches[0])
  stats = qlite.calibrate(model, RULES, batches, variables=variables,
                          progress=False)
  _, plan = QuantizedModel(model, ConversionProvider(RULES, stats),
                           variables).traced((batches[0][:1],))
  assert all(b.shares_with == () for b in plan.boundaries.values())


def test_qat_forward_uses_the_shared_range():
  """QAT fake-quantizes with the same union ranges as the export: after a
  few range updates, QAT's forward equals the fake-quant model built from
  its quant_stats, and the exported .tflite has no requantize."""
  rng = np.random.default_rng(2)
  batches = [rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
             for _ in range(3)]
  model = Branches("concatenate")
  variables = model.init(jax.random.key(0), batches[0])
  qat = qlite.quantize_model(model, qlite.QatProvider(RULES))
  qv = {**qat.init(jax.random.key(0), batches[0]), **variables}
  for b in batches:
    _, upd = qat.apply(qv, b, mutable=["quant_stats"])
    qv = {**qv, **upd}
  x = np.concatenate(batches)
  qat_out = np.asarray(qat.apply(qv, x))
  stats = qlite.stats_from_qat(qv["quant_stats"])
  fq = qlite.quantize_model(model, ConversionProvider(RULES, stats),
                            variables=variables)
  np.testing.assert_allclose(np.asarray(fq.apply(variables, x)), qat_out,
                             rtol=0, atol=1e-5)
  blob = qlite.export_tflite(model, RULES, qv["quant_stats"], x[:1],
                             variables=variables)
  assert not _requantizes(qlite.inspect_tflite(blob))


# -- an average pool followed by relu / relu6 ------------------------------

class PoolThenClamp(nn.Module):
  """conv -> (concat) -> average pool -> relu | clip(0, 6): LiteRT fuses the
  clamp into AVERAGE_POOL_2D, whose output must keep its input's scale."""
  concat: bool = False
  clamp: str = "relu"

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(8, (3, 3))(x)
    if self.concat:
      y = jnp.concatenate([y, nn.Conv(8, (3, 3))(x)], axis=-1)
    y = nn.avg_pool(y, (2, 2), (2, 2))
    y = nn.relu(y) if self.clamp == "relu" else jnp.clip(y, 0.0, 6.0)
    return nn.Dense(4)(y.reshape((y.shape[0], -1)))


@pytest.mark.parametrize("concat,clamp", [(False, "relu"), (True, "relu"),
                                          (False, "relu6")])
def test_average_pool_then_clamp_shares_the_pool_scale(concat, clamp):
  """Before: the converter rejected the model ('tfl.average_pool_2d' op
  quantization parameters violate the same scale constraint; fuzz seed
  67). Now the clamp's boundary joins the pool's range union."""
  model = PoolThenClamp(concat=concat, clamp=clamp)
  rng = np.random.default_rng(3)
  batches = [rng.standard_normal((4, 8, 8, 3)).astype(np.float32)
             for _ in range(4)]
  variables = model.init(jax.random.key(0), batches[0])
  stats, blob = _export(model, variables, batches)
  info = qlite.inspect_tflite(blob)
  assert info.full_integer and info.op_histogram["AVERAGE_POOL_2D"] == 1
  assert not _requantizes(info)
  x = np.concatenate(batches)
  # The pool's boundary rounds half away from zero like LiteRT's kernel
  # (Boundary.rounding): LiteRT equals fake-quant here. With half-to-even
  # the ties left 3.0 / 4.0 / 3.0 LSB after the dense layer.
  assert _max_lsb(model, variables, stats, blob, x) <= 0.5
  ref = np.asarray(model.apply(variables, x))
  assert sqnr_db(ref, run_tflite_batched(blob, x)) >= 30.0


@pytest.mark.parametrize("xnnpack", [True, False])
def test_litert_average_pool_rounds_code_sums_half_away_from_zero(xnnpack):
  """The fact behind Boundary.rounding="half_away": LiteRT's int8
  AVERAGE_POOL_2D (XNNPACK and builtin) outputs round_half_away(sum of the
  4 input codes / 4), not half-to-even, and the fake-quant model agrees."""
  from qlite.litert.runtime import TFLiteRunner

  class Pool(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.avg_pool(x, (2, 2), (2, 2))
  rng = np.random.default_rng(0)
  batches = [rng.uniform(-0.5, 2.0, (1, 16, 16, 4)).astype(np.float32)
             for _ in range(4)]
  stats = qlite.calibrate(Pool(), RULES, batches, variables={},
                          progress=False)
  blob = qlite.export_tflite(Pool(), RULES, stats, batches[0],
                             variables={}, io_dtype="int8")
  info = qlite.inspect_tflite(blob)
  t_in, t_out = info.tensor(info.inputs[0]), info.tensor(info.outputs[0])
  s, zp = float(t_in.scale[0]), int(t_in.zero_point[0])
  assert zp != 0 and float(t_out.scale[0]) == s       # same scale, offset
  x = batches[1]
  q = np.clip(np.round(x / s) + zp, -128, 127)
  got = np.round(TFLiteRunner(blob, xnnpack=xnnpack).run(x)[0] / s) + zp
  sums = q.reshape(1, 8, 2, 8, 2, 4).sum((2, 4))
  assert int(np.sum(sums % 4 == 2)) > 20                   # many ties
  away = np.sign(sums) * np.floor(np.abs(sums) / 4 + 0.5)
  np.testing.assert_array_equal(got, away)
  assert np.sum(got != np.round(sums / 4)) > 10            # not half-even
  fq = qlite.quantize_model(Pool(), ConversionProvider(RULES, stats),
                            variables={})
  fake = np.asarray(fq.apply({}, x.astype(np.float32)))
  np.testing.assert_array_equal(np.round(fake / s) + zp, got)
