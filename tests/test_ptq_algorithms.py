"""qlite.ptq.optimize: each algorithm's effect measured on held-out data
(other draws than the calibration batches), its invariants (float
equivalence, weights on the export's grid), and the plain path unchanged."""

import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx

import qlite
from qlite.litert import fake_quant as fq

RULES = [qlite.QuantizationRule()]


def _batches(seed, n, shape, lo=0.0, hi=1.0):
  rng = np.random.default_rng(seed)
  return [rng.uniform(lo, hi, shape).astype(np.float32) for _ in range(n)]


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(8)(x)


def _mlp():
  m = _Mlp()
  v = m.init(jax.random.key(0), np.zeros((1, 24), np.float32))
  return m, jax.tree.map(np.asarray, v)


def _litert(blob, xs):
  r = qlite.TFLiteRunner(blob)
  return np.concatenate([r.run(x)[0] for x in xs])


def _export(res, example):
  return qlite.export_tflite(res.model, RULES, res.stats, example,
                             variables=res.variables)


def test_no_algorithms_is_plain_calibration_and_same_bytes():
  m, v = _mlp()
  calib = _batches(1, 4, (8, 24))
  res = qlite.ptq.optimize(m, RULES, calib, v, algorithms=())
  stats = qlite.calibrate(m, RULES, calib, variables=v, progress=False)
  assert res.report == [] and res.variables is v
  a = _export(res, calib[0][:1])
  b = qlite.export_tflite(m, RULES, stats, calib[0][:1], variables=v)
  assert a == b


def test_bias_correction_removes_the_mean_output_error_on_held_out_data():
  m, v = _mlp()
  # inputs with a large mean: the weight rounding's error has a mean
  calib = _batches(1, 8, (16, 24), 2.0, 3.0)
  held = _batches(2, 4, (16, 24), 2.0, 3.0)
  ref = np.concatenate([np.asarray(m.apply(v, x)) for x in held])

  def mean_err(algos):
    res = qlite.ptq.optimize(m, RULES, calib, v, algorithms=algos)
    out = _litert(_export(res, calib[0][:1]), [x[i:i + 1] for x in held
                                               for i in range(len(x))])
    return np.abs((out - ref).mean(axis=0)).mean(), res
  before, _ = mean_err(())
  after, res = mean_err(("bias_correction",))
  assert any("bias_correction: Dense_1" in r for r in res.report)
  print(f"mean |mean error| {before:.4g} -> {after:.4g}")
  assert after < 0.5 * before, (before, after)
  # the kernels are unchanged; only the biases moved
  np.testing.assert_array_equal(res.variables["params"]["Dense_0"]["kernel"],
                                v["params"]["Dense_0"]["kernel"])
  assert not np.array_equal(res.variables["params"]["Dense_1"]["bias"],
                            v["params"]["Dense_1"]["bias"])


def test_bias_correction_goes_into_the_batchnorm_mean():
  class ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(8, (3, 3), use_bias=False)(x)
      return nn.BatchNorm(use_running_average=True)(x)
  m = ConvBN()
  x0 = np.zeros((1, 6, 6, 3), np.float32)
  v = jax.tree.map(np.asarray, m.init(jax.random.key(1), x0))
  calib = _batches(3, 4, (2, 6, 6, 3), 1.0, 2.0)
  res = qlite.ptq.optimize(m, RULES, calib, v, algorithms="bias_correction")
  assert not np.array_equal(res.variables["batch_stats"]["BatchNorm_0"]["mean"],
                            v["batch_stats"]["BatchNorm_0"]["mean"])
  np.testing.assert_array_equal(res.variables["params"]["BatchNorm_0"]["bias"],
                                v["params"]["BatchNorm_0"]["bias"])
  _export(res, x0)        # the self-check passes on the changed weights


class _LnDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    return nn.Dense(16, name="q")(y) + nn.Dense(16, name="k")(y)


def _ln_dense():
  m = _LnDense()
  v = jax.tree.map(np.asarray, m.init(jax.random.key(2),
                                      np.zeros((1, 4, 32), np.float32)))
  scale = np.ones(32, np.float32)
  scale[[3, 17]] = 20.0                  # outlier channels, as trained LNs
  v["params"]["LayerNorm_0"]["scale"] = scale
  return m, v


