"""The zoo architectures rebuilt in Keras with the Flax weights (BatchNorm
folded into the preceding conv), for TensorFlow's own full-integer converter.

``build(case)`` returns a batch-1 ``keras.Model`` whose float output matches
the Flax model's (``bench/odml.py`` checks it to ~1e-4 before quantizing).
Bench-only: imports TensorFlow / Keras; qlite never imports this.
"""

from __future__ import annotations

import math

import numpy as np

BN_EPS = 1e-5      # flax.linen.BatchNorm default
LN_EPS = 1e-6      # flax.linen.LayerNorm default

FAMILIES = ("digits_cnn", "mobilenet_v2", "resnet", "unet", "transformer")


def _layers():
  import keras
  return keras.layers


def _fold_bn(kernel, params_bn, stats_bn):
  """Returns (kernel, bias) of conv(kernel) followed by BatchNorm."""
  s = params_bn["scale"] / np.sqrt(stats_bn["var"] + BN_EPS)
  return (kernel * s).astype(np.float32), \
      (params_bn["bias"] - stats_bn["mean"] * s).astype(np.float32)


def _conv(x, kernel, bias, strides=1, activation=None):
  L = _layers()
  layer = L.Conv2D(kernel.shape[-1], kernel.shape[:2], strides=strides,
                   padding="same", use_bias=True)
  y = layer(x)
  layer.set_weights([kernel, bias])
  return _act(y, activation)


def _depthwise(x, kernel, bias, strides=1, activation=None):
  L = _layers()
  layer = L.DepthwiseConv2D(kernel.shape[:2], strides=strides, padding="same",
                            use_bias=True)
  y = layer(x)
  layer.set_weights([np.transpose(kernel, (0, 1, 3, 2)), bias])  # HW1C->HWC1
  return _act(y, activation)


def _dense(x, kernel, bias, activation=None):
  L = _layers()
  layer = L.Dense(kernel.shape[-1])
  y = layer(x)
  layer.set_weights([kernel, bias])
  return _act(y, activation)


def _act(y, activation):
  L = _layers()
  if activation == "relu":
    return L.ReLU()(y)
  if activation == "relu6":
    return L.ReLU(max_value=6.0)(y)
  return y


def _digits(v, x):
  L = _layers()
  p = v["params"]
  x = _conv(x, p["Conv_0"]["kernel"], p["Conv_0"]["bias"], activation="relu")
  x = _conv(x, p["Conv_1"]["kernel"], p["Conv_1"]["bias"], activation="relu")
  x = L.MaxPooling2D(2, 2)(x)
  x = L.Flatten()(x)        # NHWC row-major flatten, as x.reshape(b, -1)
  x = _dense(x, p["Dense_0"]["kernel"], p["Dense_0"]["bias"], "relu")
  return _dense(x, p["Dense_1"]["kernel"], p["Dense_1"]["bias"])


def _mobilenet_v2(v, x):
  from qlite.zoo import mobilenet_v2 as zoo
  L = _layers()
  p, s = v["params"], v["batch_stats"]
  x = _conv(x, *_fold_bn(p["Conv_0"]["kernel"], p["BatchNorm_0"],
                         s["BatchNorm_0"]), strides=2, activation="relu6")
  for i, (out, stride) in enumerate(zoo.BLOCKS):
    bp, bs = p[f"InvertedResidual_{i}"], s[f"InvertedResidual_{i}"]
    c_in = x.shape[-1]
    y = _conv(x, *_fold_bn(bp["Conv_0"]["kernel"], bp["BatchNorm_0"],
                           bs["BatchNorm_0"]), activation="relu6")
    y = _depthwise(y, *_fold_bn(bp["Conv_1"]["kernel"], bp["BatchNorm_1"],
                                bs["BatchNorm_1"]), strides=stride,
                   activation="relu6")
    y = _conv(y, *_fold_bn(bp["Conv_2"]["kernel"], bp["BatchNorm_2"],
                           bs["BatchNorm_2"]))
    x = L.Add()([x, y]) if stride == 1 and c_in == out else y
  x = _conv(x, *_fold_bn(p["Conv_1"]["kernel"], p["BatchNorm_1"],
                         s["BatchNorm_1"]), activation="relu6")
  x = L.GlobalAveragePooling2D()(x)
  return _dense(x, p["Dense_0"]["kernel"], p["Dense_0"]["bias"])


