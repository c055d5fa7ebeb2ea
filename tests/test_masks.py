"""Attention masks (issue 15 item 1): a huge negative fill (finfo.min, -1e9,
-1e4, -inf) or an additive mask before a softmax. Calibration ignores the
fill, the export is full-integer, LiteRT matches the fake-quant model (the
export's self-check) and the float model (SQNR), and masked positions come
out exactly 0."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qlite

RULES = [qlite.QuantizationRule()]
CAUSAL = np.tril(np.ones((8, 8), bool))


def _batches(n=4, shape=(2, 8, 12), seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=shape).astype(np.float32) for _ in range(n)]


class WhereMask(nn.Module):
  fill: float

  @nn.compact
  def __call__(self, x):
    s = jnp.where(jnp.asarray(CAUSAL), nn.Dense(8)(x), self.fill)
    return jax.nn.softmax(s)


class AdditiveMask(nn.Module):
  @nn.compact
  def __call__(self, x):
    s = nn.Dense(8)(x) + (1.0 - jnp.tril(jnp.ones((8, 8)))) * -1e9
    return jax.nn.softmax(s)


class PaddingMask(nn.Module):         # the mask is a model input
  @nn.compact
  def __call__(self, x, keep):
    s = jnp.where(keep[:, None, :], nn.Dense(8)(x), -1e9)
    return nn.Dense(4)(jax.nn.softmax(s))


class LinenAttention(nn.Module):
  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(x[..., 0])
    return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(
        x, mask=mask)


class NnxAttention(nnx.Module):
  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=12,
                                       qkv_features=8, decode=False,
                                       rngs=rngs)

  def __call__(self, x):
    return self.attn(x, mask=nnx.make_causal_mask(x[..., 0]))


def _run(model, batches, variables=None):
  """Calibrates on batches[:3], exports at batch 1, returns the .tflite and
  (reference, LiteRT) outputs on the held-out last batch, row by row."""
  stats = qlite.calibrate(model, RULES, batches[:3], variables=variables,
                          progress=False)
  first = batches[0] if isinstance(batches[0], tuple) else (batches[0],)
  example = tuple(a[:1] for a in first)
  blob = qlite.export_tflite(model, RULES, stats, example,
                             variables=variables)
  runner = qlite.TFLiteRunner(blob)
  held = batches[-1] if isinstance(batches[-1], tuple) else (batches[-1],)
  ref, out = [], []
  for i in range(held[0].shape[0]):
    row = tuple(a[i:i + 1] for a in held)
    ref.append(np.asarray(model.apply(variables, *row) if variables is not None
                          else model(*row)))
    out.append(runner.run(*row)[0])
  return blob, np.concatenate(ref), np.concatenate(out)


@pytest.mark.parametrize("fill", [float(np.finfo(np.float32).min), -1e9,
                                  -1e4, -np.inf],
                         ids=["finfo_min", "1e9", "1e4", "inf"])
def test_where_mask_before_softmax(fill):
  bs = _batches()
  model = WhereMask(fill)
  v = model.init(jax.random.key(0), bs[0])
  blob, ref, out = _run(model, bs, v)
  info = qlite.inspect_tflite(blob)
  assert info.full_integer and "SELECT" in info.op_histogram
  assert qlite.metrics.sqnr_db(ref, out) > 30.0     # measured 35-36 dB
  masked = np.broadcast_to(~CAUSAL, out.shape)
  assert np.all(out[masked] == 0.0)                   # exact zeros
  assert np.all(out[~masked].sum() > 0)


def test_additive_mask_before_softmax():
  bs = _batches()
  model = AdditiveMask()
  v = model.init(jax.random.key(0), bs[0])
  blob, ref, out = _run(model, bs, v)
  assert qlite.inspect_tflite(blob).full_integer
  assert qlite.metrics.sqnr_db(ref, out) > 30.0
  assert np.all(out[np.broadcast_to(~CAUSAL, out.shape)] == 0.0)


def test_padding_mask_as_model_input():
  rng = np.random.default_rng(1)
  bs = []
  for x in _batches():
    keep = rng.random((2, 8)) > 0.3
    keep[:, 0] = True
    bs.append((x, keep))
  model = PaddingMask()
  v = model.init(jax.random.key(0), *bs[0])
  blob, ref, out = _run(model, bs, v)
  assert qlite.inspect_tflite(blob).full_integer
  assert qlite.metrics.sqnr_db(ref, out) > 25.0


def test_linen_attention_with_causal_mask():
  bs = _batches()
  model = LinenAttention()
  v = model.init(jax.random.key(0), bs[0])
  blob, ref, out = _run(model, bs, v)
  info = qlite.inspect_tflite(blob)
  assert info.full_integer and "SOFTMAX" in info.op_histogram
  assert qlite.metrics.sqnr_db(ref, out) > 28.0      # measured 32.8 dB


def test_nnx_attention_with_causal_mask():
  bs = _batches()
  model = NnxAttention(nnx.Rngs(0))
  blob, ref, out = _run(model, bs)
  info = qlite.inspect_tflite(blob)
  assert info.full_integer and "SOFTMAX" in info.op_histogram
  assert qlite.metrics.sqnr_db(ref, out) > 28.0


def test_calibration_does_not_record_the_fill():
  bs = _batches()
  model = WhereMask(float(np.finfo(np.float32).min))
  v = model.init(jax.random.key(0), bs[0])
  stats = qlite.calibrate(model, RULES, bs[:3], variables=v, progress=False)
  assert all(np.isfinite(float(r["min"])) and float(r["min"]) > -1e3
             for r in stats.records.values()), stats.records


def test_qat_with_a_masked_softmax_exports_full_integer():
  x = _batches(n=1)[0]
  model = WhereMask(-1e9)
  qat = qlite.quantize_model(model, qlite.QatProvider(RULES))
  qv = qat.init(jax.random.key(0), x)
  _, upd = qat.apply(qv, x, mutable=["quant_stats"])
  # the masked select's range is the logits' (no record of its own)
  assert all(float(r["min"]) > -1e3 for r in upd["quant_stats"].values())
  blob = qlite.export_tflite(model, RULES, upd["quant_stats"], x[:1],
                             variables={"params": qv["params"]})
  assert qlite.inspect_tflite(blob).full_integer


class MaskBias(nn.Module):
  """BERT-style: the padding mask becomes a bias, where(mask, 0, finfo.min),
  added to the logits (transformers' Flax BERT does exactly this)."""

  @nn.compact
  def __call__(self, x, attention_mask):
    logits = jnp.einsum("bqd,bkd->bqk", nn.Dense(8)(x), nn.Dense(8)(x))
    shape = (x.shape[0], 1, x.shape[1])
    bias = jax.lax.select(attention_mask[:, None, :] > 0,
                          jnp.full(shape, 0.0),
                          jnp.full(shape, jnp.finfo(jnp.float32).min))
    return jax.nn.softmax(logits + bias)


def test_mask_bias_from_an_input_mask():
  rng = np.random.default_rng(2)
  bs = []
  for x in _batches(n=4, shape=(2, 8, 12)):
    keep = (rng.random((2, 8)) > 0.3).astype(np.int32)
    keep[:, 0] = 1
    bs.append((x, keep))
  model = MaskBias()
  v = model.init(jax.random.key(0), *bs[0])
  blob, ref, out = _run(model, bs, v)
  assert qlite.inspect_tflite(blob).full_integer
  assert qlite.metrics.sqnr_db(ref, out) > 30.0
  masked = np.broadcast_to(bs[-1][1][:, None, :] == 0, out.shape)
  assert np.all(out[masked] == 0.0)


class CastMaskBias(nn.Module):
  """The float-mask form: (1 - mask.astype(f32)) * -1e9 added to the logits
  (a bool -> float cast of an input runs as SELECT; the product is the
  bias)."""

  @nn.compact
  def __call__(self, x, keep):
    logits = jnp.einsum("bqd,bkd->bqk", nn.Dense(8)(x), nn.Dense(8)(x))
    bias = (1.0 - keep[:, None, :].astype(jnp.float32)) * -1e9
    return jax.nn.softmax(logits + bias)


def test_float_cast_mask_bias_from_an_input_mask():
  rng = np.random.default_rng(3)
  bs = []
  for x in _batches(n=4, shape=(2, 8, 12)):
    keep = rng.random((2, 8)) > 0.3
    keep[:, 0] = True
    bs.append((x, keep))
  model = CastMaskBias()
  v = model.init(jax.random.key(0), *bs[0])
  blob, ref, out = _run(model, bs, v)
  info = qlite.inspect_tflite(blob)
  assert info.full_integer and "CAST" not in info.op_histogram
  assert qlite.metrics.sqnr_db(ref, out) > 28.0       # measured 31.3 dB
  masked = np.broadcast_to(~bs[-1][1][:, None, :], out.shape)
  assert np.all(out[masked] == 0.0)
