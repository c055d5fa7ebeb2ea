"""Activations reached from user code (issue 15 item 9): each maps to an
int8 form (a native op or an exact rewrite), so the model exports
full-integer and LiteRT stays close to float."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlite

RULES = [qlite.QuantizationRule()]

ACTIVATIONS = {
    "silu": jax.nn.silu, "swish": nn.swish, "hard_swish": jax.nn.hard_swish,
    "hard_sigmoid": jax.nn.hard_sigmoid, "log_softmax": jax.nn.log_softmax,
    "tanh": jnp.tanh, "gelu_erf": lambda v: jax.nn.gelu(v, approximate=False),
    "elu": jax.nn.elu, "elu_alpha": lambda v: jax.nn.elu(v, alpha=0.5),
    "celu": jax.nn.celu, "selu": jax.nn.selu, "softplus": jax.nn.softplus,
    "log_sigmoid": jax.nn.log_sigmoid, "mish": jax.nn.mish,
}


class Block(nn.Module):
  activation: str

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(ACTIVATIONS[self.activation](nn.Dense(16)(x)))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_exports_full_integer(name):
  rng = np.random.default_rng(0)
  bs = [rng.normal(size=(2, 8, 12)).astype(np.float32) for _ in range(4)]
  model = Block(name)
  v = model.init(jax.random.key(0), bs[0])
  # jax's own (jitted) function is called once before qlite traces
  model.apply(v, bs[0])
  # evaluated on the calibration data: this measures the int8 form, not
  # how well 4 batches cover unseen inputs
  stats = qlite.calibrate(model, RULES, bs, variables=v, progress=False)
  blob = qlite.export_tflite(model, RULES, stats, bs[0][:1], variables=v)
  assert qlite.inspect_tflite(blob).full_integer
  runner = qlite.TFLiteRunner(blob)
  ref = np.concatenate([np.asarray(model.apply(v, b[i:i + 1]))
                        for b in bs for i in range(2)])
  out = np.concatenate([runner.run(b[i:i + 1])[0] for b in bs
                        for i in range(2)])
  # measured 32.8 (silu) .. 40.7 (log_softmax) dB
  assert qlite.metrics.sqnr_db(ref, out) > 30.0


def _rotate_half(v):
  a, b = jnp.split(v, 2, -1)
  return jnp.concatenate([-b, a], -1)


@pytest.mark.parametrize("fn", [lambda v: -v, _rotate_half],
                         ids=["neg", "rotate_half"])
def test_negation_runs_as_int8_mul(fn):
  rng = np.random.default_rng(0)
  bs = [rng.normal(size=(2, 8, 12)).astype(np.float32) for _ in range(4)]

  class Neg(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4)(fn(nn.Dense(16)(x)))

  model = Neg()
  v = model.init(jax.random.key(0), bs[0])
  stats = qlite.calibrate(model, RULES, bs, variables=v, progress=False)
  blob = qlite.export_tflite(model, RULES, stats, bs[0][:1], variables=v)
  info = qlite.inspect_tflite(blob)
  assert info.full_integer and "NEG" not in info.op_histogram
  runner = qlite.TFLiteRunner(blob)
  ref = np.concatenate([np.asarray(model.apply(v, b[i:i + 1]))
                        for b in bs for i in range(2)])
  out = np.concatenate([runner.run(b[i:i + 1])[0] for b in bs
                        for i in range(2)])
  assert qlite.metrics.sqnr_db(ref, out) > 30.0     # measured 34.7 / 37.6


@pytest.mark.parametrize("fn", [jax.nn.elu, jax.nn.selu,
                                lambda y: jnp.maximum(y, 0) + 0.5 * jnp.minimum(y, 0)],
                         ids=["elu", "selu", "max_plus_min"])
def test_max_and_min_of_one_shared_tensor_after_a_transpose(fn):
  """max(y, 0) and min(y, 0) of the same tensor y, y a TRANSPOSE of a
  compute op: the converter requantized y once for MINIMUM and gave the
  relu that copy too (self-check: ~99 LSB); now min shares y's range."""
  rng = np.random.default_rng(0)
  bs = [rng.normal(size=(2, 8, 12)).astype(np.float32) for _ in range(4)]

  class Swap(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4)(fn(jnp.swapaxes(nn.Dense(8)(x), 1, 2)))

  model = Swap()
  v = model.init(jax.random.key(0), bs[0])
  stats = qlite.calibrate(model, RULES, bs, variables=v, progress=False)
  blob = qlite.export_tflite(model, RULES, stats, bs[0][:1], variables=v)
  assert qlite.inspect_tflite(blob).full_integer
  runner = qlite.TFLiteRunner(blob)
  ref = np.concatenate([np.asarray(model.apply(v, b[i:i + 1]))
                        for b in bs for i in range(2)])
  out = np.concatenate([runner.run(b[i:i + 1])[0] for b in bs
                        for i in range(2)])
  assert qlite.metrics.sqnr_db(ref, out) > 32.0      # measured 35.3-36.4 dB