def test_smoothquant_is_float_equivalent_and_gains_on_held_out_data():
  m, v = _ln_dense()
  rng = np.random.default_rng(4)
  calib = [rng.normal(0, 1, (4, 4, 32)).astype(np.float32) for _ in range(8)]
  held = [rng.normal(0, 1, (1, 4, 32)).astype(np.float32) for _ in range(16)]
  ref = np.concatenate([np.asarray(m.apply(v, x)) for x in held])
  res = qlite.ptq.optimize(m, RULES, calib, v, algorithms=["smoothquant"])
  assert any(r.startswith("smoothquant: LayerNorm_0 -> 2 dense")
             for r in res.report), res.report
  new = np.concatenate([np.asarray(m.apply(res.variables, x)) for x in held])
  np.testing.assert_allclose(new, ref, rtol=1e-4, atol=1e-4)
  base = qlite.ptq.optimize(m, RULES, calib, v, algorithms=())
  s0 = qlite.metrics.sqnr_db(ref, _litert(_export(base, held[0]), held))
  s1 = qlite.metrics.sqnr_db(ref, _litert(_export(res, held[0]), held))
  assert s1 >= s0 + 1.5, (s0, s1)        # measured 29.0 -> 31.3 dB


def test_smoothquant_leaves_a_layernorm_read_by_a_residual_alone():
  class PostLn(nn.Module):
    @nn.compact
    def __call__(self, x):
      y = nn.LayerNorm()(x)
      return y + nn.Dense(32)(y)
  m = PostLn()
  v = m.init(jax.random.key(0), np.zeros((1, 32), np.float32))
  res = qlite.ptq.optimize(m, RULES, _batches(0, 2, (4, 32)), v,
                           algorithms=("smoothquant",))
  assert res.report == ["smoothquant: no LayerNorm whose output feeds only "
                        "dense layers"]
  assert res.variables is v


def test_adaround_keeps_a_rounding_only_when_it_fits_better_on_the_grid():
  m, v = _mlp()
  calib = _batches(5, 8, (32, 24))
  res = qlite.ptq.optimize(m, RULES, calib, v, algorithms=("adaround",),
                           adaround_iters=100)
  for name in ("Dense_0", "Dense_1"):
    line, = [r for r in res.report if r.startswith(f"adaround: {name}/")]
    near, got = (float(t) for t in re.findall(
        r"output MSE (\S+) \(nearest\) -> (\S+),", line)[0])
    w0 = v["params"][name]["kernel"]
    w = res.variables["params"][name]["kernel"]
    if line.endswith(", nearest kept"):
      assert got >= near
      np.testing.assert_array_equal(w, w0)     # the export rounds to nearest
      continue
    assert line.endswith(", kept") and got < near, line
    s, _ = fq.channel_scale(w0, "int8", 1)
    codes = w / s
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    # same per-channel scale as the original weight: the export's grid
    np.testing.assert_allclose(fq.channel_scale(w, "int8", 1)[0], s,
                               rtol=1e-6)
    # every code is the floor or the ceiling of the float position
    assert np.all(np.abs(codes - w0 / s) < 1.0 + 1e-3)
  blob = _export(res, calib[0][:1])
  assert qlite.inspect_tflite(blob).full_integer


def test_nnx_model_gets_a_new_module_and_the_given_one_is_unchanged():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(12, 16, rngs=rngs)
      self.b = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
      return self.b(nnx.relu(self.a(x)))
  net = Net(nnx.Rngs(0))
  bias0 = np.asarray(net.b.bias[...]).copy()
  calib = _batches(6, 4, (8, 12), 2.0, 3.0)
  res = qlite.ptq.optimize(net, RULES, calib, algorithms=("bias_correction",))
  assert res.variables is None and res.model is not net
  np.testing.assert_array_equal(np.asarray(net.b.bias[...]), bias0)
  assert not np.array_equal(np.asarray(res.model.b.bias[...]), bias0)
  blob = qlite.export_tflite(res.model, RULES, res.stats, calib[0][:1])
  assert qlite.inspect_tflite(blob).full_integer


def test_bad_arguments_are_named():
  m, v = _mlp()
  with pytest.raises(qlite.QliteError, match="unknown algorithm.*'adarond'"
                     ".*'equalization', 'smoothquant', 'adaround',"
                     " 'bias_correction'"):
    qlite.ptq.optimize(m, RULES, _batches(0, 1, (2, 24)), v,
                       algorithms=("adarond",))
  with pytest.raises(qlite.CalibrationError, match="`batches` is empty"):
    qlite.ptq.optimize(m, RULES, [], v, algorithms=("bias_correction",))
  with pytest.raises(qlite.QliteError, match="Linen module: pass variables"):
    qlite.ptq.optimize(m, RULES, _batches(0, 1, (2, 24)), None,
                       algorithms=("bias_correction",))


class _ConvBnRelu(nn.Module):
  depthwise: bool = False
  act: str = "relu"

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(16, (3, 3), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=True)(x)
    x = nn.relu(x) if self.act == "relu" else nn.relu6(x)
    groups = 16 if self.depthwise else 1
    return nn.Conv(16, (3, 3), feature_group_count=groups)(x)


