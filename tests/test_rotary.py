"""Rotary-embedding idioms (issue 15 item 7): halves of a 4-D (batch, seq,
heads, head_dim) tensor computed separately, concatenated and reshaped
(jnp.split is a pass-through SPLIT: its outputs keep the input's scale, so
the same-scale group is consistent at any rank); rotary tables from static
positions fold to constants; positions computed from the input (item 8)
make sin / cos a table lookup (qlite.ops.int_lookup)."""

import warnings

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


# --------------------------------------------------------------------------
# Positions computed from the input (issue 15 item 8): sin / cos of integer
# positions become a GATHER from a table (qlite.ops.int_lookup).

def _rope_positions(q, pos):
  """Rotary embedding of q (batch, seq, heads, dim) at int positions
  (batch, seq)."""
  dim = q.shape[-1]
  inv = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2) / dim))
  ang = pos[..., None] * inv                               # (b, seq, dim/2)
  cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
  q1, q2 = jnp.split(q, 2, -1)
  return jnp.concatenate([q1 * cos - q2 * sin, q1 * sin + q2 * cos], -1)


class CumsumRopeLinen(nn.Module):
  """Positions = cumsum of a padding mask (int32 input) - 1, clipped at 0:
  the graph bounds them (cumsum of a 0/1 compare over 8 steps: [0, 8])."""

  @nn.compact
  def __call__(self, x, mask):
    pos = jnp.maximum(jnp.cumsum(mask > 0, axis=-1) - 1, 0)
    q = nn.Dense(16, use_bias=False)(x).reshape(1, 8, 4, 4)
    return nn.Dense(4)(_rope_positions(q, pos).reshape(1, 8, 16))


class OffsetRopeNnx(nnx.Module):
  """Positions = arange(seq) + a cache index (int32 input [1]): unbounded
  in the graph, so calibration sizes the table. Returns the rotary cos /
  sin table rows themselves (the lookup's own accuracy) beside the rotated
  projection."""

  def __init__(self, rngs):
    self.q = nnx.Linear(12, 16, use_bias=False, rngs=rngs)
    self.out = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x, index):
    pos = jnp.arange(8)[None, :] + index[:, None]
    q = _rope_positions(self.q(x).reshape(1, 8, 4, 4), pos)
    ang = pos[..., None] * (1.0 / (100.0 ** (jnp.arange(4) / 4)))
    return self.out(q.reshape(1, 8, 16)), jnp.concatenate(
        [jnp.cos(ang), jnp.sin(ang)], -1)


def _convert(model, v, batches, n_cal=4):
  stats = qlite.calibrate(model, RULES, batches[:n_cal], variables=v,
                          progress=False)
  blob = qlite.export_tflite(model, RULES, stats, batches[0], variables=v)
  return stats, blob


def _check(model, v, stats, blob, held, apply, floor_db):
  info = qlite.inspect_tflite(blob)
  assert info.full_integer, info.op_histogram
  assert not {"SIN", "COS"} & set(info.op_histogram)   # (full_integer:
  # no float CAST either; int CASTs stay)
  assert any(op.startswith("GATHER") for op in info.op_histogram)
  runner = qlite.TFLiteRunner(blob)
  fake = qlite.quantize_model(
      model, qlite.annotate.ConversionProvider(RULES, stats), variables=v)
  first = lambda y: y[0] if isinstance(y, tuple) else y
  ref = np.stack([np.asarray(first(apply(*b))) for b in held])
  out = np.stack([runner.run(*b)[0] for b in held])
  fq = np.stack([np.asarray(first(fake.apply(v, *b) if v is not None
                                  else fake(*b))) for b in held])
  lsb = float(info.tensor(info.ops[-1].inputs[0]).scale[0])
  assert np.max(np.abs(out - fq)) <= 1.0 * lsb + 1e-7   # LiteRT = fake-quant
  sqnr = qlite.metrics.sqnr_db(ref, out)
  assert sqnr > floor_db, sqnr
  return sqnr


def test_rope_of_cumsum_positions_is_a_table_lookup():
  rng = np.random.default_rng(0)
  batches = [(rng.uniform(-1, 1, size=(1, 8, 12)).astype(np.float32),
              (np.arange(8) < rng.integers(3, 9)).astype(np.int32)[None])
             for _ in range(8)]
  model = CumsumRopeLinen()
  v = model.init(jax.random.key(0), *batches[0])
  with warnings.catch_warnings():
    warnings.simplefilter("error")    # bounded by the graph: no warning
    stats, blob = _convert(model, v, batches)
  # no probe: the graph bounds the positions
  assert not [k for k in stats.keys() if "int_range" in k]
  _check(model, v, stats, blob, batches[4:],
         lambda *b: model.apply(v, *b), floor_db=20.5)
  # measured 21.9 dB: LiteRT = fake-quant; the rotary products' int8
  # rounding (q2 * sin with sin near 0 at small positions) sets it


