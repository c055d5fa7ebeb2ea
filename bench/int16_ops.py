"""Probe which ops LiteRT runs in 16x8 (int16 activations, int8 weights)
through qlite's export: one tiny model per op, exported with
``act_qtype="int16"`` (self-check on), run on held-out rows.

Prints a markdown table (op, result, SQNR vs float at int8 and 16x8, the
LiteRT ops) used by docs/litert_int16_ops.md.  Run: ``python bench/int16_ops.py``."""

from __future__ import annotations

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import qlite
from qlite.metrics import sqnr_db


def _dense(x):
  return nn.Dense(x.shape[-1])(x)


def _conv(x, **kw):
  return nn.Conv(8, (3, 3), **kw)(x)


SEQ = dict(
    fully_connected=lambda x: _dense(x),
    batch_matmul=lambda x: jnp.einsum("bqd,bkd->bqk", _dense(x), x),
    add=lambda x: _dense(x) + x,
    add_const=lambda x: x + jnp.linspace(-1, 1, x.shape[-1]),
    sub=lambda x: _dense(x) - x,
    mul=lambda x: _dense(x) * x,
    div_const=lambda x: x / 3.0,
    max_relu=lambda x: nn.relu(_dense(x)),
    relu6=lambda x: nn.relu6(_dense(x) * 4),
    maximum=lambda x: jnp.maximum(_dense(x), x),
    softmax=lambda x: jax.nn.softmax(_dense(x)),
    logistic=lambda x: nn.sigmoid(_dense(x)),
    tanh=lambda x: jnp.tanh(_dense(x)),
    gelu=lambda x: nn.gelu(_dense(x)),
    exp=lambda x: jnp.exp(_dense(x) * 0.3),
    rsqrt=lambda x: jax.lax.rsqrt(jnp.abs(_dense(x)) + 1.0),
    mean=lambda x: jnp.mean(_dense(x), axis=-1, keepdims=True),
    sum=lambda x: jnp.sum(_dense(x), axis=1),
    reduce_max=lambda x: jnp.max(_dense(x), axis=-1),
    layer_norm=lambda x: nn.LayerNorm()(_dense(x)),
    transpose=lambda x: jnp.swapaxes(_dense(x), 1, 2),
    reshape=lambda x: _dense(x).reshape(x.shape[0], -1),
    slice=lambda x: _dense(x)[:, 1:5],
    concatenate=lambda x: jnp.concatenate([_dense(x), x], axis=-1),
    pad=lambda x: jnp.pad(_dense(x), ((0, 0), (1, 1), (0, 0))),
    gather=lambda x: _dense(x)[:, jnp.array([3, 0, 2])],
    embed_input=None,
)
IMG = dict(
    conv_2d=lambda x: _conv(x),
    depthwise_conv_2d=lambda x: nn.Conv(4, (3, 3), feature_group_count=4)(x),
    conv_transpose=lambda x: nn.ConvTranspose(4, (3, 3), strides=(2, 2))(x),
    max_pool=lambda x: nn.max_pool(_conv(x), (2, 2), (2, 2)),
    avg_pool=lambda x: nn.avg_pool(_conv(x), (2, 2), (2, 2)),
    resize_bilinear=lambda x: jax.image.resize(
        _conv(x), (x.shape[0], 16, 16, 8), "bilinear"),
    batch_norm=lambda x: nn.BatchNorm(use_running_average=True)(_conv(x)),
)


class _Wrap(nn.Module):
  fn: object

  @nn.compact
  def __call__(self, x):
    return self.fn(x)


def probe(name, fn, shape, seed=0, act="int16"):
  rng = np.random.RandomState(seed)
  # bounded data: held-out rows stay inside the calibrated range
  calib = [rng.uniform(-1, 1, shape).astype(np.float32) for _ in range(4)]
  held = rng.uniform(-1, 1, shape).astype(np.float32)
  model = _Wrap(fn)
  variables = model.init(jax.random.key(seed), calib[0][:1])
  rules = [qlite.QuantizationRule(act_qtype=act)]
  try:
    stats = qlite.calibrate(model, rules, calib, variables=variables,
                            progress=False)
    blob = qlite.export_tflite(model, rules, stats, (held[:1],),
                               variables=variables, verify="error")
  except qlite.QliteError as e:
    return name, "refused", None, f"{type(e).__name__}: " + \
        str(e).split("\n")[0][:160]
  info = qlite.inspect_tflite(blob)
  runner = qlite.TFLiteRunner(blob)
  y = np.concatenate([np.asarray(runner.run(held[i:i + 1])[0])
                      for i in range(len(held))])
  ref = np.asarray(model.apply(variables, held))
  ops = ", ".join(k for k in info.op_histogram
                  if k not in ("QUANTIZE", "DEQUANTIZE"))
  return (name, "full-integer" if info.full_integer else "float islands",
          sqnr_db(ref, y), ops)


def main(argv=None) -> int:
  only = set(argv or sys.argv[1:])
  rows = []
  for table, shape in ((SEQ, (8, 6, 16)), (IMG, (4, 8, 8, 4))):
    for name, fn in table.items():
      if fn is None or (only and name not in only):
        continue
      r16 = probe(name, fn, shape)
      r8 = probe(name, fn, shape, act="int8")
      rows.append((r16, r8[2]))
      print(r16, r8[2], flush=True)
  print("\n| op | 16x8 export | SQNR int8 dB | SQNR 16x8 dB | LiteRT ops "
        "(16x8) or the refusal |")
  print("|---|---|---|---|---|")
  for (name, res, db, ops), db8 in rows:
    f = lambda v: "" if v is None else f"{v:.1f}"
    print(f"| {name} | {res} | {f(db8)} | {f(db)} | {ops} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