def _resnet(v, x):
  from qlite.zoo import resnet as zoo
  L = _layers()
  p, s = v["params"], v["batch_stats"]
  x = _conv(x, *_fold_bn(p["Conv_0"]["kernel"], p["BatchNorm_0"],
                         s["BatchNorm_0"]), activation="relu")
  x = L.MaxPooling2D(3, 2, padding="same")(x)
  for i, (out, stride) in enumerate(zoo.BLOCKS):
    bp, bs = p[f"BasicBlock_{i}"], s[f"BasicBlock_{i}"]
    y = _conv(x, *_fold_bn(bp["Conv_0"]["kernel"], bp["BatchNorm_0"],
                           bs["BatchNorm_0"]), strides=stride,
              activation="relu")
    y = _conv(y, *_fold_bn(bp["Conv_1"]["kernel"], bp["BatchNorm_1"],
                           bs["BatchNorm_1"]))
    if "shortcut" in bp:
      x = _conv(x, *_fold_bn(bp["shortcut"]["kernel"], bp["shortcut_bn"],
                             bs["shortcut_bn"]), strides=stride)
    x = L.ReLU()(L.Add()([x, y]))
  x = L.GlobalAveragePooling2D()(x)
  return _dense(x, p["Dense_0"]["kernel"], p["Dense_0"]["bias"])


def _unet(v, x):
  L = _layers()
  p = v["params"]
  c = lambda y, n, act="relu": _conv(y, p[n]["kernel"], p[n]["bias"],
                                     activation=act)
  s1 = c(x, "enc1")
  s2 = c(L.MaxPooling2D(2, 2)(s1), "enc2")
  b = c(L.MaxPooling2D(2, 2)(s2), "bottleneck")
  y = L.Concatenate()([L.UpSampling2D(2, interpolation="nearest")(b), s2])
  y = c(y, "dec2")
  # jax.image.resize "bilinear" (half-pixel centres) == tf.image.resize.
  y = L.Concatenate()([L.UpSampling2D(2, interpolation="bilinear")(y), s1])
  y = c(y, "dec1")
  return c(y, "head", None)


def _layer_norm(x, p):
  L = _layers()
  layer = L.LayerNormalization(epsilon=LN_EPS)
  y = layer(x)
  layer.set_weights([p["scale"], p["bias"]])
  return y


def _attention(x, q, k, v, o, heads):
  """Self-attention from flattened q / k / v / out (kernel, bias) pairs."""
  from keras import ops
  L = _layers()
  t, d = x.shape[1], q[0].shape[-1]
  hd = d // heads
  split = lambda y: L.Reshape((t, heads, hd))(y)
  qh, kh, vh = (split(_dense(x, *w)) for w in (q, k, v))
  logits = ops.einsum("bqhd,bkhd->bhqk", qh, kh) / math.sqrt(hd)
  y = ops.einsum("bhqk,bkhd->bqhd", ops.softmax(logits, axis=-1), vh)
  return _dense(L.Reshape((t, d))(y), *o)


def _transformer(v, x):
  from keras import ops
  p = v["params"]
  x = _dense(x, p["embed"]["kernel"], p["embed"]["bias"])
  x = x + p["pos_embedding"]
  for i, approximate in ((0, True), (1, False)):
    lp = p[f"EncoderLayer_{i}"]
    y = _layer_norm(x, lp["LayerNorm_0"])
    if "MultiHeadDotProductAttention_0" in lp:
      ap = lp["MultiHeadDotProductAttention_0"]
      flat = lambda w: (w["kernel"].reshape(w["kernel"].shape[0], -1),
                        w["bias"].reshape(-1))
      out = (ap["out"]["kernel"].reshape(-1, ap["out"]["kernel"].shape[-1]),
             ap["out"]["bias"])
      heads = ap["query"]["kernel"].shape[1]
      y = _attention(y, flat(ap["query"]), flat(ap["key"]),
                     flat(ap["value"]), out, heads)
    else:
      from qlite.zoo import transformer as zoo
      ap = lp["EinsumSelfAttention_0"]
      kb = lambda n: (ap[n]["kernel"], ap[n]["bias"])
      y = _attention(y, kb("query"), kb("key"), kb("value"), kb("out"),
                     zoo.NUM_HEADS)
    x = x + y
    y = _layer_norm(x, lp["LayerNorm_1"])
    y = _dense(y, lp["Dense_0"]["kernel"], lp["Dense_0"]["bias"])
    y = ops.gelu(y, approximate=approximate)
    y = _dense(y, lp["Dense_1"]["kernel"], lp["Dense_1"]["bias"])
    x = x + y
  x = _layer_norm(x, p["LayerNorm_0"])
  x = ops.mean(x, axis=1)
  return _dense(x, p["Dense_0"]["kernel"], p["Dense_0"]["bias"])


_BUILDERS = {"digits_cnn": _digits, "mobilenet_v2": _mobilenet_v2,
             "resnet": _resnet, "unet": _unet, "transformer": _transformer}


def build(family: str, variables: dict, input_shape: tuple):
  """Returns the batch-1 Keras model of ``family`` holding ``variables``.

  Raises:
    KeyError: no Keras rebuild for ``family``.
  """
  import keras
  inp = keras.Input(tuple(input_shape[1:]), batch_size=1)
  out = _BUILDERS[family](variables, inp)
  return keras.Model(inp, out)
