"""Issue 16 parts 3 and 4: rule options a backend ignores or cannot honour,
and models in training mode, are named errors (never a silently wrong
export). Table-driven: each case asserts the error class and a phrase of its
message; the cases that are honoured assert the numbers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qlite
from qlite import xla
from qlite.litert.rule_check import LiteRTQTypeError
from qlite.metrics import sqnr_db

X = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
Rule = qlite.QuantizationRule


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(nn.relu(nn.Dense(8)(x)))


@pytest.fixture(scope="module")
def mlp():
  m = MLP()
  return m, m.init(jax.random.key(0), X)


# --- part 3a: backend-independent, refused when the rule is built ---------

RULE_CASES = [
    # (id, kwargs, error class, message regex)
    ("fixed_range_empty", dict(act_calibration_method="fixed",
                               act_fixed_range=(0, 0)),
     qlite.RuleError, r"act_fixed_range=\(0, 0\) is empty or degenerate"),
    ("fixed_range_reversed", dict(act_calibration_method="fixed",
                                  act_fixed_range=(1, -1)),
     qlite.RuleError, r"act_fixed_range=\(1, -1\) is reversed \(lo > hi\)"),
    ("fixed_range_too_narrow", dict(act_calibration_method="fixed",
                                    act_fixed_range=(0.0, 1e-9)),
     qlite.RuleError, r"empty or degenerate"),
    ("fixed_range_nan", dict(act_calibration_method="fixed",
                             act_fixed_range=(float("nan"), 1.0)),
     qlite.RuleError, r"must be finite"),
    ("fixed_range_not_two_numbers", dict(act_calibration_method="fixed",
                                         act_fixed_range=(0, 1, 2)),
     qlite.RuleError, r"act_fixed_range must be two numbers"),
    ("fixed_range_a_string", dict(act_calibration_method="fixed",
                                  act_fixed_range="0,1"),
     qlite.RuleError, r"act_fixed_range must be two numbers"),
    ("fixed_range_without_fixed", dict(act_fixed_range=(-1, 1)),
     qlite.RuleError,
     r"only read by act_calibration_method='fixed'.*act_calibration_method "
     r"is None"),
    ("fixed_range_with_minmax", dict(act_calibration_method="minmax",
                                     act_fixed_range=(-1, 1)),
     qlite.RuleError, r"act_calibration_method='minmax' ignores it"),
    ("act_option_with_float_acts", dict(act_qtype=None,
                                        act_calibration_method="mse"),
     qlite.RuleError, r"act_calibration_method='mse' has no effect with "
                      r"act_qtype=None"),
    ("aggregation_with_float_acts", dict(act_qtype=None,
                                         act_aggregation="ema"),
     qlite.RuleError, r"act_aggregation='ema' has no effect"),
    ("weight_option_with_float_weights", dict(weight_qtype=None,
                                              weight_tile_size=32),
     qlite.RuleError, r"weight_tile_size=32 has no effect with "
                      r"weight_qtype=None"),
    ("minmax_with_float_weights", dict(weight_qtype=None,
                                       weight_calibration_method="minmax"),
     qlite.RuleError, r"weight_calibration_method='minmax' has no effect"),
    ("aggregation_ignored_by_method", dict(act_calibration_method="rms",
                                           act_aggregation="ema"),
     qlite.RuleError, r"act_aggregation='ema' is ignored by the 'rms'"),
    ("aggregation_ignored_by_mse", dict(act_calibration_method="mse",
                                        act_aggregation="percentile"),
     qlite.RuleError, r"ignored by the 'mse'"),
    ("op_names_not_names", dict(op_names=5),
     qlite.RuleError, r"op_names must be a jax primitive name"),
    ("op_names_not_strings", dict(op_names=("dot_general", 3)),
     qlite.RuleError, r"got 3 in"),
    ("op_names_empty", dict(op_names=()),
     qlite.RuleError, r"op_names=\(\) matches no op"),
    ("static_scale_not_bool", dict(act_static_scale="yes"),
     qlite.RuleError, r"act_static_scale must be True"),
    ("tile_size_zero", dict(weight_tile_size=0),
     qlite.RuleError, r"weight_tile_size must be a positive int"),
    ("tile_size_bool", dict(weight_tile_size=True),
     qlite.RuleError, r"weight_tile_size must be a positive int"),
]


@pytest.mark.parametrize("kwargs,cls,phrase",
                         [c[1:] for c in RULE_CASES],
                         ids=[c[0] for c in RULE_CASES])
def test_rule_refused_at_construction(kwargs, cls, phrase):
  with pytest.raises(cls, match=phrase) as info:
    Rule(module_path="Dense_.*", **kwargs)
  assert "module_path='Dense_.*'" in str(info.value)


def test_valid_options_are_kept_and_normalized():
  r = Rule(act_calibration_method="fixed", act_fixed_range=[-1, 6])
  assert r.act_fixed_range == (-1.0, 6.0)
  hash(r)                               # a list would make it unhashable
  assert Rule(op_names=["dot_general"]).op_names == ("dot_general",)
  assert Rule(op_names="add").op_names == ("add",)
  # aggregations the method reads, and mse's minmax fallback for fp8
  Rule(act_calibration_method="absmax", act_aggregation="ema")
  Rule(act_calibration_method="percentile", act_aggregation="percentile")
  Rule(act_calibration_method="mse", act_aggregation="ema",
       act_qtype="fp8_e4m3")
  Rule(weight_qtype=None, act_qtype=None)         # keep float
  Rule(weight_tile_size=np.int64(32), act_static_scale=np.bool_(False))


def test_calibrate_method_that_ignores_the_aggregation(mlp):
  m, v = mlp
  rules = [Rule(act_aggregation="ema")]
  with pytest.raises(qlite.RuleError,
                     match=r"rules\[0\].*calibrate\(method='mse'\).*"
                           r"act_aggregation='ema' is ignored"):
    qlite.calibrate(m, rules, [X], variables=v, method="mse",
                    progress=False)


def test_fixed_range_is_honoured(mlp):
  """A valid fixed range is the boundary's range in the .tflite."""
  m, v = mlp
  rules = [Rule(module_path="Dense_0", act_calibration_method="fixed",
                act_fixed_range=(-8.0, 8.0)), Rule()]
  stats = qlite.calibrate(m, rules, [X], variables=v, progress=False)
  blob = qlite.export_tflite(m, rules, stats, X[:1], variables=v)
  info = qlite.inspect_tflite(blob)
  scales = [float(t.scale[0]) for t in info.tensors
            if t.scale is not None and t.scale.size == 1]
  assert any(abs(s - 16.0 / 255.0) < 1e-7 for s in scales)