def test_rope_of_offset_positions_sizes_its_table_from_calibration():
  rng = np.random.default_rng(1)
  batches = [(rng.uniform(-1, 1, size=(1, 8, 12)).astype(np.float32),
              rng.integers(0, 20, (1,)).astype(np.int32)) for _ in range(16)]
  model = OffsetRopeNnx(nnx.Rngs(0))
  cal = batches[:12]      # (the products' ranges need the positions' spread)
  stats = qlite.calibrate(model, RULES, cal, progress=False)
  # one probe per int -> float cast (pos[..., None] in each embedding)
  probes = [k for k in stats.keys() if "int_range" in k]
  assert len(probes) == 2
  for k in probes:
    assert int(stats[k]["min"]) == min(int(b[1][0]) for b in cal)
    assert int(stats[k]["max"]) == max(int(b[1][0]) for b in cal) + 7
  # the observed [lo, hi] widened to powers of two: [0, 31]
  with pytest.warns(UserWarning, match=r"lookup table over \[0, 31\]"):
    blob = qlite.export_tflite(model, RULES, stats, batches[0])
  held = [b for b in batches[12:] if int(b[1][0]) + 7 <= 31]
  assert len(held) >= 2
  _check(model, None, stats, blob, held, model, floor_db=32.0)
  # measured 34.2 dB; the table rows themselves:
  runner = qlite.TFLiteRunner(blob)
  ref = np.stack([np.asarray(model(*b)[1]) for b in held])
  out = np.stack([runner.run(*b)[1] for b in held])
  assert qlite.metrics.sqnr_db(ref, out) > 45.0      # measured 49.7 dB


class _Timestep(nn.Module):
  """A diffusion-style int timestep embedding (unbounded int32 input)."""

  @nn.compact
  def __call__(self, x, t):
    freqs = jnp.exp(-jnp.log(100.0) * jnp.arange(8) / 8)
    args = t[:, None] * (0.01 * freqs)[None, :]
    temb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], -1)
    return nn.Dense(4)(nn.Dense(8)(x) + nn.Dense(8)(temb))


def test_timestep_table_too_large_is_a_named_error():
  rng = np.random.default_rng(2)
  model = _Timestep()
  batches = [(rng.normal(size=(2, 4)).astype(np.float32),
              rng.integers(0, 300_000, (2,)).astype(np.int32))
             for _ in range(3)]
  v = model.init(jax.random.key(0), *batches[0])
  stats = qlite.calibrate(model, RULES, batches, variables=v, progress=False)
  with pytest.raises(qlite.UnsupportedOpError,
                     match=r"(?s)lookup table.*jnp\.clip"):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      qlite.export_tflite(model, RULES, stats, batches[0], variables=v)


class _Ints(nn.Module):
  """Integers computed in the ways int_range follows; one float cast each."""

  @nn.compact
  def __call__(self, x, ids):
    f = lambda i: i.astype(jnp.float32)[..., None] * nn.Dense(1)(x)[:, None]
    outs = [
        f(jnp.cumsum(ids > 0, axis=-1)),                  # [0, 8]
        f(jnp.arange(8)[None, :] + jnp.clip(ids, 2, 5)),  # [2, 12]
        f(jax.ops.segment_sum(jnp.ones_like(ids[0]), ids[0] % 4, 4)[None]),
        f(ids),                                           # int32 input: None
    ]
    return sum(o.sum() for o in outs)


def test_int_range_follows_the_graph():
  from qlite.ops import int_lookup
  from qlite.trace import flax_hooks
  from qlite.trace import graph as graph_lib
  x = np.zeros((1, 4), np.float32)
  ids = np.zeros((1, 8), np.int32)
  model = _Ints()
  v = model.init(jax.random.key(0), x, ids)
  g = graph_lib.trace(flax_hooks.model_function(model, v), [x, ids])
  regions = int_lookup.find_regions(g, lambda n: "compute")
  got = sorted(((r.lo, r.hi) if r.bounded else None) for r in regions
               if r.bounded) + [None] * sum(not r.bounded for r in regions)
  # segment_sum of 8 ones: a masked sum over 8 rows
  assert got == [(0, 8), (0, 8), (2, 12), None], got
