"""Rotary-embedding idioms (issue 15 item 7): halves of a 4-D (batch, seq,
heads, head_dim) tensor computed separately, concatenated and reshaped
(jnp.split is a pass-through SPLIT: its outputs keep the input's scale, so
the same-scale group is consistent at any rank); rotary tables from static
positions fold to constants."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qlite

RULES = [qlite.QuantizationRule()]


class HalvesLinen(nn.Module):
  @nn.compact
  def __call__(self, x):
    q = nn.Dense(16, use_bias=False)(x).reshape(1, 8, 4, 4)
    a, b = jnp.split(q, 2, -1)
    return nn.Dense(4)(jnp.concatenate([a * b, b + a], -1).reshape(1, 8, 16))


def _rope(q):
  """Rotary embedding over (batch, seq, heads, dim) with static positions."""
  seq, dim = q.shape[1], q.shape[-1]
  inv = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2) / dim))
  ang = jnp.arange(seq)[:, None] * inv[None, :]          # (seq, dim/2)
  cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
  q1, q2 = jnp.split(q, 2, -1)
  return jnp.concatenate([q1 * cos - q2 * sin, q1 * sin + q2 * cos], -1)


class RopeNnx(nnx.Module):
  def __init__(self, rngs):
    self.q = nnx.Linear(12, 16, use_bias=False, rngs=rngs)
    self.out = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    q = _rope(self.q(x).reshape(1, 8, 4, 4))
    return self.out(q.reshape(1, 8, 16))


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_four_d_halves_concatenated_then_reshaped(framework):
  rng = np.random.default_rng(0)
  bs = [rng.normal(size=(1, 8, 12)).astype(np.float32) for _ in range(4)]
  if framework == "linen":
    model = HalvesLinen()
    v = model.init(jax.random.key(0), bs[0])
    apply = lambda x: model.apply(v, x)
  else:
    model, v = RopeNnx(nnx.Rngs(0)), None
    apply = model
  stats = qlite.calibrate(model, RULES, bs, variables=v, progress=False)
  blob = qlite.export_tflite(model, RULES, stats, bs[0], variables=v)
  info = qlite.inspect_tflite(blob)
  assert info.full_integer
  assert "COS" not in info.op_histogram and "SIN" not in info.op_histogram
  runner = qlite.TFLiteRunner(blob)
  ref = np.stack([np.asarray(apply(b)) for b in bs])
  out = np.stack([runner.run(b)[0] for b in bs])
  assert qlite.metrics.sqnr_db(ref, out) > 26.0      # measured 29.7 (linen)