# --- part 3b: options the LiteRT export ignores or cannot honour ----------

LITERT_CASES = [
    ("minmax_weights", dict(weight_calibration_method="minmax"),
     qlite.RuleError,
     r"weight_calibration_method='minmax'.*LiteRT int8 weights must be "
     r"symmetric.*use weight_calibration_method='absmax'"),
    ("dynamic_range", dict(act_static_scale=False),
     qlite.RuleError,
     r"act_static_scale=False \(dynamic-range activations\) is not supported"
     r".*use act_static_scale=True"),
    ("weight_tiles", dict(weight_tile_size=2),
     qlite.RuleError,
     r"weight_tile_size=2 \(sub-channel weight tiles\).*drop "
     r"weight_tile_size"),
    ("int16_weights", dict(weight_qtype="int16"),
     LiteRTQTypeError, r"weight_qtype='int16' cannot be exported to LiteRT.*"
                       r"use weight_qtype='int8'"),
    # act_qtype="int16" (16x8) is honoured: tests/test_int16.py
    ("fp8_acts", dict(act_qtype="fp8_e4m3"),
     LiteRTQTypeError, r"act_qtype='fp8_e4m3' cannot be exported.*'int8'"),
    ("uint8_weights", dict(weight_qtype="uint8"),
     LiteRTQTypeError, r"weight_qtype='uint8' cannot be exported"),
    ("nf4_weights", dict(weight_qtype="nf4"),
     LiteRTQTypeError, r"weight_qtype='nf4' cannot be exported"),
]


@pytest.mark.parametrize("kwargs,cls,phrase",
                         [c[1:] for c in LITERT_CASES],
                         ids=[c[0] for c in LITERT_CASES])
def test_litert_refuses_option(mlp, kwargs, cls, phrase):
  m, v = mlp
  rules = [Rule(), Rule(module_path="Dense_1", **kwargs)]
  pattern = r"rules\[1\] \(module_path='Dense_1'\): " + phrase
  # up front: before tracing, calibration stats or conversion
  with pytest.raises(cls, match=pattern):
    qlite.export_tflite(m, rules, None, X[:1], variables=v)
  with pytest.raises(cls, match=pattern):
    qlite.annotate.ConversionProvider(rules)
  with pytest.raises(qlite.RuleError):
    qlite.annotate.ConversionProvider(rules)
  if cls is LiteRTQTypeError:          # the qtype is the cause: both kinds
    with pytest.raises(qlite.QTypeError):
      qlite.annotate.ConversionProvider(rules)