def _conv_bn_relu(**kw):
  m = _ConvBnRelu(**kw)
  x0 = np.zeros((1, 8, 8, 3), np.float32)
  v = jax.tree.map(np.asarray, m.init(jax.random.key(3), x0))
  # channels of very different ranges after the BatchNorm
  scale = np.geomspace(0.05, 5.0, 16).astype(np.float32)
  v["params"]["BatchNorm_0"]["scale"] = scale
  v["params"]["BatchNorm_0"]["bias"] = (0.1 * scale).astype(np.float32)
  return m, v


GAIN_DW = 0.2


@pytest.mark.parametrize("depthwise", [False, True], ids=["conv", "depthwise"])
def test_equalization_is_float_equivalent_and_gains_on_held_out_data(
    depthwise):
  m, v = _conv_bn_relu(depthwise=depthwise)
  calib = _batches(7, 8, (4, 8, 8, 3))
  held = [x[i:i + 1] for x in _batches(8, 2, (8, 8, 8, 3)) for i in range(8)]
  ref = np.concatenate([np.asarray(m.apply(v, x)) for x in held])
  res = qlite.ptq.optimize(m, RULES, calib, v, algorithms=("equalization",))
  line, = res.report
  assert line.startswith("equalization: BatchNorm_0 -> Conv_1/conv_general_"
                         "dilated"), line
  new = np.concatenate([np.asarray(m.apply(res.variables, x)) for x in held])
  np.testing.assert_allclose(new, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  base = qlite.ptq.optimize(m, RULES, calib, v, algorithms=())
  s0 = qlite.metrics.sqnr_db(ref, _litert(_export(base, held[0]), held))
  s1 = qlite.metrics.sqnr_db(ref, _litert(_export(res, held[0]), held))
  print(f"equalization depthwise={depthwise}: {s0:.2f} -> {s1:.2f} dB")
  # measured: conv 35.7 -> 37.1 dB, depthwise 34.8 -> 35.1 dB (the output
  # boundary of the depthwise conv keeps its channel spread)
  assert s1 >= s0 + (GAIN_DW if depthwise else 1.0), (s0, s1)


def test_equalization_leaves_relu6_chains_alone():
  m, v = _conv_bn_relu(act="relu6")
  res = qlite.ptq.optimize(m, RULES, _batches(7, 2, (4, 8, 8, 3)), v,
                           algorithms=("equalization",))
  assert res.report == ["equalization: no conv / BatchNorm -> ReLU -> conv "
                        "chain"]
  assert res.variables is v


class _PostLnEncoder(nn.Module):
  """Residual + LayerNorm blocks with outlier LayerNorm scales (post-LN, as
  BERT): the LayerNorm inputs carry outlier channels."""
  eps: float

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      y = nn.gelu(nn.Dense(64, name=f"fc{i}")(x))
      x = nn.LayerNorm(self.eps, name=f"ln{i}")(x + nn.Dense(
          x.shape[-1], name=f"out{i}")(y))
    return x


def _layer_norm_sqnr(eps):
  m = _PostLnEncoder(eps)
  rng = np.random.default_rng(9)
  calib = [rng.normal(0, 1, (2, 8, 32)).astype(np.float32) for _ in range(8)]
  held = [rng.normal(0, 1, (1, 8, 32)).astype(np.float32) for _ in range(8)]
  v = jax.tree.map(np.asarray, m.init(jax.random.key(4), held[0]))
  for i in range(2):
    scale = np.ones(32, np.float32)
    scale[[5, 20]] = 8.0
    v["params"][f"ln{i}"]["scale"] = scale
  ref = np.concatenate([np.asarray(m.apply(v, x)) for x in held])
  stats = qlite.calibrate(m, RULES, calib, variables=v, progress=False)
  blob = qlite.export_tflite(m, RULES, stats, held[0], variables=v)
  return qlite.metrics.sqnr_db(ref, _litert(blob, held)), blob


def test_tiny_eps_layernorm_squares_with_one_dot_product():
  """LayerNorm eps < 1e-9 (BERT's 1e-12): mean(x * x) is one int8 dot of x
  with itself (BATCH_MATMUL, int32 sums), not a full-size x * x tensor;
  eps 1e-8 keeps the MEAN form (same float model: eps << var)."""
  old, blob_old = _layer_norm_sqnr(1e-8)
  new, blob_new = _layer_norm_sqnr(1e-12)
  ops_old = qlite.inspect_tflite(blob_old).op_histogram
  ops_new = qlite.inspect_tflite(blob_new).op_histogram
  assert ops_new.get("BATCH_MATMUL", 0) == ops_old.get("BATCH_MATMUL", 0) + 2
  assert ops_new["MEAN"] == ops_old["MEAN"] - 2
  print(f"post-LN encoder: MEAN form {old:.2f} dB, dot form {new:.2f} dB")
  assert new >= old + 0.5, (old, new)     # measured 26.7 -> 28.1 dB