def test_int4_weights_export_and_match_fake_quant(mlp):
  """int4 weights are honoured: the .tflite (self-checked) equals the
  fake-quant model."""
  m, v = mlp
  rules = [Rule(weight_qtype="int4")]
  stats = qlite.calibrate(m, rules, [X], variables=v, progress=False)
  blob = qlite.export_tflite(m, rules, stats, X[:1], variables=v,
                             verify="error")
  assert qlite.inspect_tflite(blob).full_integer
  runner = qlite.TFLiteRunner(blob)
  y = np.concatenate([np.asarray(runner.run(X[i:i + 1])[0])
                      for i in range(len(X))])
  fq = qlite.quantize_model(m, qlite.annotate.ConversionProvider(rules, stats),
                            variables=v)
  yf = np.asarray(fq.apply(v, X))
  assert sqnr_db(yf, y) >= 30.0


def test_xla_still_takes_what_litert_refuses(mlp):
  """Tiles, minmax weights, dynamic range and int16 weights are XLA
  options: the XLA provider and qlite.calibrate (whose stats serve XLA SRQ)
  accept them."""
  m, v = mlp
  ref = np.asarray(m.apply(v, X))
  for kw in (dict(weight_calibration_method="minmax"),
             dict(act_static_scale=False), dict(weight_tile_size=2),
             dict(weight_qtype="int16", act_qtype=None)):
    rules = [Rule(**kw)]
    stats = qlite.calibrate(m, rules, [X], variables=v, progress=False)
    y = xla.quantize_model(m, xla.PtqProvider(rules, stats),
                           variables=v).apply(v, X)
    assert sqnr_db(ref, np.asarray(y)) >= 20.0, kw


# --- part 4: models in training mode ---------------------------------------


class NBlock(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(6, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.bn(self.lin(x)))


class NBatchNorm(nnx.Module):
  def __init__(self, rngs):
    self.block = NBlock(rngs)
    self.out = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    return self.out(self.block(x))


class NDropout(nnx.Module):
  def __init__(self, rngs, keep_rngs=True):
    self.lin = nnx.Linear(6, 8, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs if keep_rngs else None)
    self.out = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    return self.out(self.drop(self.lin(x)))


class NCallFlags(nnx.Module):
  """Attributes left in training mode, inference chosen by the call."""

  def __init__(self, rngs):
    self.lin = nnx.Linear(6, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)
    self.out = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x, train=False):
    y = self.bn(self.lin(x), use_running_average=not train)
    return self.out(self.drop(y, deterministic=not train))


class NTrainWrapper(nnx.Module):
  def __init__(self, inner):
    self.inner = inner

  def __call__(self, x):
    return self.inner(x, train=True)


class MyNorm(nnx.BatchNorm):      # a subclass: found by its batch stats
  pass


class NSubclassNorm(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(6, 8, rngs=rngs)
    self.norm = MyNorm(8, rngs=rngs)

  def __call__(self, x):
    return self.norm(self.lin(x))


class NAttention(nnx.Module):
  def __init__(self, rngs):
    self.att = nnx.MultiHeadAttention(2, 6, 6, dropout_rate=0.1,
                                      deterministic=False, decode=False,
                                      rngs=rngs)

  def __call__(self, x):
    return self.att(x[:, None, :])[:, 0]


class LBatchNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.BatchNorm(use_running_average=False)(nn.Dense(8)(x))
    return nn.Dense(4)(nn.relu(x))


class LDropout(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dropout(0.5, deterministic=False)(nn.Dense(8)(x))
    return nn.Dense(4)(x)


class LBlock(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    x = nn.BatchNorm()(nn.Dense(8)(x), use_running_average=not train)
    return nn.Dropout(0.2)(x, deterministic=not train)


class LTrainDefault(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    return nn.Dense(4)(LBlock()(x, train))


class LOwnNoise(nn.Module):     # not a flax Dropout: flax's error + a hint
  @nn.compact
  def __call__(self, x):
    keep = jax.random.bernoulli(self.make_rng("dropout"), 0.9, x.shape)
    return nn.Dense(4)(jnp.where(keep, x, 0.0))


def _nnx(cls, *a):
  return lambda: (cls(nnx.Rngs(0), *a), None)


def _linen(cls):
  def make():
    m = cls()
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    v = m.init(rngs, X)
    return m, {k: val for k, val in v.items()}
  return make


def _linen_as_function(train):
  def make():
    m = LTrainDefault()
    v = m.init(jax.random.key(0), X, train=False)
    return (lambda variables, x: m.apply(variables, x, train=train)), v
  return make


MODE_CASES = [
    ("nnx_batchnorm", _nnx(NBatchNorm),
     r"nnx:NBatchNorm: `block/bn` \(nnx.BatchNorm\) is in training mode "
     r"\(use_running_average=False\): call model.eval\(\)"),
    ("nnx_dropout", _nnx(NDropout),
     r"`drop` \(nnx.Dropout\) is in training mode \(deterministic=False\): "
     r"call model.eval\(\)"),
    ("nnx_dropout_without_rngs", _nnx(NDropout, False),
     r"`drop` \(nnx.Dropout\) is in training mode"),
    ("nnx_call_passes_train", lambda: (NTrainWrapper(NCallFlags(
        nnx.Rngs(0))), None),
     r"`inner/bn` \(nnx.BatchNorm\) is called with use_running_average=False"
     r" \(training mode\): pass use_running_average=True where the model "
     r"calls it"),
    ("nnx_batchnorm_subclass", _nnx(NSubclassNorm),
     r"`norm` \(MyNorm\) updated its batch statistics \(`norm/mean`\).*"
     r"call model.eval\(\)"),
    ("nnx_attention_dropout", _nnx(NAttention),
     r"`att` \(nnx.MultiHeadAttention\) is in training mode "
     r"\(deterministic=False\)"),
    ("linen_batchnorm", _linen(LBatchNorm),
     r"linen:LBatchNorm: `BatchNorm_0` \(nn.BatchNorm\) is in training mode "
     r"\(use_running_average=False\): construct it with "
     r"use_running_average=True"),
    ("linen_dropout", _linen(LDropout),
     r"`Dropout_0` \(nn.Dropout\) is in training mode \(deterministic=False\)"
     r": construct it with deterministic=True"),
    ("linen_train_default", _linen(LTrainDefault),
     r"`LBlock_0/BatchNorm_0` \(nn.BatchNorm\) is called with "
     r"use_running_average=False.*model.apply\(variables, x, train=False\)"),
    ("linen_function_train", _linen_as_function(True),
     r"function:<lambda>: `LBlock_0/BatchNorm_0` \(nn.BatchNorm\) is called "
     r"with use_running_average=False \(training mode\): pass "
     r"use_running_average=True where the model calls it"),
    ("linen_own_dropout_rng", _linen(LOwnNoise),
     r"linen:LOwnNoise: InvalidRngError: .*needs PRNG for \"dropout\".*; "
     r"a Dropout \(or attention dropout\) in training mode needs an rng: use "
     r"deterministic=True"),
]

ENTRY_POINTS = ["calibrate", "export_tflite", "quantize_model"]


def _enter(entry, model, variables):
  rules = [Rule()]
  if entry == "calibrate":
    qlite.calibrate(model, rules, [X], variables=variables, progress=False)
  elif entry == "export_tflite":
    qlite.export_tflite(model, rules, None, X, variables=variables)
  else:
    qlite.quantize_model(model, qlite.annotate.CalibrationProvider(rules), X,
                         variables=variables)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("make,phrase", [c[1:] for c in MODE_CASES],
                         ids=[c[0] for c in MODE_CASES])
def test_training_mode_is_refused(make, phrase, entry):
  model, variables = make()
  with pytest.raises(qlite.QliteError, match=phrase):
    _enter(entry, model, variables)


def test_xla_backend_refuses_training_mode_too():
  with pytest.raises(qlite.QliteError, match=r"`block/bn`.*model.eval"):
    xla.quantize_model(NBatchNorm(nnx.Rngs(0)),
                       xla.PtqProvider([Rule(act_qtype=None)]), X)


def _export_sqnr(model, variables, reference):
  rules = [Rule()]
  stats = qlite.calibrate(model, rules, [X], variables=variables,
                          progress=False)
  blob = qlite.export_tflite(model, rules, stats, X[:1], variables=variables)
  runner = qlite.TFLiteRunner(blob)
  y = np.concatenate([np.asarray(runner.run(X[i:i + 1])[0])
                      for i in range(len(X))])
  return sqnr_db(reference, y)


def test_eval_mode_models_export():
  """The same models in inference mode export (and match their float
  output): after model.eval(), with call-time flags, as a function."""
  m = NBatchNorm(nnx.Rngs(0))
  with pytest.raises(qlite.QliteError, match="training mode"):
    qlite.calibrate(m, [Rule()], [X], progress=False)
  m.eval()
  assert _export_sqnr(m, None, np.asarray(m(X))) >= 30.0
  m = NDropout(nnx.Rngs(0))
  m.eval()
  assert _export_sqnr(m, None, np.asarray(m(X))) >= 30.0
  m = NCallFlags(nnx.Rngs(0))   # attributes say train, the call says eval
  assert _export_sqnr(m, None, np.asarray(m(X))) >= 30.0
  make = _linen_as_function(False)
  fn, v = make()
  assert _export_sqnr(fn, v, np.asarray(fn(v, X))) >= 30.0

